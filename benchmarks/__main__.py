"""`python -m benchmarks`. Where arc2face-rt is not installed (a device machine runs the repository as
it was copied there), the repository's runtime/, export/ and reference/ folders go first on the path."""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("arc2face_rt") is None:
    _repo = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(_repo / d) for d in ("runtime", "export", "reference")]

from .cli import main  # noqa: E402

sys.exit(main())
