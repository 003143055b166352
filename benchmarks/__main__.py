"""`python -m benchmarks`. Where arc2face-rt is not installed (a device machine runs the repository as
it was copied there), the repository's runtime/, export/ and reference/ folders go first on the path."""
import importlib.util
import sys

from . import env

if importlib.util.find_spec("arc2face_rt") is None:
    sys.path[:0] = [str(env.REPO / d) for d in env.PACKAGE_DIRS]

from arc2face_rt.entry import quiet_libraries, stderr_to_devnull_when_closed  # noqa: E402

from .cli import main  # noqa: E402

quiet_libraries()
stderr_to_devnull_when_closed()

sys.exit(main())
