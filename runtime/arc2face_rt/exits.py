"""How every command-line tool (arc2face-rt, arc2face-export, arc2face-train, python -m benchmarks)
turns a failure into one line on stderr and an exit code.

Exit codes: 0 success, 1 partial result (e.g. `score` could not score every image), 2 a problem the
user can fix (bad input, missing or changed files, no space, no permission), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, SIGHUP).
Errors raised on purpose are `Arc2FaceError`s and carry their own message. Operating-system errors a
user can cause (a path that is a folder, a read-only or full disk, a missing file) are worded here
from their errno, with the file name. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from typing import Callable

from .errors import Arc2FaceError, OutputWriteError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_OS_FIX = {
    errno.ENOSPC: "no space left on the device; free some space and run again",
    errno.EDQUOT: "disk quota exceeded; free some space and run again",
    errno.EACCES: "permission denied; choose a path you can write/read, or fix its permissions",
    errno.EPERM: "operation not permitted; choose another path, or fix its permissions",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.EISDIR: "is a folder, where a file was expected; give a file path",
    errno.ENOTDIR: "part of this path is a file, where a folder was expected; check the path",
    errno.EEXIST: "already exists; choose another path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "file name too long; use a shorter path",
    errno.ELOOP: "too many levels of symbolic links; check the path",
    errno.EMFILE: "too many open files; raise the limit (`ulimit -n`) or process fewer files at once",
    errno.ENFILE: "too many open files on the system; try again later",
    errno.EIO: "input/output error from the disk or file system; check the device",
    errno.ENXIO: "no such device (a special file, not a regular one?); give a regular file",
    errno.EFBIG: ("file too large: over this process's file-size limit (`ulimit -f`) or the largest file this file "
                  "system holds; raise the limit or write elsewhere"),
    errno.ENOTEMPTY: "folder not empty",
    errno.EXDEV: "cannot move across file systems",
}


def os_error_reason(e: OSError | ValueError) -> str:
    """What happened and what to do, for an OSError, without the file names; a ValueError is what os
    calls raise for a name with a NUL byte."""
    if not isinstance(e, OSError):
        return "not a valid path (it contains a NUL byte)"
    return _OS_FIX.get(e.errno) or (e.strerror or str(e) or type(e).__name__).rstrip(".")


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the file(s) involved, what happened, what to do."""
    what = os_error_reason(e)
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an exception a user can cause and fix, or None for a bug."""
    if type(e).__module__ == "ray.exceptions" and isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause         # a Ray worker's exception (`dataset --ray`): its message, not Ray's traceback text
    if isinstance(e, Arc2FaceError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    if isinstance(e, MemoryError):
        return ("out of memory; lower --batch, close other programs, or use a machine with more memory"
                + (f" ({e})" if str(e) else ""))
    if isinstance(e, EOFError):
        return f"a file ended early ({e or 'unexpected end of file'}); it is truncated: write or download it again"
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler cancelling a job) or SIGHUP (the terminal closed),
    raised where Python can clean up: temporary files are removed and finished outputs kept, as
    after Ctrl-C."""


@contextlib.contextmanager
def resumable(kept: Callable[[], str], log: Callable[[str], None], bar=None,
              again: str | Callable[[], str] | None = None):
    """Long output-writing work that `--resume` can finish. However the block ends, `bar` (a progress
    bar) is closed. On Ctrl-C or SIGTERM, log one line saying what `kept()` is and how to finish
    (`again`, or what it returns when called then; default: the same command with --resume), then
    re-raise (marked reported). A failed write (a full disk, ...) or MemoryError becomes
    OutputWriteError with the same two facts."""
    def how() -> str:
        return (again() if callable(again) else again) or "run the same command with --resume to finish"
    try:
        yield
    except KeyboardInterrupt as e:
        if bar:
            bar.close()
        log(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}: {kept()}; {how()}")
        e.reported = True
        raise
    except (OSError, MemoryError) as e:
        if bar:
            bar.close()
        raise OutputWriteError(f"{user_error_message(e)}; {kept()}: {how()}") from e
    if bar:
        bar.close()


_seen: list[int] = []          # the stop signals run_cli's handler received during the current command


_held = 0                      # > 0 inside `holding_stops`
_deferred = False              # a stop that landed inside an import waits for the SIGALRM timer
_IMPORT_CODE = "<frozen importlib._bootstrap"   # the import machinery's frames (and _bootstrap_external's)
_ALARM = signal.SIGALRM if hasattr(signal, "setitimer") else None    # None on Windows
_RETRY_S = 0.02


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith(_IMPORT_CODE):
            return True
        frame = frame.f_back
    return False


def _cancel_deferred() -> None:
    global _deferred
    if _deferred:
        _deferred = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _stop(signum: int):
    """Raise the stop, once: a deferred one's timer is cancelled (it must not raise again inside the
    cleanup of this one)."""
    _cancel_deferred()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum, frame):
    """Raise the stop where Python code can clean up. Inside an import it waits until the import is
    over: an extension's initialisation (torch's) runs Python modules from C++, and an exception
    raised there makes C++ abort the process (no message, exit -6) instead of unwinding."""
    global _deferred
    _seen.append(signum)
    if _held:
        return
    if _ALARM is not None and _in_import(frame) and signal.getsignal(_ALARM) is _on_alarm:
        _deferred = True
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _stop(signum)


