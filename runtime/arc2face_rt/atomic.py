"""One way to write an output file: into a temporary file beside it, then into place.

Readers never see half a file, an interrupted write leaves nothing behind, and without `overwrite`
an existing file is never replaced (not even one that appears while we write).

A process killed mid-write (SIGKILL, power loss) cannot clean up, so temporary files and folders
carry the writer's host and process id: `.NAME.arc2face-HOST-PID-RANDOM.tmp`. `remove_stale_temps`
deletes the ones whose process is gone, and the next run in that folder calls it. Nothing else is
ever deleted.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import OutputExistsError, OutputWriteError
from .exits import holding_stops

_TAG = "arc2face"
_TEMP_RE = re.compile(r"^\..+\." + _TAG + r"-(?P<host>[A-Za-z0-9_.-]*)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
# another host's temporary file unchanged this long belongs to no live write: its liveness cannot be asked,
# and a live one can stay unchanged for many minutes (a dataset shard's staging folder between identities,
# a checkpoint or export folder while one large file is written). A minute removed a running shard's.
_STALE_AFTER_S = 24 * 3600.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:32]


_TEMP_NAME_BYTES = 120      # of an output's name in its temporary file's: the rest of the name takes up to 64


def _whole_characters(raw: bytes) -> bytes:
    """`raw` less a UTF-8 character cut in two at its end (bytes that are not UTF-8 stay as they are)."""
    i = len(raw) - 1
    while i >= 0 and len(raw) - i < 4 and raw[i] & 0xC0 == 0x80:      # continuation bytes
        i -= 1
    if i < 0:
        return raw
    lead = raw[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return raw[:i] if len(raw) - i < need else raw


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary files for output `name` (mkstemp adds RANDOM.tmp); a long
    name is cut, so that every name the file system takes (255 bytes) has a temporary one too."""
    raw = os.fsencode(name)
    if len(raw) > _TEMP_NAME_BYTES:
        name = os.fsdecode(_whole_characters(raw[:_TEMP_NAME_BYTES]))    # never half a character
    return f".{name}.{_TAG}-{_host()}-{os.getpid()}-"


def atomic_write(path: str | Path, data: bytes | memoryview | Callable[[BinaryIO], None], overwrite: bool = False,
                 hint: str = "choose another --out or pass --force") -> Path:
    """Write `data` (bytes, or a function that writes into a file object) to a temporary file beside
    `path`, flush it to the disk, then move it into place.

    A callable renders into memory first, so no library's unchecked writes (numpy's tofile ignores a
    failed fwrite) can leave a short file: every byte goes through os.write, which raises on a full
    disk or a file-size limit, and fsync surfaces errors a file system reports late. Outputs written
    this way are small (images, embeddings, JSON), or already in memory (TensorRT plans). Missing
    parent folders are made, and removed again if the write fails."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite:        # lexists: a dangling symbolic link counts too
        raise OutputExistsError(f"{path}: exists; {hint}")
    if overwrite and path.is_dir() and not path.is_symlink():     # os.replace's error names the temp file
        raise OutputExistsError(f"{path}: is a folder where this file goes; move it away")
    if callable(data):
        buf = io.BytesIO()
        data(buf)
        data = buf.getbuffer()
    with undo_new_folders(path.parent):        # a failed write leaves none of the folders it made
        with holding_stops():       # see _write_into_place
            _write_into_place(path, data, overwrite)
    return path


def _write_into_place(path: Path, data, overwrite: bool) -> None:
    """atomic_write's file-system part, run with Ctrl-C and SIGTERM held: a stop raised between
    creating the temporary file and binding its name, or inside the cleanup, would leave the file
    behind. A stop that arrives meanwhile is raised once the output is in place (or the temporary
    file gone)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())    # mkstemp makes 0600; outputs get the usual mode
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view[:1 << 24]):]
            os.fsync(fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None     # name the output, not the temp
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)              # fails if `path` appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputExistsError(f"{path}: appeared while this run was writing it (another process "
                                        "writing into the same folder?); not overwritten") from None
            except OSError:                     # filesystems without hard links
                os.replace(tmp, path)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # exists, owned by someone else
        return True
    return True


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of our temporary files or folders (`.NAME.arc2face-HOST-PID-RANDOM.tmp`),
    whether or not its writer still runs."""
    return bool(_TEMP_RE.match(name))


def temp_writer(name: str) -> str | None:
    """"host HOST, process PID" for one of our temporary files or folders, else None."""
    m = _TEMP_RE.match(name)
    return f"host {m['host']}, process {m['pid']}" if m else None


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether `path` is one of our temporary files whose writer is gone: written on this host by a
    process that no longer runs, or on another host (sharing the folder) and unchanged for a day."""
    m = _TEMP_RE.match(path.name)
    if not m:
        return False
    if m["host"] == _host():
        return not _process_alive(int(m["pid"]))
    try:
        return (now or time.time()) - path.lstat().st_mtime > _STALE_AFTER_S
    except OSError:
        return False


def usual_mode(folder: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from the umask, for outputs made by tools that
    create them private (mkstemp, mkdtemp, some library writers)."""
    return (0o777 if folder else 0o666) & ~_umask()


def set_usual_modes(root: str | Path) -> None:
    """Give every file and folder under `root` (a tree this process wrote) the usual mode: several
    writers (mkstemp, mkdtemp, safetensors, onnx's external data) make theirs private."""
    os.chmod(root, usual_mode(folder=True))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), usual_mode(folder=True))
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), usual_mode())


