"""The one JSON file a benchmark subcommand writes: its place checked before any work, then written
atomically, never over an existing file unless asked (`--force`)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from arc2face_rt import argtypes
from arc2face_rt.atomic import atomic_write
from arc2face_rt.errors import OutputExistsError
from arc2face_rt.outputs import check_output_dir

HINT = "choose another --name or pass --force"


def check_result_path(out: Path, name: str | None, force: bool) -> None:
    """Before any work: `out` is (or can be made) a writable folder, and `name` (None: a stamped default
    name, chosen at the end) is new there unless `force`."""
    check_output_dir(out)
    if name and not force and os.path.lexists(out / name):
        raise OutputExistsError(f"{out / name}: exists; {HINT}")


def write_result(result: dict, path: Path, overwrite: bool = False, unique: bool = False) -> Path:
    """Write `result` as JSON to `path` (its folder made if missing), atomically; return where it went.
    An existing file is refused (OutputExistsError) unless `overwrite`. With `unique` (a stamped default
    name), a taken name gets -2, -3, ... before its suffix instead: two runs within the same second."""
    data = (json.dumps(result, indent=1) + "\n").encode()
    target, n = path, 1
    while True:
        try:
            return atomic_write(target, data, overwrite=overwrite, hint=HINT)
        except OutputExistsError:
            if not unique:
                raise
            n += 1
            target = path.with_name(f"{path.stem}-{n}{path.suffix}")


def file_name(text: str) -> str:
    """A --name: a plain file name (folders go into --out)."""
    if not text or text in (".", "..") or any(c in text for c in "/\0"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name; put folders into --out")
    return text


def add_result_flags(r, results: Path, default: str) -> None:
    """--out, --name, --force of a subcommand that writes one result JSON (see `write_from_args`)."""
    r.add_argument("--out", type=argtypes.path, default=results, help="folder of the result JSON (default "
                   "benchmarks/results)")
    r.add_argument("--name", type=file_name, default=None, help=f"result file name (default {default})")
    r.add_argument("--force", action="store_true", help="replace an existing --name file (refused by default)")


def write_from_args(args, result: dict, default: str) -> Path:
    """The result JSON: `--name` (an existing one only with --force), else `default`, a stamped name."""
    return write_result(result, args.out / (args.name or default), overwrite=args.force and bool(args.name),
                        unique=not args.name)          # --force replaces a --name file, never a stamped one
