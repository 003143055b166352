""".npy files in and out, safely.

`read_npy` trusts nothing in the file: it must be a regular file (`fileio.read_regular_file`) no
larger than the caller's bound, with a valid header whose shape and dtype account for exactly the
bytes that follow (a header may claim 10^12 elements; we never allocate from the header alone), and
no Python objects (never unpickled). `save_npy_atomic` writes through a temporary file.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import InvalidInputError
from .fileio import read_regular_file

_MAX_HEADER = 10000            # numpy's own default bound on a header's size
_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                (3, 0): np.lib.format.read_array_header_2_0}   # 3.0 = 2.0 with a UTF-8 header


def read_npy(path: str | Path, max_bytes: int, fix: str = "write it again") -> np.ndarray:
    """The array in a .npy file; InvalidInputError (naming `fix`) for anything that is not one."""
    path = Path(path)
    raw = read_regular_file(path, max_bytes, what=".npy file", fix=fix)
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        read_header = _READ_HEADER.get(version)
        if read_header is None:
            raise ValueError(f"unknown .npy format version {version}")
        shape, fortran, dtype = read_header(f, max_header_size=_MAX_HEADER)
    except Exception as e:    # numpy parses the header with Python's tokenizer: many error types
        why = " ".join(str(e).split()[:12])
        raise InvalidInputError(f"{path}: not a .npy array ({type(e).__name__}: {why}); {fix}") from None
    if dtype.hasobject:
        raise InvalidInputError(f"{path}: holds Python objects, not numbers; {fix}")
    if any(d < 0 for d in shape) or dtype.subdtype is not None or dtype.itemsize == 0:
        raise InvalidInputError(f"{path}: header describes shape {tuple(shape)} of {dtype}, not a plain array; {fix}")
    data_bytes = math.prod(shape) * dtype.itemsize
    have = len(raw) - f.tell()
    if have != data_bytes:
        raise InvalidInputError(
            f"{path}: its header announces shape {tuple(shape)} {dtype} ({data_bytes} bytes of data), "
            f"but {have} bytes follow; the file is truncated or not a .npy array; {fix}")
    try:
        return np.frombuffer(raw, dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"{path}: not a plain numeric array ({e}); {fix}") from None


def save_npy_atomic(path: str | Path, array: np.ndarray, force: bool = False) -> None:
    """np.save to a temporary file beside `path`, then rename: no half-written or clobbered output."""
    atomic_write(path, lambda f: np.save(f, array), overwrite=force,
                 hint="choose another --out or pass --force to replace it")
