"""What a result was measured on: machine, libraries, git commit; peak compute rate; memory high-water.

Nothing here touches a GPU at import time. Every probe degrades to None instead of raising: a
benchmark run must still write its results on a machine that lacks a library.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import os
import platform
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("arc2face_rt", "numpy", "onnxruntime", "onnx", "torch", "diffusers", "transformers", "tensorrt",
             "tensorrt_rtx", "cuda", "openvino", "nncf", "psutil", "matplotlib")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git(*args, text: bool = True):
    r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=text)
    return (r.stdout.strip() if text else r.stdout) if r.returncode == 0 else None


def git_commit() -> dict:
    """The commit, whether tracked files differ from it, and `source_sha256` (`source_digest`): on a
    copy whose git metadata lags behind its files (a device machine's), the digest still names the code."""
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "source_sha256": source_digest()}


PACKAGE_DIRS = ("runtime", "export", "reference")     # the folders that hold arc2face_rt, _export and _ref
SOURCE_DIRS = (*PACKAGE_DIRS, "benchmarks", "tests")
SOURCE_FILES = ("pyproject.toml",)


def _is_source(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__pycache__" for p in parts):
        return False
    return rel in SOURCE_FILES or (parts[0] in SOURCE_DIRS and rel.endswith(".py"))


def source_digest(rev: str | None = None) -> str | None:
    """sha256 over the project's Python sources and pyproject.toml (each path and content, in path
    order): of the working tree, or with `rev` of that commit (`python -m benchmarks digest REV`), so a
    result's digest can be matched to a commit. None where `rev` cannot be read."""
    if rev is None:
        rels = sorted({p.relative_to(REPO).as_posix() for d in SOURCE_DIRS if (REPO / d).is_dir()
                       for p in (REPO / d).rglob("*.py") if p.is_file()}
                      | {f for f in SOURCE_FILES if (REPO / f).is_file()})
        read = lambda rel: (REPO / rel).read_bytes()          # noqa: E731
    else:
        listed = _git("ls-tree", "-r", "--name-only", rev, "--", *SOURCE_DIRS, *SOURCE_FILES)
        if listed is None:
            return None
        rels = sorted(rel for rel in listed.splitlines() if rel)
        read = lambda rel: _git("show", f"{rev}:{rel}", text=False) or b""   # noqa: E731
    h = hashlib.sha256()
    for rel in (r for r in rels if _is_source(r)):
        data = read(rel)
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def library_versions() -> dict:
    """Installed versions, read from package metadata where possible (importing torch just to read its
    version would cost seconds and memory in a child that measures memory)."""
    from importlib import metadata

    dists = {"arc2face_rt": "arc2face-rt", "cuda": "cuda-python", "tensorrt_rtx": "tensorrt-rtx",
             "onnxruntime": None}
    out = {}
    for name in LIBRARIES:
        if name == "onnxruntime":
            for d in ("onnxruntime-gpu", "onnxruntime"):
                try:
                    out["onnxruntime"] = f"{metadata.version(d)} ({d})"
                    break
                except metadata.PackageNotFoundError:
                    continue
            continue
        try:
            out[name] = metadata.version(dists.get(name) or name)
        except metadata.PackageNotFoundError:
            pass
    return out


def onnxruntime_in_use() -> dict:
    """The onnxruntime this process imports: version, file, and the package it came from (onnxruntime-gpu
    or the CPU onnxruntime; both can be installed, in different folders, and only one is imported)."""
    from importlib import metadata

    import onnxruntime

    here = Path(onnxruntime.__file__).resolve()
    package = None
    for d in ("onnxruntime-gpu", "onnxruntime"):
        try:
            if Path(metadata.distribution(d).locate_file("onnxruntime/__init__.py")).resolve() == here:
                package = d
                break
        except metadata.PackageNotFoundError:
            continue
    return {"version": onnxruntime.__version__, "package": package, "file": str(here)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory_gb() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info() -> list[dict]:
    """[{name, memory_mib, driver, compute_capability}] from nvidia-smi; [] without a GPU."""
    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True)
    if r.returncode != 0:
        return []
    gpus = []
    for line in r.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "memory_mib": int(float(parts[1])), "driver": parts[2],
                         "compute_capability": parts[3] if len(parts) > 3 else None})
    return gpus


