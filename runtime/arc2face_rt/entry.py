"""The console scripts' first code. It imports nothing heavy itself, so Ctrl-C while numpy, ONNX
Runtime or torch are still loading ends with one line and exit 130 rather than a traceback.

A KeyboardInterrupt that lands inside a C extension's import can surface as another exception
(numpy turns it into an ImportError), so the import runs under a SIGINT handler that remembers the
signal: whatever the import then raises, it was the user's Ctrl-C. A Ctrl-C before `main()` has
installed that handler (Python's own start-up, the console script's first lines) is Python's: a
traceback.
"""
from __future__ import annotations

import signal
import sys


def interruptible(prog: str, load_main):
    """Import the CLI (`load_main()` returns its main) and run it; Ctrl-C during the import gives
    `PROG: interrupted` and exit 130 (once it runs, the CLI handles Ctrl-C itself)."""
    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:                                  # a Ctrl-C the process was started ignoring stays ignored
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        previous = None if ignored else signal.signal(signal.SIGINT, on_sigint)
    except ValueError:                    # not the main thread
        previous = None
    except KeyboardInterrupt:             # the Ctrl-C landed while the handler was being installed
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    try:
        main = load_main()
    except BaseException:
        if seen:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if seen:                               # the signal arrived as the import finished
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main() -> int:
    def load():
        from .cli import main
        return main
    return interruptible("arc2face-rt", load)
