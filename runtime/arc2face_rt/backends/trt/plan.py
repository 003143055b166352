"""TensorRT plans: which library, whether it can run on this GPU, and checking a plan before loading it.

`tensorrt` (full TensorRT) or `tensorrt_rtx` (TensorRT-RTX), whichever is installed, through the API
they share; both are imported lazily, and nothing touches the GPU at import time. Before any
TensorRT runtime object exists we check that CUDA sees a device (TensorRT can crash the process
without one), that the library can run on that GPU at all (TensorRT-RTX targets only the compute
capabilities of its `ComputeCapability` enum: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1 in 1.7, so neither
Hopper 9.0 nor Jetson Orin 8.7), then the plan's manifest record (library, GPU compute capability,
file size), and only then deserialise.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

from ... import manifest as mf
from ...errors import BackendUnavailableError, EngineMismatchError
from ...exits import holding_stops, stop_requested
from .. import cuda

log = logging.getLogger("arc2face_rt.backends.trt")


# ----------------------------------------------------------------------------- library

def import_trt(otherwise: str = "or use --backend ort"):
    """`tensorrt` when installed, else `tensorrt_rtx` (same Python API for everything used here). Without
    either, the error ends with `otherwise`: the alternative that fits the caller's command."""
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_rtx as trt
        except ImportError as e:
            raise BackendUnavailableError(
                "the TensorRT backend needs TensorRT or TensorRT-RTX; install `pip install 'arc2face-rt[trt]'` "
                f"(tensorrt-rtx) or NVIDIA's tensorrt, {otherwise}") from e
    return trt


def library_info(trt) -> dict:
    return {"name": trt.__name__, "version": trt.__version__}


def is_rtx(trt) -> bool:
    return trt.__name__ == "tensorrt_rtx"


def rtx_compute_capabilities(trt) -> tuple[str, ...]:
    """The compute capabilities TensorRT-RTX can target, read from its enum ('SM89' -> '8.9')."""
    return tuple(f"{m[2:-1]}.{m[-1]}" for m in trt.ComputeCapability.__members__
                 if m.startswith("SM") and m[2:].isdigit())


def unsupported_gpu_reason(trt, gpu_cc: str, gpu_name: str) -> str | None:
    """Why `trt` cannot run on a GPU of compute capability `gpu_cc` at all, or None when it can.

    Full TensorRT runs on every GPU it supports (its plans are built on the target). TensorRT-RTX runs
    only on the compute capabilities it can target."""
    if not is_rtx(trt):
        return None
    known = rtx_compute_capabilities(trt)
    if gpu_cc in known:
        return None
    return (f"{trt.__name__} {trt.__version__} cannot run on {gpu_name} (compute capability {gpu_cc}; it supports "
            f"{', '.join(known)}): this GPU needs full TensorRT (`pip install tensorrt`), or on a Jetson the "
            "TensorRT of JetPack")


def require_usable(where: str = "") -> tuple:
    """(trt module, compute capability, GPU name) where the TensorRT backend can run, checked before
    any TensorRT runtime object exists (without a device those can crash the process); else a
    BackendUnavailableError saying why (no GPU, no library, a GPU the library cannot run on)."""
    device = cuda.require_device()
    trt = import_trt()
    gpu_cc, gpu_name = cuda.compute_capability(device), cuda.device_name(device)
    reason = unsupported_gpu_reason(trt, gpu_cc, gpu_name)
    if reason:
        raise BackendUnavailableError(f"{where}{reason}; or use --backend ort")
    return trt, gpu_cc, gpu_name


def unusable_reason() -> str | None:
    """Why the TensorRT backend cannot run on this machine (no library, no GPU, a GPU the installed
    library cannot run on), or None when it can. Creates no TensorRT runtime object."""
    try:
        trt = import_trt()
    except BackendUnavailableError as e:
        return str(e)
    if cuda.device_count() == 0:
        return "TensorRT needs an NVIDIA GPU and CUDA (cuda-python) finds none"
    return unsupported_gpu_reason(trt, cuda.compute_capability(), cuda.device_name())


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}


def dtype_name(trt_dtype) -> str:
    return _DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


_LOGGERS: dict = {}


