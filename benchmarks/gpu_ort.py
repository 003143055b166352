"""ONNX Runtime's device-resident step loop on CUDA, its variants side by side (gpu-check's `ort` phase).

For an exported engines folder this opens `step_cfg.onnx` as an OrtStepSession once per variant
(ONNX Runtime CUDA graph on/off, `prefer_nhwc` on/off), and for each batch times the first loop
(session warm-up and graph capture included) and warm loops (median of `repeats`), each ending in its
one host sync. Latents of each variant are compared with those of the variant without a CUDA graph
(relative L2), so a variant that is fast but wrong shows.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

VARIANTS = {"graph": (True, False), "no-graph": (False, False), "graph+nhwc": (True, True)}


def measure_ort_loop(engines: Path, steps: int, guidance: float, batches=(1, 4), repeats: int = 3,
                     device: str = "cuda") -> dict:
    from arc2face_rt.backends.ort_loop import CudaLoopOptions, OrtStepSession
    from arc2face_rt.manifest import load_manifest
    from arc2face_rt.pipeline import image_noise
    from arc2face_rt.schedulers import make_schedule

    m = load_manifest(engines)
    sched = make_schedule("dpmpp2m", steps, m.get("scheduler_config"))
    table = sched.table()
    rng = np.random.default_rng(0)
    cond_one = (rng.standard_normal((1, 77, 768)) * 0.5).astype(np.float32)
    out = {"engines": str(engines), "precision": m.get("precision"), "steps": steps, "guidance": guidance,
           "variants": {}}
    latents = {}
    for name, (graph, nhwc) in VARIANTS.items():
        t = time.perf_counter()
        sess = OrtStepSession(engines / "step_cfg.onnx", device=device,
                              options=CudaLoopOptions(cuda_graph=graph, prefer_nhwc=nhwc))
        res = {"load_s": time.perf_counter() - t, "providers": sess.providers, "cuda_graph": sess.cuda_graph,
               "batches": {}}
        for b in batches:
            x = np.stack([image_noise(0, i, sched)[0] for i in range(b)])
            cond = np.repeat(cond_one, b, axis=0)
            t = time.perf_counter()
            lat = sess.denoise_loop(x, cond, table, guidance)
            first = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                sess.denoise_loop(x, cond, table, guidance)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            res["batches"][str(b)] = {"first_loop_s": first, "loop_median_s": med, "per_step_ms": med / steps * 1e3,
                                      "images_per_s_steps_only": b / med}
            latents[(name, b)] = lat
        sess.close()
        out["variants"][name] = res
    for (name, b), lat in latents.items():
        ref = latents.get(("no-graph", b))
        if ref is not None:
            rel = float(np.linalg.norm(lat - ref) / max(np.linalg.norm(ref), 1e-12))
            out["variants"][name]["batches"][str(b)]["rel_l2_vs_no_graph"] = rel
    return out
