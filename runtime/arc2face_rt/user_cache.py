"""What arc2face-rt keeps in the per-user cache, and how it is pruned (`arc2face-rt cache`).

Two kinds of entry, both facts about this machine that are cheap to make again:
- `openvino`: a folder of compiled OpenVINO blobs per engines id (about the size of the graphs it
  was compiled from: gigabytes at full size) and the face models' entry, in `ov_cache.cache_root()`;
  its `record.json` says when it was last used and from which engines folders;
- `stamps`: one small JSON per engines folder with the verified hashes of its files
  (`integrity.stamp_dir()`).
Deleting any entry costs only time: the next run compiles or hashes again.

`prune` deletes the entries not used for `older_than_days` and those whose engines folders are all
gone; `clear` deletes every entry. An OpenVINO entry is renamed out of the way before it is removed, so
a process that opens it at that moment finds it missing (and compiles), never half-deleted.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends.ov_cache import cache_root, read_record, remove_entry
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

    @property
    def folders_gone(self) -> bool:
        """True when the entry names engines folders and none of them exists any more."""
        return bool(self.folders) and not any(os.path.isdir(f) for f in self.folders)

    def stale(self, older_than_days: float, now: float) -> str:
        """Why `prune` deletes this entry, or ""."""
        if self.folders_gone:
            return "its engines folder is gone" if len(self.folders) == 1 else "its engines folders are gone"
        if now - self.used > older_than_days * DAY:
            return f"not used for {(now - self.used) / DAY:.0f} days"
        return ""


def _tree_size(path: Path) -> tuple[int, float]:
    """Bytes of the regular files below `path` and the newest mtime among them."""
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
    root = cache_root()
    if root is None or not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        rec = read_record(p)
        size, newest = _tree_size(p)
        used = rec.get("used") if isinstance(rec.get("used"), (int, float)) else newest
        folders = [f for f in rec.get("folders", []) if isinstance(f, str)] if isinstance(rec.get("folders"), list) else []
        if rec:
            cpu = rec.get("cpu") if isinstance(rec.get("cpu"), dict) else {}
            detail = f"OpenVINO {str(rec.get('openvino')).split('-')[0]}, {cpu.get('model', 'unknown CPU')}"
        else:
            detail = "no record (not made by arc2face-rt, or by an older version)"
        out.append(CacheEntry("openvino", p, size, float(used or 0.0), folders, detail))
    return out


def _stamp_entries() -> list[CacheEntry]:
    root = stamp_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.glob("*.json")):
        try:
            st = p.stat()
            data = json.loads(p.read_text()) if st.st_size < 64 << 20 else {}
        except (OSError, ValueError, RecursionError):
            continue
        data = data if isinstance(data, dict) else {}
        folder = data.get("folder")
        if not isinstance(folder, str):         # written before stamps named their folder: infer it
            files = data.get("files") if isinstance(data.get("files"), dict) else {}
            folder = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
        n = len(data.get("files") or {})
        out.append(CacheEntry("stamps", p, st.st_size, st.st_mtime, [folder] if folder else [], f"{n} file(s)"))
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
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
