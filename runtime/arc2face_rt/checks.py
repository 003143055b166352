"""Type checks of Python API arguments (the CLIs' argparse types do this for flags): a whole number
must be an int, a number a real; anything else is refused with InvalidInputError naming the argument,
never coerced. Whole-valued floats (2.0) are refused too, as numpy's random generators refuse them:
a float where a count, seed or index belongs is a bug in the caller, not a value to round."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InvalidInputError


def _got(v) -> str:
    return f"{v!r} ({type(v).__name__})" if len(repr(v)) <= 40 else type(v).__name__


def whole(v, name: str) -> int:
    """`v` as an int when it is an int or numpy integer (not a bool); else InvalidInputError."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise InvalidInputError(f"{name} must be a whole number (an int), got {_got(v)}")
    return int(v)


def real(v, name: str) -> float:
    """`v` as a float when it is a real number (int, float, numpy scalar; not a bool); else
    InvalidInputError. Ranges and finiteness are the caller's check."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise InvalidInputError(f"{name} must be a number, got {_got(v)}")
    try:
        return float(v)
    except OverflowError:               # an int or Fraction beyond float's range
        raise InvalidInputError(f"{name} is too large, got {_got(v)}") from None


def choice(v, name: str, options) -> str:
    """`v` when it is one of `options` (strings); else InvalidInputError listing them."""
    if not isinstance(v, str) or v not in options:
        raise InvalidInputError(f"{name} must be one of {', '.join(options)}, got {_got(v)}")
    return v


def path(v, name: str) -> Path:
    """`v` as a Path when it is a non-empty str or os.PathLike; else InvalidInputError."""
    try:
        p = Path(v)
    except TypeError:
        raise InvalidInputError(f"{name} must be a path (str or pathlib.Path), got {_got(v)}") from None
    if not str(v).strip():
        raise InvalidInputError(f"{name} must not be empty (it would mean the current folder)")
    return p


def sequence(v, name: str, what: str, nested: bool = False) -> list:
    """`v` as a list when it is a sequence (a list, tuple, range or array; not a str or bytes), of sequences
    when `nested`; else InvalidInputError naming `name` and saying what it must be (`what`)."""
    ok = isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes))
    items = list(v) if ok else []
    if ok and nested:
        ok = all(isinstance(x, (Sequence, np.ndarray, range)) and not isinstance(x, (str, bytes)) for x in items)
    if not ok:
        raise InvalidInputError(f"{name} must be {what}, got {_got(v)}")
    return items


def flag(v, name: str) -> bool:
    """`v` when it is True or False (a numpy bool too); else InvalidInputError (None or 0 must not turn a
    check off, nor "no" turn an option on)."""
    if not isinstance(v, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {_got(v)}")
    return bool(v)
