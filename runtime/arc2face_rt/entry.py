"""The console scripts' first code. It imports nothing heavy itself, so Ctrl-C while numpy, ONNX
Runtime or torch are still loading ends with one line and exit 130 rather than a traceback.

A KeyboardInterrupt that lands inside a C extension's import can surface as another exception
(numpy turns it into an ImportError), so the CLI is imported, and its parser built, under a SIGINT
handler that remembers the signal: whatever then raises, it was the user's Ctrl-C. That handler
stays until the command's own (`exits.run_cli`) replaces it, which takes over a Ctrl-C it saw that a
library swallowed: the command then stops before it starts. A Ctrl-C before `main()` has installed
the handler (Python's own start-up, the console script's first lines) is Python's: a traceback.

Before the import, `quiet_libraries` keeps two libraries' start-up noise off the terminal.
"""
from __future__ import annotations

import logging
import os
import signal
import sys


def _not_openvino_telemetry(record: logging.LogRecord) -> bool:
    return "openvino_telemetry" not in record.pathname


def quiet_libraries() -> None:
    """For a console script (never on import: a program using the Python API keeps its own settings):
    - ONNX Runtime's telemetry is off (ORT_DISABLE_TELEMETRY=1) unless the environment sets
      ORT_DISABLE_TELEMETRY itself. ONNX Runtime 1.31 starts it as it is imported, and where HOME
      cannot be written (a container, a service account) prints a colour-coded warning about its
      device id; a tool that handles face images sends nothing by default.
    - openvino_telemetry's warnings (through the root logger, as `import openvino` starts it, where
      it cannot write its consent folder in HOME) are dropped; its own opt-out is unchanged."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    root = logging.getLogger()
    if _not_openvino_telemetry not in root.filters:
        root.addFilter(_not_openvino_telemetry)


def stdout_writes_file_names() -> None:
    """For a console script: a file name that is not valid UTF-8 (its undecodable bytes held as
    surrogates, as Python reads such names) is written to stdout as its own bytes, as `ls` does, where
    a strict stream (a UTF-8 locale) would raise UnicodeEncodeError in the middle of a report."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and sys.stdout.errors == "strict":
        reconfigure(errors="surrogateescape")


def stderr_to_devnull_when_closed() -> None:
    """For a console script started with stderr closed (`2>&-`), where Python sets sys.stderr to None:
    status lines and progress bars go nowhere, instead of print() falling back to stdout and tqdm
    failing on None after the work has begun."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def interruptible(prog: str, load_main):
    """Import the CLI (`load_main()` returns its main) and run it; Ctrl-C before the command's own
    handler is in place (the import, building the parser) gives `PROG: interrupted` and exit 130. So
    does one that lands as the handler is installed or put back: the whole body is inside the one
    `except`. The handler's `stops_seen` is how `exits.run_cli` learns of a Ctrl-C a library swallowed."""
    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt
    on_sigint.stops_seen = seen

    quiet_libraries()
    stdout_writes_file_names()
    stderr_to_devnull_when_closed()
    previous = None
    try:
        try:                              # a Ctrl-C the process was started ignoring stays ignored
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:                # not the main thread
            pass
        try:
            main = load_main()
            if seen:                      # a library swallowed it during the import
                raise KeyboardInterrupt
            return main()
        except BaseException:
            if seen:                      # numpy, say, turned the KeyboardInterrupt into an ImportError
                raise KeyboardInterrupt from None
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main() -> int:
    def load():
        from .cli import main
        return main
    return interruptible("arc2face-rt", load)
