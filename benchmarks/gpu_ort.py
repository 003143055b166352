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


VAE_VARIANTS = {
    "default": {},
    "algo-heuristic": {"cudnn_conv_algo_search": "HEURISTIC"},
    "nhwc": {"prefer_nhwc": "1"},
    "no-max-workspace": {"cudnn_conv_use_max_workspace": "0"},
}


def measure_vae_decode(engines: Path, batches=(1,), repeats: int = 3, top: int = 12) -> dict:
    """The VAE decode graph on ONNX Runtime CUDA under CUDA provider option variants (median of
    `repeats` warm runs from host latents to host pixels), and an ONNX Runtime profile of the
    default variant's warm run summarised by op type and by node (where the time goes)."""
    import json

    import onnxruntime as ort

    from arc2face_rt.backends.ort import _preload_cuda_libraries

    _preload_cuda_libraries(ort)
    path = engines / "vae_decoder.onnx"
    out = {"graph": str(path), "variants": {}}
    rng = np.random.default_rng(0)
    for name, extra in VAE_VARIANTS.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        profile = name == "default"
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(engines.parent / "vae-profile")
        try:
            sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0", **extra}),
                                                                 "CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a variant this build refuses is recorded
            out["variants"][name] = {"error": str(e)[:300]}
            continue
        res = {"options": extra, "providers": sess.get_providers(), "batches": {}}
        for b in batches:
            lat = rng.standard_normal((b, 4, 64, 64)).astype(np.float32)
            t = time.perf_counter()
            sess.run(None, {"latents": lat})
            first = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                sess.run(None, {"latents": lat})
                times.append(time.perf_counter() - t)
            res["batches"][str(b)] = {"first_s": first, "median_s": statistics.median(times)}
        if profile:
            res["profile"] = _summarise_profile(json.loads(Path(sess.end_profiling()).read_text()), repeats + 1, top)
        out["variants"][name] = res
    return out


def _summarise_profile(events: list, runs: int, top: int) -> dict:
    """Kernel time per op type and per node of an ONNX Runtime profile, averaged over its last run."""
    by_op, by_node = {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_op[op] = by_op.get(op, 0) + e["dur"]
        by_node[node] = by_node.get(node, 0) + e["dur"]
    n = max(runs, 1)

    def ms(d):
        return sorted(((k, round(v / n / 1e3, 3)) for k, v in d.items()), key=lambda kv: -kv[1])[:top]
    return {"ms_per_run_by_op": ms(by_op), "ms_per_run_by_node": ms(by_node),
            "total_ms_per_run": round(sum(by_op.values()) / n / 1e3, 3)}
