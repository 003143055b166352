"""The output folder of a generation run: checked before any work, scanned (never enumerated) for
images a run would collide with, and the images already there checked for `--resume`.

Image names are `PREFIX_SEED_INDEX.png` with the index zero-padded to 4 digits. Finding the existing
ones lists the folder once, so the cost is O(files in the folder), never O(-n).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError
from .exits import os_error_message
from .images import PARAMS_KEY

_NAME_MAX = 200


def check_prefix(prefix: str) -> None:
    """A file-name prefix: non-empty, no path separators, not hidden, printable."""
    bad = [c for c in prefix if c in "/\\\x00" or not c.isprintable()]
    if not prefix or bad or prefix.startswith(".") or len(prefix) > _NAME_MAX:
        raise InvalidInputError(f"--prefix {prefix!r}: must be a plain file-name prefix (no '/', no leading '.', "
                                f"printable, at most {_NAME_MAX} characters); put folders into --out instead")


def check_output_dir(out: str | Path) -> Path:
    """Check, without creating anything, that `out` is a writable folder or can be made into one."""
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise InvalidInputError(f"--out {out}: {probe} is a broken symbolic link; fix or remove it")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == out else f"cannot be made: {probe} is"
        raise InvalidInputError(f"--out {out}: {where} a file, not a folder; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out else f"cannot be made: {probe} is not writable"
        raise InvalidInputError(f"--out {out}: {what}; choose another --out or fix its permissions")
    return out


def image_name(prefix: str, seed: int, index: int) -> str:
    return f"{prefix}_{seed}_{index:04d}.png"


def existing_images(out: Path, prefix: str, seed: int, count: int) -> dict[int, Path]:
    """{index: path} of entries in `out` named like image 0..count-1 of this prefix and seed
    (whatever they are: a folder of that name is a collision too)."""
    if not out.is_dir():
        return {}
    pattern = re.compile(re.escape(f"{prefix}_{seed}_") + r"(\d{4,})\.png$")
    found = {}
    try:
        with os.scandir(out) as it:
            for e in it:
                m = pattern.match(e.name)
                if m and int(m[1]) < count and e.name == image_name(prefix, seed, int(m[1])):
                    found[int(m[1])] = Path(e.path)
    except OSError as e:
        raise InvalidInputError(f"--out {out}: cannot be listed ({os_error_message(e)})") from None
    return found


@dataclass
class ResumePlan:
    done: set[int] = field(default_factory=set)       # valid images with matching parameters: skipped
    redo: set[int] = field(default_factory=set)       # unreadable/incomplete files of our names: replaced


def read_image_params(path: Path) -> dict | None:
    """The parameters a finished arc2face-rt PNG records, or None when the file is not one (unreadable,
    truncated, another image, no parameters)."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            text = im.info.get(PARAMS_KEY)       # our tEXt chunk precedes the image data
            size, mode = im.size, im.mode
            im.verify()                           # every chunk present and its CRC right, up to IEND
        params = json.loads(text) if text else None
    except Exception:                             # Pillow raises many types for broken files
        return None
    if not isinstance(params, dict) or size != (512, 512) or mode != "RGB":
        return None
    return params


def plan_resume(existing: dict[int, Path], expected) -> ResumePlan:
    """Sort existing images into done (valid, same parameters) and redo (not a finished image).

    `expected(i)` gives image i's parameters. A finished image made with other parameters is
    someone else's work: InvalidInputError, before anything is generated."""
    plan = ResumePlan()
    for i, path in sorted(existing.items()):
        if path.is_dir() or path.is_symlink():
            raise InvalidInputError(f"{path}: is a {'folder' if path.is_dir() else 'symbolic link'} where image "
                                    f"{i} goes; move it away or choose another --out/--prefix")
        got = read_image_params(path)
        if got is None:
            plan.redo.add(i)
            continue
        want = expected(i)
        diff = sorted(k for k in set(want) | set(got) if k != "arc2face_rt" and got.get(k) != want.get(k))
        if diff:
            k = diff[0]
            raise InvalidInputError(
                f"{path}: was made with other parameters ({k}: {got.get(k)!r} there, {want.get(k)!r} now"
                f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); --resume only continues the same "
                "run: choose another --out/--prefix/--seed, or pass --overwrite")
        plan.done.add(i)
    return plan
