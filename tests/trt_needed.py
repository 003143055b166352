"""Tests that build TensorRT plans skip where no builder library (tensorrt or tensorrt_rtx) is installed."""
from __future__ import annotations

import pytest

from arc2face_rt.errors import BackendUnavailableError


def tensorrt():
    """(arc2face_export.trt_build, the TensorRT library); skips the calling test module, or test, without them."""
    trt_build = pytest.importorskip("arc2face_export.trt_build")
    try:
        return trt_build, trt_build.import_trt()
    except BackendUnavailableError:
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed", allow_module_level=True)
