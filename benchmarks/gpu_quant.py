"""int8 and FP8 step plans against fp16 on a GPU with TensorRT (gpu-check's `quant` phase).

For the exported fp16 engines folder: writes the Q/DQ step graphs (`ensure_quant_graphs`, calibrated
on K=2 identities x every step, through ONNX Runtime on this GPU), then for fp16, int8 and (compute
capability >= 8.9) FP8 at quant level 3 and again at level 2 (`fp8-level2`) builds the step_cfg plan
with `build_engines` (detailed profiling, so the engine inspector reports layer precisions), times the
device-resident denoise loop (first loop and median of `repeats` warm ones, each ending in its one host
sync), compares its latents with the fp16 plan's, and counts the engine's layers the inspector reports in int8 / FP8. Where TensorRT cannot run
(no GPU, or a GPU TensorRT-RTX does not target such as an H100), the phase is skipped with the reason:
these rows are pending until a GPU with TensorRT runs them. All of it happens in `<engines>-quant`, a
hard-linked copy of the folder, which keeps the folder's own plans for the other phases.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .loop_timing import rel_l2, time_denoise_loop

LEVEL2 = 2.0


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
    # the Q/DQ graphs and the fp16/int8/FP8 plans go to a hard-linked copy, so the folder the other
    # phases and rows use keeps its own plans (a step_cfg plan left in FP8 would be timed as fp16)
    engines = _working_copy(engines)
    cc = cuda.compute_capability()
    precisions = ["int8"] + (["fp8"] if tuple(int(v) for v in cc.split(".")) >= (8, 9) else [])
    cal = Calibration(identities=2, steps=steps)
    t = time.perf_counter()
    ensure_quant_graphs(engines, [QuantRecipe(p) for p in precisions], cal, stages=["step_cfg"], device=device)
    out = {"compute_capability": cc, "quantize_s": round(time.perf_counter() - t, 1), "steps": steps,
           "guidance": guidance, "precisions": {}}
    if "fp8" not in precisions:
        out["fp8"] = f"skipped: compute capability {cc} < 8.9"
    sched = make_schedule("dpmpp2m", steps)
    cond_one = (np.random.default_rng(0).standard_normal((1, 77, 768)) * 0.5).astype(np.float32)
    latents = {}
    trt = import_trt()
    opts = BuildOptions(batch=(1, max(batches), max(batches)), detailed_profile=True)
    # (row name, plan precision, quant level to re-quantise at first): FP8 also at level 2, the level
    # that kept the CPU quality gate (attention projections in fp16), so its speed cost is measured too
    variants = [("fp16", "fp16", None)] + [(p, p, None) for p in precisions]
    variants += [(f"fp8-level{LEVEL2:g}", "fp8", LEVEL2)] if "fp8" in precisions else []
    for name, prec, level in variants:
        if level is not None:
            say(f"quant: {prec} step graph at quant level {level:g}")
            t = time.perf_counter()
            ensure_quant_graphs(engines, [QuantRecipe(prec, level=level)], cal, stages=["step_cfg"], device=device)
            out[f"quantize_{name}_s"] = round(time.perf_counter() - t, 1)
        say(f"quant: {name} step_cfg plan")
        m = build_engines(engines, stages=["step_cfg"], precision=prec, options=opts, force=True)
        plan = m["plans"]["step_cfg"]
        res = {"precision": prec, "quant_level": float(level or 3.0) if prec != "fp16" else None,
               "build_s": plan["build_seconds"], "plan_mb": round(plan["bytes"] / 2**20, 1), "batches": {}}
        sess = open_session(engines / "step_cfg.plan")
        try:
            res["inspector"] = inspector_precisions(sess.engine, trt)
            for b in batches:
                latents[(name, b)], res["batches"][str(b)] = time_denoise_loop(sess, sched, cond_one, b, guidance,
                                                                               repeats)
        finally:
            sess.close()
        out["precisions"][name] = res
    for (name, b), lat in latents.items():
        row, fp16 = out["precisions"][name]["batches"][str(b)], out["precisions"]["fp16"]["batches"][str(b)]
        row["latent_rel_l2_vs_fp16"] = rel_l2(lat, latents[("fp16", b)])
        row["speedup_vs_fp16"] = fp16["per_step_ms"] / row["per_step_ms"]
    return out


def _working_copy(engines: Path) -> Path:
    """`<engines>-quant`, made anew as hard links of `engines` (copies where links cannot be made); the
    tools replace files by renaming, so the original's files are never written through a link."""
    import os
    import shutil

    work = engines.with_name(engines.name + "-quant")
    shutil.rmtree(work, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(engines, work, copy_function=link)
    return work
