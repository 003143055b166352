"""ONNX Runtime on CUDA, variants side by side (gpu-check's `ort` phase).

Step loop: for an exported engines folder this opens the CFG step graph as an OrtStepSession once per
variant (the `--ort-cuda` fused graph or the plain fp16 graph; ONNX Runtime's CUDA graph on/off;
cuDNN's convolution search by heuristic or exhaustive; for the fused graph, each convolution's bias
added inside cuDNN's convolution, "conv-bias", and TF32 allowed alone, "tf32"), and for each batch
times the first loop (session warm-up and graph capture included) and warm loops (median of
`repeats`), each ending in its one host sync. Latents of each variant are compared with those of the
plain graph without a CUDA graph (relative L2), so a variant that is fast but wrong shows.

VAE decode: the plain and fused graphs under both convolution searches, and the fused one with
"conv-bias", with an ONNX Runtime profile (time per op type and per node) of the first variant measured.

On a GPU, the variants without a CUDA graph ("fused", "fused+conv-bias", "plain"), the first VAE
variant measured and the VAE's "fused+conv-bias" also get `kernels_batch_N`: GPU time per CUDA
kernel and per kernel family from CUPTI (`gpu_kernels.py`), per step at the largest batch for the
loop, per decode at batch 1 for the VAE. ONNX Runtime's own profile times nodes on the host, which on
CUDA is mostly the launch.

A variant that cannot be opened, or that fails while it runs (a fused kernel refusing a shape, a CUDA
graph capture error, out of memory), is recorded with its "error" and the next one runs; a CUDA graph
ONNX Runtime refused at load is recorded as "cuda_graph_refused".
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .env import onnxruntime_in_use
from .gpu_kernels import kernel_profile
from .loop_timing import loop_inputs, rel_l2, time_denoise_loop

# every variant sets these, so one exported before gpu-check ran changes no baseline
BASE = {"ARC2FACE_ORT_CONV_SEARCH": "HEURISTIC", "ARC2FACE_ORT_TF32": "0", "ARC2FACE_ORT_FUSE_CONV_BIAS": "0"}
# cuDNN adds each convolution's bias inside the convolution (the fused graphs then allow TF32, which ONNX
# Runtime needs for that plan): in 20261127T220618Z the separate bias kernel took 9% of the fused step.
# "tf32" alone tells what allowing TF32 does by itself (fp16 convolutions may then pick other plans).
CONV_BIAS = {**BASE, "ARC2FACE_ORT_FUSE_CONV_BIAS": "1"}
TF32 = {**BASE, "ARC2FACE_ORT_TF32": "1"}

# name: (graph file of the stage, CUDA graph on, environment while the session opens)
VARIANTS = {
    "fused+graph": ("{stage}.ort-cuda.onnx", True, BASE),
    "fused": ("{stage}.ort-cuda.onnx", False, BASE),
    "fused+graph+conv-bias": ("{stage}.ort-cuda.onnx", True, CONV_BIAS),
    "fused+conv-bias": ("{stage}.ort-cuda.onnx", False, CONV_BIAS),
    "fused+graph+tf32": ("{stage}.ort-cuda.onnx", True, TF32),
    "plain+graph": ("{stage}.onnx", True, BASE),
    "plain+graph+exhaustive": ("{stage}.onnx", True, {**BASE, "ARC2FACE_ORT_CONV_SEARCH": "EXHAUSTIVE"}),
    "plain": ("{stage}.onnx", False, BASE),
}
REFERENCE = "plain"
KERNEL_PROFILED = ("fused", "fused+conv-bias", "plain")   # no CUDA graph: each kernel is launched where it is seen


@contextlib.contextmanager
def envs_set(values: dict):
    """env_set for each of `values` (name: value) while the block runs."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(env_set(name, value))
        yield