def make_logger(trt, logger: logging.Logger = log):
    """The trt.ILogger forwarding to `logger` (TensorRT's console logger prints to stdout). One per
    library and process, kept alive: TensorRT registers the first logger it is given, and warns about
    every later builder or runtime created with another one."""
    key = (id(trt), logger.name)
    if key in _LOGGERS:
        return _LOGGERS[key]

    class Forward(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                     trt.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            if stop_requested():          # "build canceled by user" and the like: the stop's own line says it
                level = logging.DEBUG
            logger.log(level, "[%s] %s", trt.__name__, msg)

    forward = _LOGGERS[key] = Forward()      # holds `trt`, so its id is not reused while cached
    return forward


def rebuild_command(engines_dir: Path, record: dict | None = None, extra: str = "") -> str:
    """The build-engines command that builds the folder's plans again as they were (`mf.built_precision`;
    without a readable manifest, the precision `record` was built with)."""
    own = ((record or {}).get("build") or {}).get("precision")
    precision = mf.built_precision(mf.read_best_effort(engines_dir) or {}, own)
    prec = f" --precision {precision}" if precision in mf.PLAN_PRECISIONS else ""
    return f"`arc2face-export build-engines --out {shlex.quote(str(engines_dir))}{prec}{extra} --force`"


# ----------------------------------------------------------------------------- plan checks

def plan_record(engines_dir: Path, stage: str) -> dict:
    m = mf.load_manifest(engines_dir)
    rec = m.get("plans", {}).get(stage)
    if not rec:
        raise EngineMismatchError(f"{engines_dir}: no TensorRT plan recorded for '{stage}'; build it with "
                                  f"{rebuild_command(engines_dir)}")
    return rec


def check_plan_record(rec: dict, engines_dir: Path, library: dict, gpu_cc: str | None) -> bool:
    """Refuse a plan built by another library/version; return whether this GPU is among its targets.

    A GPU outside the recorded targets is not refused here: TensorRT-RTX may still run the plan (it
    compiles kernels on the device), which `load_plan` asks the library itself.
    """
    built = rec.get("library", {})
    if (built.get("name"), built.get("version")) != (library["name"], library["version"]):
        raise EngineMismatchError(
            f"{engines_dir / rec['file']}: built with {built.get('name')} {built.get('version')}, this machine has "
            f"{library['name']} {library['version']}; rebuild with {rebuild_command(engines_dir, rec)}")
    return gpu_cc is None or gpu_cc in rec.get("compute_capabilities", [])


def read_plan(path: Path, rec: dict | None, verify_sha256: bool = False) -> bytes:
    """The plan's bytes, after checking them against the manifest record (truncation, replacement)."""
    engines_dir = path.parent
    if not path.is_file():
        raise EngineMismatchError(f"{path}: plan missing; build it with {rebuild_command(engines_dir, rec)}")
    data = path.read_bytes()
    if rec is not None and len(data) != rec["bytes"]:
        raise EngineMismatchError(
            f"{path}: {len(data)} bytes, the manifest records {rec['bytes']} (truncated or replaced); "
            f"rebuild with {rebuild_command(engines_dir, rec)}")
    if rec is not None and verify_sha256:
        import hashlib
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise EngineMismatchError(f"{path}: sha256 differs from the manifest; rebuild with "
                                      f"{rebuild_command(engines_dir, rec)}")
    return data


def load_plan(path: str | Path, stage: str | None = None, verify_sha256: bool = False):
    """(trt module, runtime, engine, plan record, logger) for a checked plan of an engines folder.

    The logger is returned because TensorRT keeps a pointer to it: it must outlive the runtime."""
    path = Path(path)
    engines_dir, stage = path.parent, stage or path.stem
    trt, gpu_cc, gpu_name = require_usable(f"{path}: ")
    library = library_info(trt)
    rec = plan_record(engines_dir, stage)
    if rec.get("file") != path.name:
        raise EngineMismatchError(f"{path}: the manifest's plan for '{stage}' is {rec.get('file')}")
    targeted = check_plan_record(rec, engines_dir, library, gpu_cc)
    if not targeted and not is_rtx(trt):
        raise EngineMismatchError(
            f"{path}: built for compute capability {rec.get('compute_capabilities')}, this GPU "
            f"({gpu_name}) is {gpu_cc}; rebuild on it with {rebuild_command(engines_dir, rec)}")
    data = read_plan(path, rec, verify_sha256)
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    if hasattr(runtime, "get_engine_validity"):          # TensorRT-RTX: ask the library about this GPU
        validity, diagnostics = runtime.get_engine_validity(data)
        if validity == trt.EngineValidity.INVALID:
            why = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(v)]
            target = "" if targeted else f" --compute-capability {gpu_cc}"
            raise EngineMismatchError(
                f"{path}: {library['name']} cannot run this plan on {gpu_name} (sm {gpu_cc}): "
                f"{', '.join(why) or 'invalid'}; it targets {rec.get('compute_capabilities')}. Rebuild with "
                f"{rebuild_command(engines_dir, rec, target)}")
        if not targeted:
            log.warning("%s: this GPU (sm %s) is not among the plan's targets %s; %s reports it %s", path.name,
                        gpu_cc, rec.get("compute_capabilities"), library["name"], validity.name)
    with holding_stops():                 # TensorRT calls the logger from C++ (see holding_stops)
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineMismatchError(f"{path}: {library['name']} could not deserialise the plan (corrupt, or built "
                                  f"for another GPU/version); rebuild with {rebuild_command(engines_dir, rec)}")
    return trt, runtime, engine, rec, logger