def _on_alarm(signum, frame):
    """A stop signal landed inside an import: raise it once the import has finished (and outside
    `holding_stops`, which raises it itself)."""
    if not _deferred or not _seen:
        return
    if _held or _in_import(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _stop(_seen[-1])


def check_interrupt() -> None:
    """Raise again a Ctrl-C or SIGTERM that arrived during this command but did not stop it: a library
    whose code was running when it landed (an import of a C extension, say) caught the
    KeyboardInterrupt, or turned it into another error, and went on. Long work calls this at safe
    points (the pipeline before each batch); outside run_cli it does nothing."""
    if _seen:
        _stop(_seen[-1])


def stop_requested() -> bool:
    """Whether a Ctrl-C or SIGTERM arrived during this command (see `holding_stops`)."""
    return bool(_seen)


@contextlib.contextmanager
def holding_stops():
    """Run a block with Ctrl-C and SIGTERM held. For C++ code that calls back into Python (TensorRT's
    logger and build progress monitor: raised inside such a callback, the exception is printed by
    the bindings as a stack dump and the C++ work goes on), and for steps that must not be cut in two
    (an atomic write's temporary file and its removal). A stop that arrives is recorded
    (`stop_requested`, which a progress callback can answer by cancelling) and raised when the block
    ends; one that arrived before the block is not raised again (the block may be the cleanup that
    handles it). Python runs signal handlers in the main thread only, so a block in another thread
    holds nothing: it would otherwise hold the main thread's stop, and raise it in its own thread."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = len(_seen)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if len(_seen) > before:
        _stop(_seen[-1])


STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def install_signal_handlers() -> dict:
    """Make Ctrl-C, SIGTERM and SIGHUP raise (and be remembered, see `check_interrupt`); returns the
    handlers replaced, to restore. A signal the process was started ignoring (`nohup`, `cmd &` in a
    script) stays ignored; off the main thread nothing is installed. SIGALRM, when nothing else uses
    it, carries a stop that landed inside an import to its end (see `_on_signal`). Also called again
    after a library (Ray) installed handlers of its own."""
    old = {}
    try:
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue
            if current is not _on_signal:
                old[sig] = signal.signal(sig, _on_signal)
        if _ALARM is not None and signal.getsignal(_ALARM) is signal.SIG_DFL:
            old[_ALARM] = signal.signal(_ALARM, _on_alarm)
    except ValueError:                  # not the main thread: leave signals alone
        pass
    return old


def _stopped(prog: str, reported: bool = False) -> int:
    term = bool(_seen) and _seen[-1] != signal.SIGINT
    if not reported:
        print(f"{prog}: {'terminated' if term else 'interrupted'}", file=sys.stderr)
    return EXIT_TERMINATED if term else EXIT_INTERRUPTED


def cli_main(parser, argv: list[str] | None = None) -> int:
    """The body of every tool's `main`: parse `argv` (argparse errors exit 2 in one line, see
    `argtypes.Parser`), log at INFO with -v/--verbose else WARNING, and run the chosen subcommand's
    `func(args)` under `run_cli`, named by the parser's prog."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return run_cli(lambda: args.func(args), parser.prog, verbose=args.verbose)


def run_cli(func: Callable[[], int], prog: str, verbose: bool = False) -> int:
    """Call `func` and turn user-caused failures into one stderr line and exit code 2.

    Ctrl-C gives one line and exit 130; SIGTERM and SIGHUP are handled like Ctrl-C (exit 143). The
    signals are remembered, so one that a library swallowed still ends the command (at the next
    `check_interrupt`, or when `func` returns or fails), never a traceback or a run that goes on; so
    does one the console script's own handler saw before this one replaced it. With
    `verbose`, the traceback of a mapped failure is logged too (for bug reports)."""
    global _held
    _held += 1                          # a stop while the handlers go in is recorded, raised below
    try:
        old = install_signal_handlers()
    finally:
        _held -= 1
    if old:                             # a Ctrl-C the console script's handler saw (entry.interruptible)
        _seen[:0] = getattr(old.get(signal.SIGINT), "stops_seen", ())
    try:
        check_interrupt()               # ... which a library swallowed: stop before starting
        code = func()
        return _stopped(prog) if _seen else code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) and not _seen:
            _seen.append(signal.SIGTERM)
        return _stopped(prog, reported=getattr(e, "reported", False))
    except BrokenPipeError:
        # `arc2face-rt score ... | head`: the reader left; stop quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as e:
        if _seen:                       # whatever a library made of the user's Ctrl-C
            return _stopped(prog)
        msg = user_error_message(e)
        if msg is None:
            raise
        msg = " ".join(msg.split())     # one line, whatever a library put in it
        if verbose:
            logging.getLogger(prog).exception("details")
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if _ALARM is not None and _ALARM in old:
            _cancel_deferred()                            # a deferred stop must not outlive the command
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if old:
            _seen.clear()