@contextlib.contextmanager
def env_set(name: str, value: str | None):
    """Set (or, for None, leave alone) one environment variable while the block runs; children inherit it."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:500]}"


def fused_failed(ort_json: dict) -> str | None:
    """Why the fused graphs did not run in an `ort` phase result (every fused step variant has an error,
    or none was measured), or None when one ran."""
    fused = {k: v for k, v in (ort_json.get("variants") or {}).items() if k.startswith("fused")}
    if any(v.get("batches") and "error" not in v for v in fused.values()):
        return None
    errors = [f"{k}: {v.get('error') or v.get('skipped') or 'not measured'}" for k, v in fused.items()]
    return "; ".join(errors) or "no fused variant in the ort phase"


def fused_off_before(out: Path, rows: bool = False) -> str | None:
    """Why a gpu-check DIR's `ort` phase (ort.json) found no fused graph running, and with `rows`, why
    its `row:ort` (row-ort.json) went without them; None when neither says so."""
    f, row = out / "ort.json", out / "row-ort.json"
    doc = json.loads(f.read_text()) if f.is_file() else {}
    why = fused_failed(doc) if doc.get("status") == "ok" else None
    if why:
        return f"no fused step graph ran in the ort phase ({why[:500]})"
    said = json.loads(row.read_text()).get("fused_graphs", "") if rows and row.is_file() else ""
    return f"row:ort went without them ({said[5:][:500]})" if said.startswith("off: ") else None


def fused_note(fused_off: str | None) -> str:
    """`fused_graphs` of a result: which ONNX Runtime graphs ran, and why not the fused ones."""
    return f"off: {fused_off}" if fused_off else "used where the folder has them"


def measure_ort_loop(engines: Path, steps: int, guidance: float, batches=(1, 4), repeats: int = 3,
                     device: str = "cuda") -> dict:
    from arc2face_rt.backends.ort_loop import CudaLoopOptions, OrtStepSession
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.manifest import load_manifest
    from arc2face_rt.schedulers import make_schedule

    m = load_manifest(engines)
    sched = make_schedule("dpmpp2m", steps, m.get("scheduler_config"))
    rng = np.random.default_rng(0)
    cond_one = (rng.standard_normal((1, 77, 768)) * 0.5).astype(np.float32)
    out = {"engines": str(engines), "precision": m.get("precision"), "steps": steps, "guidance": guidance,
           "onnxruntime": onnxruntime_in_use(), "variants": {}}
    latents = {}
    for name, (file, graph, env) in VARIANTS.items():
        path = engines / file.format(stage="step_cfg")
        if not path.is_file():
            out["variants"][name] = {"skipped": f"{path.name} is not in the folder"}
            continue
        t = time.perf_counter()
        try:
            with envs_set(env):
                sess = OrtStepSession(path, device=device, options=CudaLoopOptions(cuda_graph=graph))
        except EngineMismatchError as e:      # e.g. the fused graph where only the CPU provider runs
            out["variants"][name] = {"graph": path.name, "error": str(e)[:300]}
            continue
        res = out["variants"][name] = {
            "graph": path.name, "conv_search": env["ARC2FACE_ORT_CONV_SEARCH"], "env": env,
            "load_s": time.perf_counter() - t, "providers": sess.providers,
            "cuda_graph": sess.cuda_graph, "cuda_graph_refused": sess.cuda_graph_refused, "batches": {}}
        try:
            for b in batches:
                lat, stats = time_denoise_loop(sess, sched, cond_one, b, guidance, repeats)
                res["batches"][str(b)] = {**stats, "images_per_s_steps_only": b / stats["loop_median_s"]}
                latents[(name, b)] = lat
        except Exception as e:  # noqa: BLE001 - a variant that fails at run time: recorded, the others still run
            res["error"] = _error_text(e)
        else:
            if sess.on_gpu and name in KERNEL_PROFILED:
                x, cond, table = loop_inputs(sched, cond_one, max(batches))
                res[f"kernels_batch_{max(batches)}"] = _kernels(
                    lambda: sess.denoise_loop(x, cond, table, guidance), per=len(table))
        finally:
            sess.close()
    for (name, b), lat in latents.items():
        ref = latents.get((REFERENCE, b))
        if ref is not None:
            out["variants"][name]["batches"][str(b)][f"rel_l2_vs_{REFERENCE}"] = rel_l2(lat, ref)
    return out


VAE_VARIANTS = {
    "fused": ("vae_decoder.ort-cuda.onnx", BASE),
    "fused+conv-bias": ("vae_decoder.ort-cuda.onnx", CONV_BIAS),
    "fused+exhaustive": ("vae_decoder.ort-cuda.onnx", {**BASE, "ARC2FACE_ORT_CONV_SEARCH": "EXHAUSTIVE"}),
    "plain": ("vae_decoder.onnx", BASE),
    "plain+exhaustive": ("vae_decoder.onnx", {**BASE, "ARC2FACE_ORT_CONV_SEARCH": "EXHAUSTIVE"}),
}
VAE_KERNEL_PROFILED = ("fused+conv-bias",)   # besides the first variant measured, which gets ORT's profile too


def measure_vae_decode(engines: Path, batches=(1,), repeats: int = 3, top: int = 12, device: str = "cuda") -> dict:
    """The VAE decode on ONNX Runtime CUDA per variant (median of `repeats` warm runs, host latents to
    host pixels, through the backend's own session), and an ONNX Runtime profile of the first
    variant's runs summarised by op type and by node (where the time goes)."""
    import onnxruntime as ort

    from arc2face_rt.backends.ort import OrtSession
    from arc2face_rt.errors import EngineMismatchError

    out = {"variants": {}}
    rng = np.random.default_rng(0)
    profiled = False
    for name, (file, env) in VAE_VARIANTS.items():
        path = engines / file
        if not path.is_file():
            out["variants"][name] = {"skipped": f"{path.name} is not in the folder"}
            continue
        try:
            with envs_set(env):
                sess = OrtSession(path, device=device)
        except EngineMismatchError as e:
            out["variants"][name] = {"graph": path.name, "error": str(e)[:300]}
            continue
        res = out["variants"][name] = {"graph": path.name, "conv_search": env["ARC2FACE_ORT_CONV_SEARCH"],
                                       "env": env, "providers": sess.providers, "batches": {}}
        try:
            for b in batches:
                lat = {"latents": rng.standard_normal((b, 4, 64, 64)).astype(np.float32)}
                t = time.perf_counter()
                sess.run(lat)
                first = time.perf_counter() - t
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    sess.run(lat)
                    times.append(time.perf_counter() - t)
                res["batches"][str(b)] = {"first_s": first, "median_s": statistics.median(times)}
            if not profiled:                   # a second session of the same graph, with ORT's profiler
                res["profile_batch_1"] = _profile(ort, path, env, sess.on_gpu, engines, rng, repeats, top)
            if sess.on_gpu and (not profiled or name in VAE_KERNEL_PROFILED):
                one = {"latents": rng.standard_normal((1, 4, 64, 64)).astype(np.float32)}
                res["kernels_batch_1"] = _kernels(lambda: sess.run(one))
            profiled = True
        except Exception as e:  # noqa: BLE001 - a variant that fails at run time: recorded, the others still run
            res["error"] = _error_text(e)
        finally:
            sess.close()
    return out


def _kernels(run, per: int = 1) -> dict:
    """kernel_profile, whose failure (no CUDA torch, CUPTI busy) is recorded instead of losing the variant."""
    try:
        return kernel_profile(run, calls=1, per=per)
    except Exception as e:  # noqa: BLE001
        return {"error": _error_text(e)}


def _profile(ort, path: Path, env: dict, on_gpu: bool, engines: Path, rng, repeats: int, top: int) -> dict:
    import json

    from arc2face_rt.backends.ort import CPU_EP, CUDA_EP, FUSED_SUFFIX, cuda_provider_options

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(engines.parent / "vae-profile")
    with envs_set(env):
        providers = [(CUDA_EP, cuda_provider_options(path.name.endswith(FUSED_SUFFIX))), CPU_EP] if on_gpu else [CPU_EP]
        profile = ort.InferenceSession(str(path), so, providers=providers)
    lat = {"latents": rng.standard_normal((1, 4, 64, 64)).astype(np.float32)}
    for _ in range(repeats + 1):
        profile.run(None, lat)
    trace = Path(profile.end_profiling())
    summary = _summarise_profile(json.loads(trace.read_text()), top)
    trace.unlink()
    return summary


def _summarise_profile(events: list, top: int) -> dict:
    """Kernel time per op type and per node in the last run of an ONNX Runtime profile (the earlier
    runs include cuDNN's algorithm search)."""
    runs = [e for e in events if e.get("name") == "model_run"]
    lo, hi = (runs[-1]["ts"], runs[-1]["ts"] + runs[-1]["dur"]) if runs else (float("-inf"), float("inf"))
    by_op, by_node = {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not lo <= e["ts"] <= hi:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_op[op] = by_op.get(op, 0) + e["dur"]
        by_node[node] = by_node.get(node, 0) + e["dur"]

    def ms(d):
        return sorted(((k, round(v / 1e3, 3)) for k, v in d.items()), key=lambda kv: -kv[1])[:top]
    return {"ms_by_op": ms(by_op), "ms_by_node": ms(by_node), "total_ms": round(sum(by_op.values()) / 1e3, 3),
            "run_ms": round((hi - lo) / 1e3, 3) if runs else None}
