"""Content checks of an engines folder against its manifest, paid once per version of each file.

The manifest records every file's sha256. Hashing a multi-GB UNet on every run would cost seconds,
so the first check of a file hashes it and keeps a *stamp*: the file's size, mtime_ns, ctime_ns,
inode and device together with the hash that matched. A later run that finds the same stat values
trusts the stamp and pays only a stat() per file; any write, copy, replacement or swap of the file
changes one of them (the kernel sets ctime on every change, and no user call can set it back), so
the file is hashed again. This catches corruption, truncation, swapped or re-exported files; it is
not a defence against someone with root access rewriting both a file and the clock.

Stamps are facts about this machine's files, so they live in the user's cache folder
(`$ARC2FACE_CACHE_DIR`, else `$XDG_CACHE_HOME/arc2face-rt`, else `~/.cache/arc2face-rt`), one small
JSON per engines folder; the engines folder itself may be read-only. A stamp that cannot be written
only means the next run hashes again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .argtypes import env_path
from .atomic import atomic_write
from .errors import Arc2FaceError, EngineMismatchError
from .fileio import loads_json, read_regular_file
from .manifest import refused, resolve_inside, sha256_file

log = logging.getLogger(__name__)

MODES = ("size", "stamp", "full")   # size only; content via stamps; content, hashing everything
_STAMP_VERSION = 1
_MAX_STAMP_BYTES = 64 << 20


def cache_dir() -> Path:
    """arc2face-rt's per-user cache folder (not created here)."""
    if chosen := env_path("ARC2FACE_CACHE_DIR"):
        return Path(chosen)
    base = env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arc2face-rt"


def stamp_dir() -> Path:
    """Where the stamps live: one JSON per engines folder (`arc2face-rt cache` lists and prunes them)."""
    return cache_dir() / "verified"


@dataclass
class VerifyReport:
    files: int = 0           # files checked
    hashed: int = 0          # of which hashed now (no valid stamp)
    hashed_bytes: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)   # relative path -> the `_file_key` it was checked with


def check_unchanged(engines_dir: str | Path, stats: dict, records: dict) -> None:
    """Raise EngineMismatchError when a file of `records` ({relative path: {"sha256", ...}}) checked into
    `stats` (a VerifyReport's) is no longer what was checked: another process (an export or build with
    --force) replaced or rewrote it with other content since. Called once a session has read its files,
    so a run never mixes two exports. A file whose size, mtime, inode or device moved is hashed again and
    kept when its content is still the recorded one (a copy renamed over it); a changed ctime alone (a
    chmod, a hard link made to it) is no change."""
    for rel, rec in records.items():
        if rel not in stats:
            continue
        p = resolve_inside(engines_dir, rel)
        try:
            now = _file_key(p.stat())
            same = now == stats[rel] or sha256_file(p) == rec["sha256"]
        except OSError:
            same = False
        if not same:
            raise EngineMismatchError(f"{p}: was replaced or rewritten while this run opened it (an export or "
                                      "build writing the folder?); run again once that has finished")
        stats[rel] = now


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _file_key(st: os.stat_result) -> list[int]:
    """Which file with which content, as far as metadata tells: `_stat_key` less the ctime, which a chmod or
    a hard link made to the file moves too."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


class StampStore:
    """The stamps of one engines folder: {real path of a file: [stat key..., sha256]}."""

    def __init__(self, engines_dir: Path):
        self.folder = str(Path(engines_dir).resolve())
        self.path = stamp_dir() / (hashlib.sha256(os.fsencode(self.folder)).hexdigest()[:24] + ".json")
        self.stamps: dict[str, list] = {}
        self.dirty = False
        try:
            data = loads_json(read_regular_file(self.path, _MAX_STAMP_BYTES, what="stamp file"))
            if isinstance(data, dict) and data.get("version") == _STAMP_VERSION and isinstance(data.get("files"), dict):
                self.stamps = data["files"]
        except (Arc2FaceError, ValueError):
            pass                      # no stamps yet, or not a stamp file we wrote: hash again

    def matches(self, real: str, st: os.stat_result, sha256: str) -> bool:
        return self.stamps.get(real) == _stat_key(st) + [sha256]

    def record(self, real: str, st: os.stat_result, sha256: str) -> None:
        self.stamps[real] = _stat_key(st) + [sha256]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        text = json.dumps({"version": _STAMP_VERSION, "folder": self.folder, "files": self.stamps}).encode()
        try:
            atomic_write(self.path, text, overwrite=True)
            self.dirty = False
        except OSError as e:
            log.info("could not save verification stamps to %s (%s); the next run checks the files again",
                     self.path, e)


def verify_records(engines_dir: str | Path, records: dict, mode: str = "stamp", fix: str | None = None) -> VerifyReport:
    """Check the files `records` ({relative path: {"sha256", "bytes"}}) of an engines folder.

    Every file must lie inside the folder (symbolic links resolved), exist and have its recorded size;
    with mode "stamp" or "full" its content must hash to the recorded sha256 ("stamp" skips files
    whose stamp still matches). Raises EngineMismatchError naming the file and the fix: `fix` when the
    files have a command of their own that writes them again, else the folder's re-export
    (`manifest.refused`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    engines_dir = Path(engines_dir)

    def fail(what: str) -> EngineMismatchError:
        return EngineMismatchError(f"{what}; {fix}") if fix else refused(engines_dir, what)

    report, t0 = VerifyReport(), time.perf_counter()
    store = StampStore(engines_dir) if mode != "size" else None
    try:
        for rel, rec in records.items():
            p = resolve_inside(engines_dir, rel)
            try:
                st = p.stat()
            except FileNotFoundError:
                raise fail(f"{p}: listed in the manifest but missing") from None
            if not p.is_file():
                raise fail(f"{p}: not a regular file")
            if st.st_size != rec["bytes"]:
                raise fail(f"{p}: {st.st_size} bytes, the manifest records {rec['bytes']} "
                           f"(truncated or replaced)")
            report.files += 1
            report.stats[rel] = _file_key(st)
            if store is None:
                continue
            real = str(p.resolve())
            if mode == "stamp" and store.matches(real, st, rec["sha256"]):
                continue
            digest = sha256_file(p)
            report.hashed += 1
            report.hashed_bytes += st.st_size
            if digest != rec["sha256"]:
                raise fail(f"{p}: content differs from the manifest (sha256 {digest[:12]}..., "
                           f"recorded {rec['sha256'][:12]}...): corrupt or replaced")
            st_after = p.stat()
            if _stat_key(st_after) == _stat_key(st):       # not rewritten while we hashed it
                store.record(real, st, rec["sha256"])
    finally:
        if store is not None:
            store.save()
    report.seconds = time.perf_counter() - t0
    if report.hashed:
        log.info("verified %d file(s) of %s by sha256 (%.1f GB, %.1f s); later runs check their stamps",
                 report.hashed, engines_dir, report.hashed_bytes / 1e9, report.seconds)
    return report
