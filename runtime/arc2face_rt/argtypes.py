"""argparse types shared by the command-line tools: a bad value is refused while parsing, with the
flag's own range in the message, before anything is loaded."""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
from pathlib import Path


def path(text: str) -> Path:
    """A path that is not empty (Path("") would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def number(lo: float = -math.inf, hi: float = math.inf, name: str = "a number"):
    """A finite float in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        bounds = (f"{lo:g}..{hi:g}" if math.isfinite(lo) and math.isfinite(hi) else
                  f">= {lo:g}" if math.isfinite(lo) else f"<= {hi:g}" if math.isfinite(hi) else "")
        if not math.isfinite(v):
            within = f" in {bounds}" if ".." in bounds else f" {bounds}" if bounds else ""
            raise argparse.ArgumentTypeError(f"{text} is not a finite number{within}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return v
    parse.__name__ = name
    return parse


def count(lo: int = 0, hi: int = 2**63 - 1, name: str = "a whole number"):
    """A whole number in [lo, hi]; accepts 64e6-style spellings of whole numbers."""
    def parse(text: str) -> int:
        try:
            v = float(text) if any(c in text.lower() for c in ".e") else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
            raise argparse.ArgumentTypeError(f"{text} is not {name}")
        if not lo <= int(v) <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo}..{hi}")
        return int(v)
    parse.__name__ = name
    return parse


seed = count(0, 2**63 - 1, "a seed")


def env_count(name: str, lo: int, hi: int, why: str = "") -> int | None:
    """A whole-number environment variable: None when unset or empty, else its value in [lo, hi];
    anything else is an InvalidInputError naming the variable (and `why` the bounds are what they are)."""
    from .errors import InvalidInputError

    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return count(lo, hi, "a whole number")(text)
    except argparse.ArgumentTypeError as e:
        raise InvalidInputError(f"{name}={text}: {e}{why} (unset it for the default)") from None


def env_path(name: str) -> str | None:
    """A folder-naming environment variable such as ARC2FACE_CACHE_DIR: None when unset, empty or only
    blanks (`VAR=" "` would otherwise name a folder " " in the working directory), else its value."""
    text = os.environ.get(name)
    return text if text and text.strip() else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def env_threads(name: str) -> int | None:
    """A thread-count variable such as ARC2FACE_ORT_THREADS: None when unset or empty, else 0 (the
    library's default) up to the usable CPUs. More threads than CPUs only contend: 256 on two cores made
    a one-step run take minutes, and it answered SIGTERM 30 s late."""
    cpus = usable_cpus()
    return env_count(name, lo=0, hi=cpus, why=f": this process may use {cpus} CPU(s)")


class Parser(argparse.ArgumentParser):
    """argparse with the tools' error format: one line `TOOL: error: COMMAND: what (see ... --help)`,
    exit code 2, instead of the usage block followed by `TOOL COMMAND: error: ...`. TOOL is the top-level
    parser's prog, which may have spaces (`python -m benchmarks`); subcommand parsers inherit it."""

    def __init__(self, *args, tool: str | None = None, verbose_flag: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool = tool or self.prog
        if verbose_flag:      # a subcommand of a tool with -v takes it after its name too (`onnx ... -v`)
            self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                              help="log more (as before the command)")
        # Values such as -inf or -1e3 are values (refused by the flag's own range), not unknown options:
        # argparse's own pattern knows only -1 and -1.5.
        self._negative_number_matcher = re.compile(r"^-(?:\d+|\d*\.\d+)(?:e[-+]?\d+)?$|^-(?:inf|infinity|nan)$", re.I)

    def _parse_optional(self, arg_string):
        # Before argparse's own prefix matching, which reads -nan as `-n an` where a parser has -n.
        if self._negative_number_matcher.match(arg_string) and not self._has_negative_number_optionals:
            return None
        return super()._parse_optional(arg_string)

    def add_subparsers(self, **kwargs):
        verbose = any(a.dest == "verbose" for a in self._actions)
        kwargs.setdefault("parser_class", functools.partial(type(self), tool=self.tool, verbose_flag=verbose))
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix(self.tool).strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"{self.tool}: error: {where}{' '.join(message.split())} (see `{self.prog} --help`)\n")
