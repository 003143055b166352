"""The `arc2face-train` console script: Ctrl-C while torch is still loading ends with one line and
exit 130 rather than a traceback (see arc2face_rt.entry)."""
from __future__ import annotations

from arc2face_rt.entry import interruptible


def main() -> int:
    def load():
        from .cli import main
        return main
    return interruptible("arc2face-train", load)
