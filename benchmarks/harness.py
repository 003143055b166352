"""`python -m benchmarks run`: set up the model and engines, then measure each backend row in a child.

Parent: resolve device and precision, write the random checkpoint and export the engines when they
are missing (reused when current; OpenVINO int8 step graphs and TensorRT plans too when a row needs
them), count FLOPs, measure the device's peak rates once (a CPU: per precision), then for each
requested backend either record why it is skipped or run `python -m benchmarks _row` and collect
its row (OpenVINO rows: after a first child that compiles the graphs into the blob cache). A row
that crashes or times out is recorded as failed with the tail of its output; the run still writes
its results.

Child (`row_main`): cold start (load -> each torch.compile'd model compiled and timed on its own ->
first image), warm batch-1 latency (median of repeats),
throughput per batch size, the per-stage split, peak host RSS and peak GPU memory.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from . import env
from .flops import add_floor, flops_for

KNOWN = ("ort", "torch", "torch-compile", "diffusers", "diffusers-bf16", "trt", "openvino-fp32", "openvino-bf16",
         "openvino-int8")
TORCH_ROWS = ("torch", "torch-compile", "diffusers", "diffusers-bf16")
OPENVINO_ROWS = {"openvino-fp32": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}
STAGE_ORDER = ("detect", "embed", "project", "step", "steps", "decode")


@dataclass(frozen=True)
class RunOptions:
    """One `run`; each field is one CLI flag (see cli.py)."""
    size: str = "tiny"
    backends: tuple[str, ...] = KNOWN
    batches: tuple[int, ...] = (1, 4, 8, 16)
    steps: int = 25
    guidance: float = 3.0
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "auto"         # engines precision: auto | fp32 | fp16
    model_dir: str | None = None
    engines_dir: str | None = None
    cache_dir: str = str(env.REPO / "benchmarks" / ".cache")
    compile_on_cpu: bool = False
    compile_mode: str | None = None
    peak_tflops: float | None = None
    row_timeout_s: float | None = None
    smoke: bool = False


class Skip(Exception):
    """A row that cannot run here; the message says why and what would make it run."""


# ----------------------------------------------------------------------------- parent

def cuda_visible() -> bool:
    if env.gpu_info():
        return True
    if env.has_module("torch"):
        import torch
        return torch.cuda.is_available()
    return False


def _ort_has_cuda() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def availability(backend: str, device: str, opts: RunOptions) -> str | None:
    """None when the row can run on `device`, else the reason it cannot."""
    if backend not in KNOWN:
        return f"unknown backend {backend!r}; known: {', '.join(KNOWN)}"
    if backend in ("ort", "trt") and not env.has_module("onnxruntime"):
        return "onnxruntime is not installed (pip install 'arc2face-rt[cpu]', or [gpu] on an NVIDIA machine)"
    if backend == "ort" and device == "cuda" and not _ort_has_cuda():
        return ("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu instead of onnxruntime "
                "(or run with --device cpu)")
    if backend in TORCH_ROWS:
        missing = [m for m in ("torch", "diffusers", "transformers") if not env.has_module(m)]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'arc2face-rt[export]')"
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                return "this torch build has no CUDA (install a CUDA torch of the pinned range)"
    if backend == "diffusers-bf16" and device != "cpu":
        return "the bf16 diffusers row is the CPU comparison; on a GPU the diffusers row runs fp16"
    if backend in OPENVINO_ROWS:
        if device != "cpu":
            return "OpenVINO rows run on the CPU; measure them with --device cpu"
        if not env.has_module("openvino"):
            return "openvino is not installed (pip install 'arc2face-rt[openvino]')"
        if backend == "openvino-int8" and not (env.has_module("nncf") or opts.engines_dir):
            return "the int8 step graphs are made with nncf (pip install 'arc2face-rt[openvino,export]')"
    if backend in ("openvino-bf16", "diffusers-bf16") and device == "cpu" and env.has_module("openvino"):
        from arc2face_rt.backends.openvino import cpu_isa
        if not cpu_isa().bf16:
            return f"this CPU ({cpu_isa().summary()}) has no AMX-BF16 or AVX512-BF16"
    if backend == "torch-compile" and device == "cpu" and not opts.compile_on_cpu:
        return ("torch.compile of the UNet on a CPU takes minutes of Inductor C++ compiling per shape on this "
                "machine and is not what a CPU user would run; pass --compile-on-cpu to measure it anyway")
    if backend == "trt":
        if device != "cuda":
            return "TensorRT needs an NVIDIA GPU and none is visible (nvidia-smi / CUDA found no device)"
        from arc2face_rt.backends.trt import unusable_reason
        reason = unusable_reason()          # no library, no CUDA device, or a GPU the library cannot run on
        if reason:
            return reason
    return None


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _prepare_model(opts: RunOptions, say) -> tuple[Path, str | None]:
    """The model folder, and a reason every row must be skipped (missing checkpoint) or None."""
    from arc2face_rt.errors import MissingWeightsError

    if opts.model_dir:
        model_dir = Path(opts.model_dir)
        try:
            from arc2face_ref.loading import model_files
            model_files(model_dir)
        except MissingWeightsError as e:
            return model_dir, f"missing checkpoint: {e}"
        except ImportError:   # no torch here: the runtime rows only need the engines folder
            pass
        return model_dir, None
    from .export_bench import random_checkpoint

    try:
        return random_checkpoint(Path(opts.cache_dir), opts.size, say), None
    except ImportError as e:              # no torch/diffusers here (a device machine before `install`)
        model_dir = Path(opts.cache_dir) / f"model-{opts.size}"
        return model_dir, f"no checkpoint at {model_dir} and cannot write a random one ({e})"


def _prepare_engines(opts: RunOptions, model_dir: Path, precision: str, key: str, say, device: str = "cpu") -> Path:
    """The engines folder; with key "trt" it gets TensorRT plans, with "int8" OpenVINO int8 step graphs."""
    engines = Path(opts.engines_dir) if opts.engines_dir else Path(opts.cache_dir) / f"engines-{opts.size}-{precision}"
    from arc2face_rt.manifest import load_manifest
    if not opts.engines_dir:
        from arc2face_export.onnx_export import export_all
        from arc2face_rt.errors import OutputExistsError
        say(f"{precision} ONNX engines in {engines} (exported once, reused while current)")
        # On a GPU: the stages the rows run, each also with ONNX Runtime's CUDA fusions (`onnx --ort-cuda`)
        step = "step_cfg" if opts.guidance > 1 else "step"
        gpu = device == "cuda"
        stages = ("projector", step, "vae_decoder") if gpu else None
        fused = (step, "vae_decoder") if gpu and precision == "fp16" else ()
        try:
            export_all(model_dir, engines, precision=precision, progress=say, stages=stages, ort_cuda=fused)
        except OutputExistsError:       # another model's or an older export in the cache: replace it
            export_all(model_dir, engines, precision=precision, force=True, progress=say, stages=stages,
                       ort_cuda=fused)
    stage = "step_cfg" if opts.guidance > 1 else "step"
    if key == "int8" and stage not in load_manifest(engines).get("openvino_int8", {}):
        from arc2face_export.ov_int8 import ensure_ov_int8
        say(f"quantising {stage} of {engines} for OpenVINO int8 (reused by later runs)")
        ensure_ov_int8(engines, stages=(stage,), say=say)
    if key == "trt" and not load_manifest(engines).get("plans"):
        from arc2face_export.trt_build import build_engines
        say(f"building TensorRT plans in {engines} (reused by later runs)")
        build_engines(engines)
    return engines


def _row_cfg(opts: RunOptions, backend: str, model_dir: Path, engines, device: str, prepare_only=False) -> dict:
    return {"backend": backend, "size": opts.size, "model_dir": str(model_dir),
            "engines_dir": str(engines) if engines else None, "device": device,
            "ort_device": "cpu" if device == "cpu" else "cuda", "steps": opts.steps,
            "guidance": opts.guidance, "batches": list(opts.batches), "repeats": opts.repeats,
            "warmup": opts.warmup, "compile_mode": opts.compile_mode, "prepare_only": prepare_only,
            "cpu_precision": OPENVINO_ROWS.get(backend), "torch_dtype": "bf16" if backend.endswith("-bf16") else None,
            "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file()}


def _run_child(cfg: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="a2f-bench-") as tmp:
        cfg_path, res_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(cfg))
        envv = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(env.REPO), os.environ.get("PYTHONPATH")) if p))
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "benchmarks", "_row", str(cfg_path), str(res_path)],
                               cwd=env.REPO, env=envv, capture_output=True, text=True, timeout=timeout)
            rc, tail = p.returncode, (p.stderr or p.stdout)[-2500:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"stopped after {timeout} s (--row-timeout)"
        wall = round(time.perf_counter() - t, 1)
        partial = res_path.with_name("row.partial.json")
        if res_path.is_file():
            row = json.loads(res_path.read_text())
        elif partial.is_file():            # stopped (timeout, crash) after some measurements: keep them
            row = json.loads(partial.read_text())
            row["reason"] = (f"stopped after {wall} s (--row-timeout)" if rc == "timeout"
                             else f"row process ended with {rc}: {tail[-500:]}") + "; partial measurements kept"
            if row.get("under_way"):
                row["stopped_during"] = row.pop("under_way")
                row["reason"] += f"; it stopped during {row['stopped_during']}"
        else:
            row = {"status": "failed", "reason": f"row process ended with {rc} and no result: {tail}"}
        if row.get("status") == "failed" and "output_tail" not in row:
            row["output_tail"] = tail
        row["process_wall_s"] = wall
        return row


def measured(row: dict) -> bool:
    """A row with a batch-1 latency: complete, or stopped part-way (status "partial")."""
    return row.get("status") in ("ok", "partial") and bool(row.get("latency_s"))


def _add_baseline(rows: list[dict]) -> None:
    """vs_diffusers (the fp32 / GPU fp16 diffusers row) and vs_diffusers_bf16 (the CPU bf16 one) per row."""
    for base_name, key in (("diffusers", "vs_diffusers"), ("diffusers-bf16", "vs_diffusers_bf16")):
        base = next((r for r in rows if r["backend"] == base_name and measured(r)), None)
        if base is None:
            continue
        for r in rows:
            if not measured(r):
                continue
            r[key] = {
                "latency_speedup": base["latency_s"]["median"] / r["latency_s"]["median"],
                "throughput_speedup": {b: ips / base["throughput_ips"][b] for b, ips in r["throughput_ips"].items()
                                       if b in base["throughput_ips"]},
            }


def run(opts: RunOptions, say=print) -> dict:
    device = opts.device if opts.device != "auto" else ("cuda" if cuda_visible() else "cpu")
    precision = opts.precision if opts.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    say(f"device {device}, engines precision {precision}, size {opts.size}, {opts.steps} steps, "
        f"guidance {opts.guidance}, batches {list(opts.batches)}, repeats {opts.repeats}")
    result = {"schema": 1, "kind": "run", "created": env.now_utc(), "git": env.git_commit(),
              "machine": env.machine_info(), "libraries": env.library_versions(),
              "options": {**asdict(opts), "device_resolved": device, "precision_resolved": precision},
              "device_kind": device, "rows": []}
    backends = list(dict.fromkeys(opts.backends))
    model_dir, no_model = _prepare_model(opts, say)
    result["options"]["model_dir_resolved"] = str(model_dir)

    flops, peaks = None, {}
    try:
        flops = flops_for(opts.size, model_dir) if not no_model else None
    except Exception as e:   # e.g. no torch: the floor is then left out, the rows still run
        say(f"no FLOP counts ({type(e).__name__}: {e}); floor ratios left out")
    if opts.peak_tflops:
        peaks = {"given": {"tflops": opts.peak_tflops, "how": "given with --peak-tflops"}}
    elif flops and device == "cuda":
        say("measuring the peak compute rate")
        gpu = env.measure_gpu_peak_flops()
        peaks = {"fp16": gpu} if gpu else env.measure_cpu_peaks()
    elif flops:
        say("measuring the CPU's GEMM rate per precision (fp32, bf16, int8)")
        peaks = env.measure_cpu_peaks()
    # `peak`: the one rate older results had (fp32 on a CPU, fp16 on a GPU); `peaks`: per precision
    result["flops"], result["peaks"] = flops, peaks
    result["peak"] = next(iter(peaks.values()), None)

    engines_cache: dict = {}
    for backend in backends:
        row = {"backend": backend, "device": device}
        reason = availability(backend, device, opts)
        if reason is None and no_model and not (backend in ("ort", "trt") and opts.engines_dir):
            reason = no_model
        if reason is None and backend in ("ort", "trt") + tuple(OPENVINO_ROWS):
            key = {"trt": "trt", "openvino-int8": "int8"}.get(backend, "onnx")
            try:
                if key not in engines_cache:
                    engines_cache[key] = _prepare_engines(opts, model_dir, precision, key, say, device)
                if backend in OPENVINO_ROWS and not isinstance(engines_cache[key], Exception):
                    # compile into the blob cache: the row's cold start is a later process's
                    row["first_compile"] = _run_child(_row_cfg(opts, backend, model_dir, engines_cache[key], device,
                                                               prepare_only=True), opts.row_timeout_s)
                row["engines_dir"] = str(engines_cache[key])
            except Exception as e:
                engines_cache[key] = e
            if isinstance(engines_cache[key], Exception):
                e = engines_cache[key]
                reason = f"engines could not be prepared: {type(e).__name__}: {e}"
        if reason is not None:
            row.update(status="skipped", reason=reason)
            say(f"{backend}: skipped: {reason}")
            result["rows"].append(row)
            continue
        say(f"{backend}: measuring in a child process")
        cfg = _row_cfg(opts, backend, model_dir, row.get("engines_dir"), device)
        row.update(_run_child(cfg, opts.row_timeout_s))
        row["backend"] = backend
        if flops:
            add_floor(row, flops, peaks, opts.steps, opts.guidance > 1)
        result["rows"].append(row)
    _add_baseline(result["rows"])
    return result


# ----------------------------------------------------------------------------- child

def _times(fn, sync, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def measure_row(cfg: dict, save=None) -> dict:
    """The row's measurements. `save(row)` is called after each one with the row so far (status
    "partial"), so a row stopped at --row-timeout still reports what it measured."""
    from .runners import RUNNERS

    repeats, warmup = max(1, cfg["repeats"]), max(0, cfg["warmup"])
    runner = RUNNERS[cfg["backend"]](cfg)
    row = {"status": "partial", "info": {}, "notes": runner.notes, "load_s": None, "cold_start_s": None,
           "latency_s": None, "throughput_ips": {}, "batch_runs_s": {}, "stages_s": {s: None for s in STAGE_ORDER},
           "peak_rss_mb": None, "peak_gpu_mib": None, "peak_torch_gpu_mib": None}
    with env.GpuMemorySampler() as gpu:
        def checkpoint():
            row.update(peak_rss_mb=env.rss_high_water_mb(), peak_gpu_mib=gpu.peak_mib)
            if save:
                save(row)
        t0 = time.perf_counter()
        runner.load()
        runner.sync()
        row["load_s"] = time.perf_counter() - t0
        if cfg.get("prepare_only"):      # OpenVINO: compile into the cache, then stop
            runner.close()
            return {"status": "ok", "load_s": row["load_s"], "peak_rss_mb": env.rss_high_water_mb()}
        row["info"] = runner.info()         # what runs (e.g. the compile mode), also in a partial row
        # what is under way is saved before each long part: a row stopped there says where (for
        # torch.compile, a stop while compiling a model means that compile took longer than the budget)
        for label, compile_once in runner.compile_parts().items():
            row["under_way"] = f"compiling {label} (cold start)"
            checkpoint()
            row.setdefault("compile_s", {})[label] = _times(compile_once, runner.sync, 1)[0]
        row["under_way"] = "the first image (cold start)"
        checkpoint()
        first = runner.generate(1)
        row.update(cold_start_s=time.perf_counter() - t0, image_shape=list(first.shape),
                   image_mean=float(first.astype("float64").mean()))
        checkpoint()
        for b in [1] + [b for b in cfg["batches"] if b != 1]:       # batch 1: warm latency (after the cold run)
            row["under_way"] = f"the timed runs at batch {b}"
            checkpoint()
            if b != 1:
                _times(lambda: runner.generate(b), runner.sync, warmup)
            ts = _times(lambda: runner.generate(b), runner.sync, repeats)
            row["batch_runs_s"][str(b)] = ts
            if b in cfg["batches"]:
                row["throughput_ips"][str(b)] = b / _median(ts)
            if b == 1:
                row["latency_s"] = {"median": _median(ts), "min": min(ts), "max": max(ts), "runs": ts}
            checkpoint()
        row["under_way"] = "the per-stage timings"
        for name, fn in runner.stages().items():
            # every stage but the whole loop (minutes on a CPU, and warm from the batches above) gets
            # --warmup untimed calls: a stage's first call at batch 1 on host arrays (e.g. ONNX Runtime
            # CUDA's VAE decode, 0.175 s cold vs 0.014 s warm on an H200) is not its steady-state time
            _times(fn, runner.sync, 0 if name == "steps" else warmup)
            row["stages_s"][name] = _median(_times(fn, runner.sync, repeats))
            checkpoint()
        row["info"] = runner.info()
        row["peak_torch_gpu_mib"] = runner.peak_torch_gpu_mib() if hasattr(runner, "peak_torch_gpu_mib") else None
    runner.close()
    row.pop("under_way")
    row.update(status="ok", peak_rss_mb=env.rss_high_water_mb(), peak_gpu_mib=gpu.peak_mib)
    return row


def row_main(config: Path, result: Path) -> int:
    cfg = json.loads(config.read_text())
    partial = result.with_name(result.stem + ".partial.json")

    def save(row):
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(partial)
    try:
        row = measure_row(cfg, save)
    except Exception as e:
        row = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000],
               "output_tail": traceback.format_exc()[-2500:], "peak_rss_mb": env.rss_high_water_mb()}
        if partial.is_file():
            row["partial"] = json.loads(partial.read_text())
    result.write_text(json.dumps(row))
    return 0 if row["status"] == "ok" else 1
