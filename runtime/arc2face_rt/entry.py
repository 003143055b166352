"""The `arc2face-rt` console script. It imports nothing heavy itself, so Ctrl-C while numpy and ONNX
Runtime are still loading ends with one line and exit 130 rather than a traceback."""
from __future__ import annotations

import sys


def interruptible(prog: str, load_main):
    """Run `load_main()()` (import the CLI, then call it), turning Ctrl-C during the import into
    `PROG: interrupted` and exit 130."""
    try:
        return load_main()()
    except KeyboardInterrupt:            # the CLI handles it itself once it runs; this is the import
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main() -> int:
    def load():
        from .cli import main
        return main
    return interruptible("arc2face-rt", load)
