"""Cost of the ControlNet (pose) step next to the base step: `python -m benchmarks control`.

One random-weight checkpoint with controlnet/ (written into the cache, reused), exported with the
base and control step graphs (fp32; the CFG variants, guidance 3), then per batch size the median
seconds of one step call of `step_cfg` and of `step_cfg_control` with ONNX Runtime on this machine's
device (CPU here; CUDA where onnxruntime-gpu has a GPU), same inputs, after a warm-up call.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

STAGES = ("step_cfg", "step_cfg_control")


def _ensure(size: str, cache: Path, say) -> Path:
    from arc2face_export.onnx_export import export_all
    from arc2face_ref.random_ckpt import write_random_checkpoint

    model = cache / f"model-{size}-controlnet"
    if not (model / "controlnet" / "config.json").is_file():
        say(f"writing a random {size} checkpoint with controlnet/ to {model}")
        write_random_checkpoint(model, size=size, seed=0, face_models=False, controlnet=True, force=True)
    engines = cache / f"engines-{size}-fp32-control"
    export_all(model, engines, stages=STAGES, progress=say)
    return engines


def bench_control(size: str = "tiny", batches=(1,), repeats: int = 3, device: str = "auto",
                  cache: Path = Path("benchmarks/.cache"), say=print) -> dict:
    from arc2face_export.onnx_export import example_inputs
    from arc2face_rt.backends.ort import OrtSession
    from arc2face_rt.specs import ALL_STAGES

    engines = _ensure(size, Path(cache), say)
    rows = []
    for name in STAGES:
        sess = OrtSession(engines / f"{name}.onnx", device=device)
        for b in batches:
            feeds = example_inputs(ALL_STAGES[name], b)
            sess.run(feeds)                                          # warm-up: allocations, kernels
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                sess.run(feeds)
                times.append(time.perf_counter() - t)
            rows.append({"stage": name, "batch": b, "providers": sess.providers,
                         "step_s": {"median": round(statistics.median(times), 4), "min": round(min(times), 4)},
                         "repeats": repeats})
            say(f"{name:18s} batch {b}: {statistics.median(times):.3f} s/step on {sess.providers[0]}")
        sess.close()
    base = {r["batch"]: r["step_s"]["median"] for r in rows if r["stage"] == "step_cfg"}
    for r in rows:
        r["vs_step_cfg"] = round(r["step_s"]["median"] / base[r["batch"]], 3)
    return {"kind": "control", "size": size, "precision": "fp32", "backend": "ort", "guidance": 3.0,
            "batches": list(batches), "rows": rows, "inputs": "example_inputs (unit normals, control in [0, 1])",
            "threads": _ort_threads(), "np": np.__version__}


def _ort_threads():
    import os
    return os.environ.get("ARC2FACE_ORT_THREADS", "default")