def machine_info() -> dict:
    gpus = gpu_info()
    return {
        "device": gpus[0]["name"] if gpus else f"CPU: {cpu_model()}",
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "host_memory_gb": host_memory_gb(),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- peak compute rate

def _best_rate(fn, flop: float, repeats: int) -> float:
    fn()                                                         # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flop / best / 1e12


def _openvino_gemm(n: int, precision: str):
    """A compiled OpenVINO n x n x n GEMM (activations x constant weights, as the UNet's layers are) in
    `precision` (fp32, bf16: inference hint; int8: FakeQuantize'd activations x int8 weights), and its input."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    if precision == "int8":
        lo, hi = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
        x = ops.fake_quantize(a, lo, hi, lo, hi, 256)
        w = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 128, (n, n), dtype=np.int8)), "f32"),
                         ops.constant(np.full((n, 1), 0.01, np.float32)))
    else:
        x, w = a, ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    model = ov.Model([ops.matmul(x, w, False, True)], [a])
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    return compiled.create_infer_request(), {"a": rng.standard_normal((n, n)).astype(np.float32)}


def measure_cpu_peaks(n: int = 2048, repeats: int = 5, precisions=("fp32", "bf16", "int8")) -> dict:
    """The CPU's dense GEMM rate per precision: {precision: {"tflops": best, "methods": {method: tflops}}}.

    fp32: numpy, torch, OpenVINO; bf16: torch, OpenVINO (bf16 hint), only where the CPU has native bf16
    (AMX-BF16/AVX512-BF16); int8: OpenVINO (u8 x i8). Each method is best of `repeats`; `tflops` is the
    best method, the rate this CPU has shown it can reach at that precision. Methods whose library is
    missing are left out; a precision with no method is left out."""
    import numpy as np

    flop = 2 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    methods: dict[str, dict[str, float]] = {p: {} for p in precisions}
    if "fp32" in methods:
        methods["fp32"]["numpy"] = _best_rate(lambda: a @ b, flop, repeats)
    bf16_native = None
    if has_module("openvino"):
        import openvino as ov
        bf16_native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        for p in methods:
            if p == "bf16" and not bf16_native:
                continue
            req, feed = _openvino_gemm(n, p)
            methods[p]["openvino"] = _best_rate(lambda: req.infer(feed), flop, repeats)
    if has_module("torch"):
        import torch
        for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if p in methods and (p == "fp32" or bf16_native is not False):
                ta, tb = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
                methods[p]["torch"] = _best_rate(lambda: ta @ tb, flop, repeats)
    how = f"{n}x{n}x{n} GEMM, best of {repeats}, {os.cpu_count()} cores"
    return {p: {"tflops": max(m.values()), "methods": m, "how": how} for p, m in methods.items() if m}


def measure_gpu_peak_flops(n: int = 8192, repeats: int = 10) -> dict | None:
    """Dense fp16 matmul rate with torch on CUDA (timed with CUDA events), best of `repeats`; None
    without torch+CUDA. fp16 tensor-core rate: the floor for any precision on that GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return {"tflops": 2 * n**3 / best / 1e12, "dtype": "float16",
            "how": f"torch fp16 matmul {n}x{n}x{n} on {torch.cuda.get_device_name()}, CUDA events, best of {repeats}"}


# ----------------------------------------------------------------------------- memory

def rss_high_water_mb() -> float:
    """This process's resident-set high-water mark in MB.

    Linux: VmHWM from /proc/self/status, which belongs to the current program image. (ru_maxrss is
    not used there: it survives exec, so a child would report its parent's peak if that was higher.)
    Elsewhere: ru_maxrss (KiB on Linux/BSD, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((kb / 1024 if platform.system() != "Darwin" else kb / 2**20), 1)


def _gpu_used_mib_probe():
    """A function returning device-wide used GPU memory in MiB (pynvml, else nvidia-smi), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception:
        pass
    if shutil.which("nvidia-smi") and gpu_info():
        def smi():
            r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
            return float(r.stdout.strip().splitlines()[0]) if r.returncode == 0 else None
        return smi
    return None


class GpuMemorySampler:
    """Polls device-wide used GPU memory on a thread; `peak_mib` is the high-water above the value at
    start (so other processes' steady use is subtracted, their changes are not: note it on shared GPUs)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.probe = _gpu_used_mib_probe()
        self.baseline = self.probe() if self.probe else None
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.probe and self.baseline is not None:
            if self.probe.__name__ == "smi":
                self.interval_s = max(self.interval_s, 0.25)   # a process per sample
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            v = self.probe()
            if v is not None:
                self.peak = max(self.peak, v)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_mib(self) -> float | None:
        if self.baseline is None:
            return None
        return round(self.peak - self.baseline, 1)
