"""Where OpenVINO keeps compiled blobs, and the record that says what they were compiled with.

OpenVINO's model cache (CACHE_DIR) stores one blob per compiled graph, keyed by OpenVINO itself from
the model, the device and the compile options, so a second process imports the blob instead of
compiling. We add a folder choice and a record:

- compiled blobs are facts about this machine's CPU, like the integrity stamps, so they live in
  arc2face-rt's per-user cache (`integrity.cache_dir()`: $ARC2FACE_CACHE_DIR, else
  $XDG_CACHE_HOME/arc2face-rt, else ~/.cache/arc2face-rt) under `openvino/<engines id>/`; the engines
  folder (which may be read-only, and which a refused command must leave as it was) is never written.
  ARC2FACE_OV_CACHE=DIR puts the cache in DIR/<engines id>, ARC2FACE_OV_CACHE=0 turns it off; without
  a writable folder every process compiles (an info log says so).
- `record.json` in that folder names the OpenVINO version and the CPU (model, ISA flags, OpenVINO
  capabilities) the blobs were made with, and per compiled stage and inference precision the graph's
  sha256 (from the manifest). When the version or the CPU differs (a shared home folder, an upgrade)
  every blob is deleted and compiled again, instead of importing a blob made for other hardware.
- the record also says when the entry was last used (`used`) and from which engines folders
  (`folders`). Re-exporting a folder gives it a new engines id, so a new cache entry; when the new one
  first opens, the entry of the old graphs is released (`release_folder`) and deleted once idle for an
  hour, which keeps the cache from growing by a blob set per re-export. `arc2face-rt cache` lists,
  prunes and clears entries (`user_cache.py`).
Writes of the record are atomic (temporary file, then rename).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..argtypes import env_path
from ..errors import Arc2FaceError
from ..fileio import loads_json, read_regular_file
from ..manifest import write_json_atomic

log = logging.getLogger("arc2face_rt")

RECORD = "record.json"
MAX_RECORD_BYTES = 1 << 20         # a record names a few folders; anything larger is not ours
FORMAT = "arc2face-rt-openvino-cache"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def user_cache_root() -> Path:
    from ..integrity import cache_dir

    return cache_dir() / "openvino"


def cache_root() -> Path | None:
    """The folder holding one cache entry per engines id: ARC2FACE_OV_CACHE, else the per-user cache's
    `openvino/`; None when ARC2FACE_OV_CACHE=0 turns the cache off."""
    env = env_path("ARC2FACE_OV_CACHE")
    if env == "0":
        return None
    return Path(env) if env else user_cache_root()


def choose_cache_dir(key: str) -> Path | None:
    """The cache folder for one engines folder (`key`: its engine id), created; None when off or unwritable."""
    root = cache_root()
    if root is None:
        return None
    folder = root / key
    if _writable(folder):
        return folder
    log.info("OpenVINO cache: %s is not writable; every process compiles its graphs", folder)
    return None


class CompileCache:
    """One cache folder and its record; `prepare(stage, ...)` before compiling a stage into it."""

    def __init__(self, folder: Path, openvino: str, cpu: dict, source: str | Path | None = None):
        """`source`: the engines folder whose graphs are compiled into `folder` (None for the face models)."""
        self.folder, self.openvino, self.cpu = folder, openvino, cpu
        self.record = read_record(folder)
        usable = usable_record(self.record)
        if not usable or self.record["openvino"] != openvino or self.record["cpu"] != cpu:
            if self.record and not usable:
                log.info("OpenVINO cache %s: its %s is damaged; recompiling", folder, RECORD)
            elif self.record:
                log.info("OpenVINO cache %s was made with OpenVINO %s on %s; recompiling for OpenVINO %s on %s",
                         folder, self.record.get("openvino"), (self.record.get("cpu") or {}).get("model"),
                         openvino, cpu.get("model"))
            self._clear()
            self.record = {"format": FORMAT, "openvino": openvino, "cpu": cpu, "compiled": {}}
        self._note_use(source)

    def _note_use(self, source) -> None:
        """Stamp the entry as used now, from `source`; an entry that `source` used before under another
        engines id (its graphs were re-exported since) is released (`release_folder`)."""
        self.record["used"] = time.time()
        self.record.pop("released", None)
        if source is not None:
            src = str(Path(source).resolve())
            if src not in self.record.setdefault("folders", []):
                self.record["folders"].append(src)
                release_folder(self.folder.parent, src, keep=self.folder.name)
        self._write()

    def _write(self) -> None:
        """Write the record, merged with what another process wrote since we read it (its folders and
        compiled stages are kept, so two processes using one entry do not drop each other's)."""
        disk = read_record(self.folder)
        if usable_record(disk) and (disk["openvino"], disk["cpu"]) == (self.openvino, self.cpu):
            self.record["folders"] = list(dict.fromkeys(disk.get("folders", []) + self.record.get("folders", [])))
            self.record["compiled"] = {**disk["compiled"], **self.record["compiled"]}
        try:
            write_json_atomic(self.folder / RECORD, self.record)
        except OSError as e:
            log.info("OpenVINO cache: cannot write %s (%s)", self.folder / RECORD, e)

    def _clear(self) -> None:
        for p in self.folder.iterdir():
            if p.is_file() and p.suffix == ".blob":
                try:
                    p.unlink()
                except OSError as e:
                    log.info("OpenVINO cache: cannot delete %s (%s)", p, e)

    def prepare(self, stage: str, precision: str, hint: str, graph_sha256: str) -> None:
        """Note that `stage` is compiled here with inference precision `hint` as part of a `precision`
        run, from the graph with `graph_sha256` (OpenVINO keys the blob itself)."""
        key, want = f"{stage}:{hint}", {"run_precision": precision, "graph_sha256": graph_sha256}
        if self.record["compiled"].get(key) != want:
            self.record["compiled"][key] = want
            self._write()


def read_record(entry: Path) -> dict:
    """The record of one cache entry folder: {} when missing, unreadable or not ours (an entry is ours
    when its record says so). The fields are as the file has them: see `usable_record`."""
    try:       # a regular file of sane size: a FIFO or /dev/zero put there must not hang or fill memory
        rec = loads_json(read_regular_file(entry / RECORD, MAX_RECORD_BYTES, what="cache record"))
    except (OSError, ValueError, Arc2FaceError):
        return {}
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else {}


def usable_record(rec: dict) -> bool:
    """Whether a record's fields have the types this module writes (else the entry is made anew)."""
    folders = rec.get("folders", [])
    return (isinstance(rec.get("openvino"), str) and isinstance(rec.get("cpu"), dict)
            and isinstance(rec.get("compiled"), dict) and isinstance(folders, list)
            and all(isinstance(f, str) for f in folders))


def record_used(rec: dict) -> float | None:
    """The record's last-use time (Unix seconds), or None when missing or not a plausible time."""
    t = rec.get("used")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    try:
        t = float(t)
    except OverflowError:
        return None
    return t if 0 <= t < 4102444800 else None          # NaN and inf fail too; 4102444800 is 2100-01-01


_KEY = r"(?:[0-9a-f]{16}|face-models)"      # the names `choose_cache_dir` gives: an engine id, the face models
NAME = re.compile(rf"^{_KEY}$")
TRASH = re.compile(rf"^\.removing-{_KEY}-[0-9]+$")


def is_entry(p: Path, any_folder: bool = False) -> bool:
    """A cache entry: a real folder (not a link) holding a record of ours, or one of our removals left
    behind; with `any_folder` (the per-user root) also a folder without a record that has the name we
    give entries (its record was never written). Other folders are never ours, even in that root (an
    ARC2FACE_CACHE_DIR may name a folder that has an unrelated openvino/ in it)."""
    if not p.is_dir() or p.is_symlink():
        return False
    return bool(TRASH.match(p.name)) or bool(read_record(p)) or (any_folder and bool(NAME.match(p.name)))


def root_is_ours() -> bool:
    """Whether the cache root is the per-user one (not a folder ARC2FACE_OV_CACHE names, which other
    programs may share)."""
    return not env_path("ARC2FACE_OV_CACHE")


def remove_entry(entry: Path) -> None:
    """Delete one cache entry: renamed out of the way first (a process that opens the entry next
    finds it gone, never half-deleted), then removed. Raises OSError (naming the file it failed on);
    a folder renamed but not removed stays an entry (`is_entry`), so the next removal tries again."""
    if entry.is_symlink() or not entry.is_dir():
        raise NotADirectoryError(20, "not a cache folder (a link or a file); left alone", str(entry))
    trash = entry if TRASH.match(entry.name) else entry.with_name(f".removing-{entry.name}-{os.getpid()}")
    if trash != entry:
        entry.rename(trash)
    shutil.rmtree(trash)


RELEASED_IDLE_S = 3600.0       # a released entry unused this long is deleted when another entry opens


def release_folder(root: Path, source: str, keep: str) -> None:
    """The engines folder `source` now holds other graphs: remove it from every entry of `root` but
    `keep`. An entry no folder uses any more is marked `released`; a released entry idle for
    RELEASED_IDLE_S is deleted (one still in use elsewhere, say a shared cache where another machine
    has other graphs at the same path, refreshes its `used` time and is kept; `cache prune` deletes
    released entries at once)."""
    try:
        entries = [p for p in root.iterdir() if p.name != keep and not TRASH.match(p.name) and is_entry(p)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        rec = read_record(entry)
        if not usable_record(rec):
            continue
        try:
            if source in rec.get("folders", []):
                rec["folders"].remove(source)
                if not rec["folders"]:
                    rec["released"] = now
                write_json_atomic(entry / RECORD, rec)
            if "released" in rec and now - (record_used(rec) or 0.0) > RELEASED_IDLE_S:
                remove_entry(entry)
                log.info("OpenVINO cache: deleted %s, compiled from graphs its engines folder no longer holds", entry)
        except OSError as e:
            log.info("OpenVINO cache: cannot update %s (%s)", entry, e)
