"""What an export may replace in an engines folder, and how it swaps the new files in.

`arc2face-export` writes only these names into an engines folder: `manifest.json`, the stage graphs
and plans (`<stage>.onnx`, `<stage>.onnx.data`, `<stage>.int8.onnx[.data]`, `<stage>.fp8.onnx[.data]`, `<stage>.plan`,
`<stage>.ort-cuda.onnx[.data]` (ONNX Runtime CUDA fusions), `<stage>.ov-int8.xml/.bin` (OpenVINO int8), the face
stages `detector` and `arcface` included) and the caches `timing.cache` and `<stage>.rtcache`.
`onnx --force` replaces a folder only when every entry in it is one of these (a `.gitkeep` and the
tools' own tagged temporary files aside, `.NAME.arc2face-HOST-PID-RANDOM.tmp`: a killed run's are
removed first, a running one's are left alone): anything else means the folder is not ours, and is
refused. The caches are kept (the TensorRT libraries check them against themselves), the rest of the
old export goes.

`swap_in` makes the replacement recoverable: the old files are first renamed into a tagged temporary folder,
then the new ones are moved in (never over a file: one that another export wrote meanwhile stops this one),
manifest last; any failure puts everything back as it was, and the old files are deleted only after the new
manifest is in place. A folder caught mid-swap (power loss) has no manifest, so no tool trusts it, and the
backup folder is removed by the next export as a stale temporary.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import is_temp_name, locked, set_usual_modes, temp_dir
from arc2face_rt.errors import InvalidInputError, OutputExistsError
from arc2face_rt.fileio import loads_json
from arc2face_rt.specs import ALL_STAGES

_STAGE_NAMES = "|".join(re.escape(n) for n in (*ALL_STAGES, *mf.FACE_STAGES))
ARTEFACT = re.compile(rf"^(?:{_STAGE_NAMES})(?:(?:\.int8|\.fp8|\.ort-cuda)?\.(?:onnx|onnx\.data|plan)|\.ov-int8\.(?:xml|bin))$")
CACHE = re.compile(rf"^(?:timing\.cache|(?:{_STAGE_NAMES})\.rtcache)$")
KEPT_ALWAYS = (".gitkeep",)


def _foreign_manifest(folder: Path) -> str | None:
    """Why a folder's manifest.json is someone else's: a JSON object without our `format`. One that
    cannot be read as an object at all is a damaged one of ours (what `--force` is there to repair)."""
    try:
        m = loads_json((folder / mf.MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(m, dict) and m.get("format") != mf.FORMAT:
        return f"format {m.get('format')!r}, not an engines manifest"
    return None


def foreign_entry(folder: Path) -> str | None:
    """The first entry of `folder` that this tool does not write (None when every one is ours, our
    tagged temporary files included)."""
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.name in KEPT_ALWAYS or is_temp_name(e.name):
            continue
        if e.is_dir(follow_symlinks=False):
            return f"{e.name}/"
        if e.name == mf.MANIFEST:
            why = _foreign_manifest(folder)
            if why:
                return f"{e.name} ({why})"
        elif not (ARTEFACT.match(e.name) or CACHE.match(e.name)):
            return e.name
    return None


def check_recorded(folder: Path, names, recorded, what: str) -> None:
    """Refuse (OutputExistsError, before any work) to replace an entry `names` of `folder` that the
    manifest does not list in `recorded` (a record's {file: ...}) as `what`: a file of ours by name only
    is someone else's, and is kept. A folder at such a name is refused too."""
    for name in names:
        p = folder / name
        if not os.path.lexists(p):
            continue
        why = ("is a folder" if p.is_dir() and not p.is_symlink() else None if name in (recorded or {}) else
               f"exists and {mf.MANIFEST} does not record it as this folder's {what}")
        if why:
            raise OutputExistsError(f"{p}: {why}, so it is not replaced; move it out of {folder}, then run again")


def writing(folder: str | Path):
    """`atomic.locked` on an existing engines folder while an arc2face-export command writes it: another
    one writing the same folder on this machine is refused at once (two build-engines runs each wrote
    their manifest over the other's: a plan its record does not describe). A folder that does not exist
    yet is not locked (an export into a new folder refuses a second one by itself)."""
    return locked(folder, "arc2face-export command")


def refuse_folders_at(paths) -> None:
    """Refuse (InvalidInputError, before any work) a path where build-engines writes a file (a plan, the
    timing cache, a face model's copy) that a folder occupies: a file cannot replace it, and --force
    replaces only files."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            raise InvalidInputError(f"{p}: is a folder, where build-engines writes the file {p.name}; move or "
                                    "remove the folder, then run build-engines again")


def replaced_entries(folder: Path) -> list[str]:
    """The entries of an engines folder that a new export replaces: its manifest and stage artefacts."""
    return sorted(e.name for e in os.scandir(folder)
                  if not e.is_dir(follow_symlinks=False) and (e.name == mf.MANIFEST or ARTEFACT.match(e.name)))


def swap_in(out_dir: Path, new_dir: Path, old: list[str], last: str = mf.MANIFEST) -> None:
    """Replace the entries `old` of `out_dir` by the files of `new_dir` (`last` moved in last), all or
    nothing; new files get the usual mode (0666 less the umask). See the module docstring."""
    backup = temp_dir(out_dir, "previous-export")
    moved_aside: list[str] = []
    moved_in: list[str] = []
    new = sorted(p.name for p in new_dir.iterdir() if p.name != last) + [last]
    set_usual_modes(new_dir)
    try:
        for name in old:
            os.rename(out_dir / name, backup / name)
            moved_aside.append(name)
        for name in new:
            try:
                _move_no_replace(new_dir / name, out_dir / name)
            except FileExistsError:
                raise OutputExistsError(f"{out_dir / name}: written by another export meanwhile; not replaced. Let "
                                        "one export write into a folder at a time, then run again (--force "
                                        "replaces an export)") from None
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            try:
                os.rename(out_dir / name, new_dir / name)
            except OSError:
                pass
        for name in reversed(moved_aside):
            try:
                os.rename(backup / name, out_dir / name)
            except OSError:
                pass
        _remove_if_empty(backup)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _move_no_replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError): a hard link, which never replaces, then
    the unlink of `src`. On a file system without hard links: a check, then the rename."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:                 # something could not be put back: it stays, named as our temporary
        pass
