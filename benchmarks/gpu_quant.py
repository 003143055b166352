"""int8 and FP8 step plans against fp16 on a GPU with TensorRT (gpu-check's `quant` phase).

For the exported fp16 engines folder: writes the Q/DQ step graphs (`ensure_quant_graphs`, calibrated
on K=2 identities x every step, through ONNX Runtime on this GPU), then for fp16, int8 and (compute
capability >= 8.9) FP8 builds the step_cfg plan with `build_engines` (detailed profiling, so the
engine inspector reports layer precisions), times the device-resident denoise loop (first loop and
median of `repeats` warm ones, each ending in its one host sync), compares its latents with the fp16
plan's, and counts the engine's layers the inspector reports in int8 / FP8. Where TensorRT cannot run
(no GPU, or a GPU TensorRT-RTX does not target such as an H100), the phase is skipped with the reason:
these rows are pending until a GPU with TensorRT runs them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .loop_timing import rel_l2, time_denoise_loop


def inspector_precisions(engine, trt) -> dict:
    """{"layers": n, "int8": n, "fp8": n} from the engine inspector's JSON (detailed profiling)."""
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    texts = [json.dumps(layer).lower() if isinstance(layer, dict) else str(layer).lower() for layer in layers]
    return {"layers": len(layers), "int8": sum("int8" in t for t in texts),
            "fp8": sum("fp8" in t or "float8" in t or "e4m3" in t for t in texts)}


def measure_quant_steps(engines: Path, steps: int = 25, guidance: float = 3.0, batches=(1, 4), repeats: int = 3,
                        device: str = "cuda", say=print) -> dict:
    from arc2face_export.calib import Calibration
    from arc2face_export.quantize import QuantRecipe, ensure_quant_graphs
    from arc2face_export.trt_build import BuildOptions, build_engines
    from arc2face_rt.backends import cuda
    from arc2face_rt.backends.trt import import_trt, open_session, unusable_reason
    from arc2face_rt.schedulers import make_schedule

    reason = unusable_reason()
    if reason:
        # done, as a skipped harness row is: the call succeeded, the rows stay pending
        return {"status": "ok", "skipped": True, "reason": f"pending: TensorRT cannot run here ({reason})"}
    cc = cuda.compute_capability()
    precisions = ["int8"] + (["fp8"] if tuple(int(v) for v in cc.split(".")) >= (8, 9) else [])
    t = time.perf_counter()
    ensure_quant_graphs(engines, [QuantRecipe(p) for p in precisions], Calibration(identities=2, steps=steps),
                        stages=["step_cfg"], device=device)
    out = {"compute_capability": cc, "quantize_s": round(time.perf_counter() - t, 1), "steps": steps,
           "guidance": guidance, "precisions": {}}
    if "fp8" not in precisions:
        out["fp8"] = f"skipped: compute capability {cc} < 8.9"
    sched = make_schedule("dpmpp2m", steps)
    cond_one = (np.random.default_rng(0).standard_normal((1, 77, 768)) * 0.5).astype(np.float32)
    latents = {}
    trt = import_trt()
    opts = BuildOptions(batch=(1, max(batches), max(batches)), detailed_profile=True)
    for prec in ["fp16"] + precisions:
        say(f"quant: {prec} step_cfg plan")
        m = build_engines(engines, stages=["step_cfg"], precision=prec, options=opts, force=True)
        plan = m["plans"]["step_cfg"]
        res = {"build_s": plan["build_seconds"], "plan_mb": round(plan["bytes"] / 2**20, 1), "batches": {}}
        sess = open_session(engines / "step_cfg.plan")
        try:
            res["inspector"] = inspector_precisions(sess.engine, trt)
            for b in batches:
                latents[(prec, b)], res["batches"][str(b)] = time_denoise_loop(sess, sched, cond_one, b, guidance,
                                                                               repeats)
        finally:
            sess.close()
        out["precisions"][prec] = res
    for (prec, b), lat in latents.items():
        ref = latents[("fp16", b)]
        out["precisions"][prec]["batches"][str(b)]["latent_rel_l2_vs_fp16"] = rel_l2(lat, ref)
        fp16_ms = out["precisions"]["fp16"]["batches"][str(b)]["per_step_ms"]
        out["precisions"][prec]["batches"][str(b)]["speedup_vs_fp16"] = \
            fp16_ms / out["precisions"][prec]["batches"][str(b)]["per_step_ms"]
    return out
