"""Reading a small file someone else wrote, without trusting it: it must be a regular file (a FIFO
would block an open() forever, /dev/zero would never end) of at most `max_bytes`, read in one go."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import Arc2FaceError, InvalidInputError
from .exits import os_error_message


def loads_json(data: str | bytes):
    """json.loads, where JSON nested too deeply for Python's parser raises the ValueError any other
    malformed JSON raises (json itself raises RecursionError, which a reader's `except ValueError`
    would let through as a traceback)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_regular_file(path: str | Path, max_bytes: int, what: str = "file", fix: str = "",
                      error: type[Arc2FaceError] = InvalidInputError) -> bytes:
    """The bytes of `path`; `error` (naming `what` and `fix`) when it is missing, not a regular file,
    empty, larger than `max_bytes`, or unreadable."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        st = os.stat(path)
    except ValueError:               # os.stat's "embedded null byte": no file has such a name
        raise error(f"{str(path)!r}: not a valid path (it contains a NUL byte){tail}") from None
    except FileNotFoundError:
        raise error(f"{path}: no such file{tail}") from None
    except OSError as e:
        raise error(f"{os_error_message(e)}{tail}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise error(f"{path}: is {kind}, expected a {what}{tail}")
    if st.st_size == 0:
        raise error(f"{path}: empty {what} (0 bytes){tail}")
    if st.st_size > max_bytes:
        raise error(f"{path}: {st.st_size} bytes, more than the {max_bytes} a {what} can need; is it the right "
                    f"file?{tail}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))   # never block on a swapped-in pipe
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise error(f"{path}: is not a regular file, expected a {what}{tail}")
            chunks, left = [], max_bytes + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        raise error(f"{os_error_message(e)}{tail}") from None
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise error(f"{path}: grew past {max_bytes} bytes while being read{tail}")
    return data
