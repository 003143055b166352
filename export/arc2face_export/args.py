"""Option types shared by the `arc2face-export` subcommands: each refuses a bad value while the
command line is parsed, before any work, with a message naming the accepted range."""
from __future__ import annotations

import argparse
from pathlib import Path

MAX_SEED = 2**63 - 1        # torch and numpy seeds are 64-bit


def path_arg(text: str) -> Path:
    """A path option: an empty string would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; name a file or folder")
    return Path(text)


def int_in(lo: int, hi: int, what: str = ""):
    """An integer option in lo..hi; `what` says why the bounds are what they are."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi} (got {text}){'; ' + what if what else ''}")
        return value
    return parse


seed_arg = int_in(0, MAX_SEED, "seeds are 64-bit")
