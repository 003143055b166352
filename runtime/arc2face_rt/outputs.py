"""The output folder of a generation run: checked before any work, scanned (never enumerated) for
images a run would collide with, and the images already there checked for `--resume`.

Image names are `PREFIX_SEED_INDEX.png` with the index zero-padded to 4 digits. Finding the existing
ones lists the folder once, so the cost is O(files in the folder), never O(-n).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import Arc2FaceError, InvalidInputError
from .exits import os_error_message, os_error_reason
from .images import read_png_params
from .provenance import as_current
from .specs import IMAGE_SIZE

PROBE_PREFIX = ".arc2face-probe-"    # check_output_dir's test folder, made and removed at once
_NAME_MAX = 170        # file systems allow 255 bytes; atomic_write adds ~80 for its temporary name


def check_names(prefix: str, seed: int, count: int) -> None:
    """Image names `PREFIX_SEED_INDEX.png`: a plain prefix (non-empty, no path separators, not hidden,
    printable), and names short enough for the file system with room for the temporary-file tag."""
    bad = [c for c in prefix if c in "/\\\x00" or not c.isprintable()]
    if not prefix or bad or prefix.startswith("."):
        raise InvalidInputError(f"--prefix {prefix!r}: must be a plain file-name prefix (no '/', no leading '.', "
                                "printable); put folders into --out instead")
    longest = len(image_name(prefix, seed, max(count - 1, 0)).encode())
    if longest > _NAME_MAX:
        raise InvalidInputError(f"--prefix and --seed make file names of {longest} bytes; at most {_NAME_MAX} fit "
                                "(with room for the temporary-file tag): use a shorter --prefix")


def check_output_dir(out: str | Path, flag: str = "--out", fix: str = "choose another --out") -> Path:
    """Check, leaving nothing behind, that `out` is a writable folder or can be made into one (a
    folder is made and removed in its nearest existing ancestor). Errors name `out` as option `flag`
    and end with `fix`."""
    out = Path(out)
    probe = _nearest_existing(out, flag)
    if not probe.is_dir():
        where = "is" if probe == out else f"cannot be made: {probe} is"
        raise InvalidInputError(f"{flag} {out}: {where} a file, not a folder; {fix}")
    _check_name_lengths(out, probe, flag, fix)
    what = "is not writable" if probe == out else f"cannot be made: {probe} is not writable"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{flag} {out}: {what}; {fix} or fix its permissions")
    made = None
    try:       # access() says yes to root everywhere; /proc, a read-only mount or a full inode table say no
        made = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=probe)
    except OSError as e:
        why = os_error_reason(e).split("; ")[0]     # what happened, not exits' generic advice
        raise InvalidInputError(f"{flag} {out}: {what} ({why}); {fix}") from None
    finally:
        if made:
            os.rmdir(made)
    return out


def _nearest_existing(out: Path, flag: str) -> Path:
    """`out`, or its nearest ancestor that exists."""
    probe = out
    while not os.path.exists(probe):    # Path.exists raises on a name over NAME_MAX before Python 3.12
        if os.path.islink(probe):
            raise InvalidInputError(f"{flag} {out}: {probe} is a broken symbolic link; fix or remove it")
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def _check_name_lengths(out: Path, probe: Path, flag: str, fix: str) -> None:
    """The folders still to make under `probe` have names the file system takes, and `out` a length
    (found when they were made, after the models had loaded, and with the parents already made)."""
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    if len(os.fsencode(os.path.abspath(out))) >= path_max:
        raise InvalidInputError(f"{flag} {out}: the path is longer than this file system takes ({path_max} bytes); "
                                f"{fix}")
    for part in out.relative_to(probe).parts if out != probe and out.is_relative_to(probe) else ():
        if len(os.fsencode(part)) > name_max:
            raise InvalidInputError(f"{flag} {out}: the name {part[:40]}... is longer than this file system takes "
                                    f"({name_max} bytes); {fix}")


def check_not_in_engines(out: str | Path, engines: str | Path, flag: str = "--out") -> None:
    """Refuse an output inside an engines folder (or the folder itself): it holds only what the tools
    write, and a later `arc2face-export ... --force` would refuse the whole folder for it. A folder
    without a manifest is no engines folder (what is wrong with it is said where it is opened)."""
    o, e = Path(os.path.realpath(out)), Path(os.path.realpath(engines))
    if (o == e or e in o.parents) and (e / "manifest.json").is_file():
        raise InvalidInputError(f"{flag} {out}: is inside the engines folder {engines}, which holds only what "
                                "arc2face-export writes; choose another --out")


def check_output_file(path: str | Path) -> Path:
    """Check, leaving nothing behind, that a file can be written at `path` (its folder is a writable
    folder or can be made into one)."""
    path = Path(path)
    try:
        check_output_dir(path.parent)
        _check_name_lengths(path, _nearest_existing(path, "--out"), "--out", "choose a shorter name")
    except InvalidInputError as e:
        why = str(e).split(": ", 1)[-1]
        raise InvalidInputError(f"--out {path}: cannot be written ({path.parent}: {why})") from None
    return path


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


def read_image_params(path: Path) -> dict | None:
    """The parameters a finished arc2face-rt PNG records, or None when the file is not one (unreadable,
    truncated, another image, no parameters). An image of another size is answered from its header, so
    a large foreign PNG is not decoded."""
    if not path.is_file():
        return None
    try:
        params, _, mode = read_png_params(path, size=(IMAGE_SIZE, IMAGE_SIZE))
    except Arc2FaceError:
        return None
    return params if mode == "RGB" else None


def params_differ(got: dict, want: dict) -> list[str]:
    """The recorded parameters that differ (the arc2face-rt version is not a parameter of the image)."""
    return sorted(k for k in set(want) | set(got) if k != "arc2face_rt" and got.get(k) != want.get(k))


def is_same_image(path: Path, want: dict) -> bool:
    """Whether `path` is a finished image with exactly these parameters."""
    got = read_image_params(path)
    return got is not None and not params_differ(got, want)


def plan_resume(existing: dict[int, Path], expected, legacy_engines: str | None = None) -> set[int]:
    """The indices among `existing` that are finished images of this run (`expected(i)` gives image
    i's parameters; `legacy_engines`: `provenance.legacy_engine_id`): --resume skips them. Anything
    else at one of this run's names is refused before any work, never replaced: a finished image with
    other parameters is another run's, and a file that is not a complete arc2face-rt PNG is not ours
    (ours are written whole or not at all)."""
    done = set()
    for i, path in sorted(existing.items()):          # folders and links there: refused by FolderRun.check
        got = read_image_params(path)
        if got is None:
            raise InvalidInputError(f"{path}: is not an image this run wrote (unreadable, incomplete, or a PNG "
                                    "without arc2face-rt parameters); move it away or choose another --out/--prefix")
        want = expected(i)
        got = as_current(got, want, legacy_engines)     # an older version's name of the same graphs
        diff = params_differ(got, want)
        if diff:
            k = diff[0]
            raise InvalidInputError(
                f"{path}: was made with other parameters ({k}: {got.get(k)!r} there, {want.get(k)!r} now"
                f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); --resume only continues the same "
                "run: choose another --out/--prefix/--seed, or pass --overwrite")
        done.add(i)
    return done
