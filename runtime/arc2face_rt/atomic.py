"""One way to write an output file: into a temporary file beside it, then into place.

Readers never see half a file, an interrupted write leaves nothing behind, and without `overwrite`
an existing file is never replaced (not even one that appears while we write).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], overwrite: bool = False,
                 hint: str = "choose another --out or pass --force") -> Path:
    """Call `write(file)` on a temporary file, then move it to `path`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists; {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())        # mkstemp makes 0600; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)              # fails if `path` appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputExistsError(f"{path}: appeared while writing; not overwritten") from None
            except OSError:                     # filesystems without hard links
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
