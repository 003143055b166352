"""What arc2face-rt keeps in the per-user cache, and how it is pruned (`arc2face-rt cache`).

Two kinds of entry, both facts about this machine that are cheap to make again:
- `openvino`: a folder of compiled OpenVINO blobs per engines id (about the size of the graphs it
  was compiled from: gigabytes at full size) and the face models' entry, in `ov_cache.cache_root()`;
  its `record.json` says when it was last used and from which engines folders;
- `stamps`: one small JSON per engines folder with the verified hashes of its files
  (`integrity.stamp_dir()`).
Deleting any entry costs only time: the next run compiles or hashes again.

`prune` deletes the entries released by a re-export, those whose engines folders are all gone and those not
used for `older_than_days`; `clear` deletes every entry. An OpenVINO entry is renamed out of the way before it
is removed, so a process that opens it at that moment finds it missing (and compiles), never half-deleted.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends.ov_cache import TRASH, cache_root, is_entry, read_record, record_used, remove_entry, root_is_ours
from .fileio import loads_json
from .integrity import stamp_dir

DAY = 86400.0


@dataclass
class CacheEntry:
    kind: str                       # "openvino" or "stamps"
    path: Path
    bytes: int
    used: float                     # Unix time of the last use (the record's, else the newest file's mtime)
    folders: list[str] = field(default_factory=list)    # engines folders the entry was made from
    detail: str = ""
    leftover: bool = False          # what a removal that did not finish left behind
    released: bool = False          # its engines folder was re-exported (no folder uses it)

    @property
    def folders_gone(self) -> bool:
        """True when the entry names engines folders and none of them exists any more."""
        return bool(self.folders) and not any(os.path.isdir(f) for f in self.folders)

    def stale(self, older_than_days: float, now: float) -> str:
        """Why `prune` deletes this entry, or ""."""
        if self.leftover:
            return "an earlier removal did not finish"
        if self.released:
            return "its engines folder was re-exported"
        if self.folders_gone:
            return "its engines folder is gone" if len(self.folders) == 1 else "its engines folders are gone"
        if now - self.used > older_than_days * DAY:
            return f"not used for {(now - self.used) / DAY:.0f} days"
        return ""


def _tree_size(path: Path) -> tuple[int, float]:
    """Bytes of the regular files below `path` (links not followed) and the newest mtime among them."""
    total, newest = 0, 0.0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def _openvino_entries() -> list[CacheEntry]:
    """The entries of the OpenVINO cache root (`ov_cache.is_entry`): folders with a record of ours and
    leftovers of our unfinished removals; in the per-user root also folders with our entry names whose
    record was never written. Anything else is never listed or deleted."""
    root = cache_root()
    if root is None or not root.is_dir():
        return []
    out = []
    ours = root_is_ours()
    for p in sorted(root.iterdir()):
        if not is_entry(p, any_folder=ours):
            continue
        size, newest = _tree_size(p)
        if TRASH.match(p.name):
            out.append(CacheEntry("openvino", p, size, newest, [], "left by a removal that did not finish",
                                  leftover=True))
            continue
        rec = read_record(p)
        if not rec:
            out.append(CacheEntry("openvino", p, size, newest, [], "no record (its record was not written)"))
            continue
        folders = [f for f in rec.get("folders", []) if isinstance(f, str)] if isinstance(rec.get("folders"), list) else []
        cpu = rec.get("cpu") if isinstance(rec.get("cpu"), dict) else {}
        detail = f"OpenVINO {str(rec.get('openvino')).split('-')[0]}, {cpu.get('model', 'unknown CPU')}"
        out.append(CacheEntry("openvino", p, size, record_used(rec) or newest, folders, detail,
                              released="released" in rec))
    return out


STAMP_NAME = re.compile(r"^[0-9a-f]{24}\.json$")       # integrity.StampStore's file names


def _stamp_folder(data) -> tuple[str, int]:
    """The engines folder a stamp file is about, and how many files it stamps ("" and 0 when unreadable)."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return "", 0
    files = [f for f in data["files"] if isinstance(f, str) and os.path.isabs(f)]
    folder = data.get("folder")
    if not isinstance(folder, str):              # written before stamps named their folder: infer it
        folder = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    return folder, len(data["files"])


def _stamp_entries() -> list[CacheEntry]:
    root = stamp_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not STAMP_NAME.match(p.name) or p.is_symlink() or not p.is_file():
            continue
        try:
            st = p.stat()
            data = loads_json(p.read_text()) if st.st_size < 64 << 20 else None
        except (OSError, ValueError):
            data, st = None, p.lstat()
        folder, n = _stamp_folder(data)
        out.append(CacheEntry("stamps", p, st.st_size, st.st_mtime, [folder] if folder else [],
                              f"{n} file(s)" if folder else "unreadable (the next run hashes again)"))
    return out


def scan() -> list[CacheEntry]:
    """Every entry of the per-user cache: the OpenVINO entries, then the stamp files."""
    return _openvino_entries() + _stamp_entries()


def remove(entry: CacheEntry) -> None:
    """Delete one entry. Raises OSError."""
    if entry.kind == "openvino":
        remove_entry(entry.path)
    else:
        entry.path.unlink()


def select(entries: list[CacheEntry], older_than_days: float | None, now: float | None = None
           ) -> list[tuple[CacheEntry, str]]:
    """The entries `prune` (`older_than_days`) or `clear` (None) deletes, each with the reason."""
    now = time.time() if now is None else now
    if older_than_days is None:
        return [(e, "clear") for e in entries]
    return [(e, why) for e in entries if (why := e.stale(older_than_days, now))]


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
