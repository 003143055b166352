""".npy files in and out, safely.

`read_npy` trusts nothing in the file: it must be a regular file (a FIFO would block a plain open
forever), no larger than the caller's bound, with a valid header whose shape and dtype account for
exactly the bytes that follow (a header may claim 10^12 elements; we never allocate from the header
alone), and no Python objects (never unpickled). `save_npy_atomic` writes through a temporary file.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import InvalidInputError
from .exits import os_error_message

_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                (3, 0): np.lib.format.read_array_header_2_0}   # 3.0 = 2.0 with a UTF-8 header


def read_npy(path: str | Path, max_bytes: int, fix: str = "write it again") -> np.ndarray:
    """The array in a .npy file; InvalidInputError (naming `fix`) for anything that is not one."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file; {fix}") from None
    except OSError as e:
        raise InvalidInputError(os_error_message(e)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise InvalidInputError(f"{path}: is {kind}, expected a .npy file")
    if st.st_size == 0:
        raise InvalidInputError(f"{path}: empty file (0 bytes); {fix}")
    if st.st_size > max_bytes:
        raise InvalidInputError(f"{path}: {st.st_size} bytes, more than the {max_bytes} such a file can need; "
                                f"is it the right file? {fix}")
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = _READ_HEADER.get(version)
                if read_header is None:
                    raise ValueError(f"unknown .npy format version {version}")
                shape, fortran, dtype = read_header(f)
            except Exception as e:    # numpy parses the header with Python's tokenizer: many error types
                raise InvalidInputError(f"{path}: not a .npy array ({type(e).__name__}: {e}); {fix}") from None
            if dtype.hasobject:
                raise InvalidInputError(f"{path}: holds Python objects, not numbers; {fix}")
            data_bytes = math.prod(shape) * dtype.itemsize
            have = st.st_size - f.tell()
            if have != data_bytes:
                raise InvalidInputError(
                    f"{path}: its header announces shape {tuple(shape)} {dtype} ({data_bytes} bytes of data), "
                    f"but {have} bytes follow; the file is truncated or not a .npy array; {fix}")
            data = f.read(data_bytes)
    except OSError as e:
        raise InvalidInputError(os_error_message(e)) from None
    if len(data) != data_bytes:
        raise InvalidInputError(f"{path}: changed while being read; {fix}")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def save_npy_atomic(path: str | Path, array: np.ndarray, force: bool = False) -> None:
    """np.save to a temporary file beside `path`, then rename: no half-written or clobbered output."""
    atomic_write(path, lambda f: np.save(f, array), overwrite=force,
                 hint="choose another --out or pass --force to replace it")