def temp_dir(parent: str | Path, name: str) -> Path:
    """A new temporary folder in `parent` for building `name`, named so `remove_stale_temps` knows it.
    It has the usual mode (not mkdtemp's 0700), so it can be renamed into place as the output."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name), suffix=".tmp"))
    os.chmod(path, usual_mode(folder=True))
    return path


@contextmanager
def undo_new_folders(path: str | Path):
    """Make folder `path` and its missing parents; if the block fails, remove those of them that this
    call made and are still empty, so a failed run leaves no folder behind that was not there before."""
    path = Path(path)
    made = make_folders(path)
    try:
        yield path
    except BaseException:
        remove_empty_folders(made)
        raise


def make_folders(path: str | Path) -> list[Path]:
    """Make folder `path` and its missing parents; return those this call made, deepest first. One that
    another process makes meanwhile is not counted (so it is never removed as ours). If making one
    fails, those made are removed again (when still empty) and the error is raised."""
    made: list[Path] = []
    try:
        for p in reversed(missing_folders(path)):
            try:
                os.mkdir(p)
            except FileExistsError:
                continue
            made.insert(0, p)
        Path(path).mkdir(parents=True, exist_ok=True)  # the error for a file at `path`; else nothing to do
    except BaseException:
        remove_empty_folders(made)
        raise
    return made


@contextmanager
def locked_folder(path: str | Path, who: str):
    """`undo_new_folders` and `locked` together, without their races: make folder `path`, lock it, and
    if the block fails remove the folders this call made (when still empty) before the lock is let go.
    A run refused because another holds the lock removes nothing: the folder is the other run's."""
    path = Path(path)
    made, held = make_folders(path), False
    try:
        with locked(path, who):
            held = True
            try:
                yield path
            except BaseException:
                remove_empty_folders(made)          # while the lock is held
                raise
    except BaseException as e:
        if not held and not isinstance(e, OutputExistsError):
            remove_empty_folders(made)
        raise


@contextmanager
def locked(folder: str | Path, who: str):
    """Hold an exclusive advisory lock (flock) on the existing folder `folder` while the block writes it;
    another command holding it (`who` names that kind of command) is refused at once with
    OutputExistsError. A folder that does not exist is not locked, nor is one whose file system has no
    flock for folders: on NFS Linux emulates flock with whole-file write locks, which a folder (opened
    read-only) cannot take, so no lock is taken there. It guards one machine's local file systems."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):                   # no flock (Windows), or no such folder yet
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputExistsError(f"{folder}: another {who} is writing this folder; run this one once "
                                        "it has finished") from None
            except OSError:                          # ENOLCK, EOPNOTSUPP: this file system cannot lock
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)                             # releases the lock


def missing_folders(path: str | Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first (above the first existing one all exist):
    what making `path` makes."""
    full = Path(os.path.abspath(path))
    made = []
    for p in (full, *full.parents):
        if os.path.lexists(p):
            break
        made.append(p)
    return made


def remove_empty_folders(made: list[Path]) -> None:
    """Remove the folders `made` (deepest first: `make_folders`'s or `missing_folders`'s list) that are
    empty, up to the first that is not."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            if os.path.lexists(p):      # not empty (or not ours to remove): nor are those above
                break
            # else never made, or gone: the failure was making it (a name too long to exist)


def remove_stale_temps(folder: str | Path) -> int:
    """Delete our own abandoned temporary files and folders in `folder`; return how many (never raises)."""
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(".tmp") and is_stale_temp(Path(e.path), now):
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed += 1
            except OSError:
                pass
    return removed


def _nearly_full(path: Path, below: int = 1 << 20) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has under `below` bytes free
    for this user."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free < below
        except OSError:
            continue
    return False


@contextmanager
def naming_output(final: str | Path, library_errors: tuple = (), staged: tuple[Path, Path] | None = None,
                  elsewhere: str | None = "choose another --out"):
    """Turn a failed write of output `final` (a full disk, a file-size limit) into one OutputWriteError
    that names it: an OSError, or one of `library_errors`, the types some writers raise for it instead
    (safetensors, torch.save, OpenVINO's save_model). With `staged` = (temporary folder, its final
    place), the file an OSError names inside the temporary folder is named where it would have ended
    up. `elsewhere`: the other way out the message offers (None for a command whose output place is
    fixed)."""
    try:
        yield
    except (OSError, *library_errors) as e:
        final = Path(final)
        if staged and isinstance(e, OSError) and e.filename and Path(e.filename).is_relative_to(staged[0]):
            final = staged[1] / Path(e.filename).relative_to(staged[0])
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
        why = why[0] if why else type(e).__name__
        if not isinstance(e, OSError) and "no space" not in why.lower() and \
                _nearly_full(staged[0] if staged else final.parent):
            why = f"no space left on device; the library said: {why}"   # its own words hide the cause
        raise OutputWriteError(f"{final}: could not be written ({why}); free some "
                               "space or raise the file-size limit (ulimit -f)"
                               + (f", or {elsewhere}" if elsewhere else "")) from None
