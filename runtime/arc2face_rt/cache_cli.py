"""`arc2face-rt cache`: list, prune or clear what arc2face-rt keeps in the per-user cache
(compiled OpenVINO blobs, verification stamps); the library side is `user_cache`."""
from __future__ import annotations

import os
import sys
import time

from . import argtypes
from .backends.ov_cache import cache_root
from .errors import InvalidInputError, OutputWriteError
from .integrity import cache_dir
from .user_cache import CacheEntry, human_bytes, remove, scan, select

DEFAULT_OLDER_THAN_DAYS = 30


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list, prune or clear the per-user cache (compiled OpenVINO blobs, stamps)",
                       description="arc2face-rt keeps compiled OpenVINO blobs (about the size of the graphs, per "
                                   "engines folder) and file verification stamps in the per-user cache "
                                   "($ARC2FACE_CACHE_DIR, else $XDG_CACHE_HOME/arc2face-rt; OpenVINO blobs in "
                                   "$ARC2FACE_OV_CACHE when set). Deleting an entry costs only time: the next "
                                   "run compiles or hashes again.")
    p.add_argument("action", nargs="?", choices=("list", "prune", "clear"), default="list",
                   help="list (default): every entry with its size, last use and engines folder; prune: delete "
                        "entries released by a re-export, whose engines folders are gone, or not used for "
                        "--older-than days; clear: delete every entry")
    p.add_argument("--older-than", type=argtypes.number(0, 1e6, "a number of days"), default=None,
                   metavar="DAYS", help=f"prune: entries unused for longer than this (default {DEFAULT_OLDER_THAN_DAYS})")
    p.add_argument("--dry-run", action="store_true", help="prune/clear: say what would be deleted, delete nothing")
    p.set_defaults(func=cmd_cache)


def _when(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "unknown"
    except (ValueError, OverflowError, OSError):
        return "unknown"


def _line(e: CacheEntry) -> str:
    folders = ", ".join(f + ("" if os.path.isdir(f) else " (gone)") for f in e.folders) or "-"
    return f"{e.kind:8s} {human_bytes(e.bytes):>10s}  used {_when(e.used)}  {e.path.name}  {e.detail}; from {folders}"


def cmd_cache(args) -> int:
    # an option the action does not use is refused: `clear --older-than 30` meant as a prune would delete everything
    if args.older_than is not None and args.action != "prune":
        raise InvalidInputError(f"--older-than is for `cache prune`; `cache {args.action}` "
                                + ("deletes every entry" if args.action == "clear" else "lists every entry")
                                + ": use `arc2face-rt cache prune --older-than DAYS`")
    if args.dry_run and args.action == "list":
        raise InvalidInputError("--dry-run is for `cache prune` and `cache clear`; `cache list` deletes nothing")
    # a root that is a file would be listed as empty: a user would think nothing is cached
    for root, var in ((cache_dir(), "ARC2FACE_CACHE_DIR"), (cache_root(), "ARC2FACE_OV_CACHE")):
        if root is not None and root.exists() and not root.is_dir():
            where = f"{var}=" if argtypes.env_path(var) else "the cache folder "
            raise InvalidInputError(f"{where}{root}: is a file, not a folder; point {var} at a folder")
    entries = scan()
    if args.action == "list":
        for e in entries:
            print(_line(e))
        total = sum(e.bytes for e in entries)
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)}")
        return 0
    older_than = DEFAULT_OLDER_THAN_DAYS if args.older_than is None else args.older_than
    doomed = select(entries, older_than if args.action == "prune" else None)
    freed, deleted, failed = 0, 0, []
    for e, why in doomed:
        if not args.dry_run:
            try:
                remove(e)
            except FileNotFoundError:
                continue                    # another process removed it first
            except OSError as err:                # name the entry and why, not the fix for a write
                failed.append(f"{err.filename or e.path}: {(err.strerror or type(err).__name__).lower()}")
                continue
        freed, deleted = freed + e.bytes, deleted + 1
        print(f"{'would delete' if args.dry_run else 'deleted'} {e.kind} {e.path.name} ({human_bytes(e.bytes)}): "
              f"{why}", file=sys.stderr)
    verb = "would free" if args.dry_run else "freed"
    print(f"{deleted} of {len(entries)} entries, {verb} {human_bytes(freed)}")
    if failed:
        raise OutputWriteError(f"could not delete {len(failed)} cache entr{'y' if len(failed) == 1 else 'ies'}: "
                               + "; ".join(failed[:3]) + "; fix the permissions (or the mount) of the cache "
                               "folder, or delete them by hand")
    return 0
