"""TensorRT backend: plans built by `arc2face-export build-engines`, run with cuda-python (no torch).

    plan.py     which library (`tensorrt`, else `tensorrt_rtx`), whether it can run on this GPU, and
                checking a plan against its manifest record before it is deserialised
    session.py  TrtSession (one plan, one execution context) and SharedDeviceMemory
    step.py     TrtStepSession: the denoise loop on the device as one CUDA graph per signature
    generator.py  TrtGenerator: projector, loop and decoder of one batch on one stream, one host sync
                (two on a signature's first batch: the warm-up before the capture)

Nothing here imports TensorRT or touches the GPU until a plan is opened.
"""
from __future__ import annotations

from pathlib import Path

from ...specs import STEP_STAGES   # step_cfg, step and their ControlNet variants
from .plan import import_trt, is_rtx, library_info, unusable_reason
from .session import SharedDeviceMemory, TrtSession
from .step import TrtStepSession
from .generator import TrtGenerator

__all__ = ["SharedDeviceMemory", "TrtGenerator", "TrtSession", "TrtStepSession", "import_trt", "is_rtx", "library_info",
           "open_session", "open_sessions", "unusable_reason"]


def open_session(plan_path: str | Path, memory: SharedDeviceMemory | None = None, **kw) -> TrtSession:
    """A TrtStepSession for step plans (they have denoise_loop), a TrtSession otherwise."""
    cls = TrtStepSession if Path(plan_path).stem in STEP_STAGES else TrtSession
    return cls(plan_path, memory=memory, **kw)


def open_sessions(engines_dir: str | Path, stages, **kw) -> dict[str, TrtSession]:
    """Sessions for `stages` of an engines folder, sharing one activation buffer (they run in sequence)."""
    engines_dir = Path(engines_dir)
    memory = SharedDeviceMemory()
    sessions = {}
    try:
        for s in stages:
            sessions[s] = open_session(engines_dir / f"{s}.plan", memory=memory, **kw)
    except BaseException:
        for sess in sessions.values():
            sess.close()
        memory.close()
        raise
    return sessions
