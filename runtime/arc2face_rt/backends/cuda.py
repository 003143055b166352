"""Thin cuda-python helpers for the TensorRT backend (no torch, nothing touches the GPU at import).

cuda-python moved its runtime module from `cuda.cudart` (<= 12.x) to `cuda.bindings.runtime`
(12.6+, 13.x); both return `(err, *values)` tuples, which `check` unpacks.
"""
from __future__ import annotations

from functools import lru_cache

from ..errors import BackendUnavailableError


@lru_cache(maxsize=1)
def cudart():
    """The cuda-python runtime module, or BackendUnavailableError naming the package to install."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(
                "the TensorRT backend needs cuda-python; install it with "
                "`pip install 'arc2face-rt[gpu]'` (or `pip install cuda-python`), or use --backend ort") from e
    return rt


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python `(err, *values)` result; raise on a non-success error code."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of CUDA devices; 0 when there is no driver, no device or no cuda-python (never raises)."""
    try:
        rt = cudart()
    except BackendUnavailableError:
        return 0
    err, n = rt.cudaGetDeviceCount()
    return int(n) if err == rt.cudaError_t.cudaSuccess else 0


def require_device(what: str = "the TensorRT backend") -> int:
    """Raise BackendUnavailableError unless a CUDA device is usable; return the current device index.

    Must run before any TensorRT runtime object is created: without a device those can crash the process.
    """
    rt = cudart()
    err, n = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or n == 0:
        _, name = rt.cudaGetErrorName(err)
        reason = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendUnavailableError(
            f"{what} needs an NVIDIA GPU, and CUDA reports none ({reason}); "
            "check the driver with `nvidia-smi`, or use --backend ort")
    return int(check(rt.cudaGetDevice(), "cudaGetDevice"))


def compute_capability(device: int | None = None) -> str:
    """'major.minor' of a device (the current one by default), e.g. '8.9'."""
    rt = cudart()
    if device is None:
        device = int(check(rt.cudaGetDevice(), "cudaGetDevice"))
    major = check(rt.cudaDeviceGetAttribute(
        rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = check(rt.cudaDeviceGetAttribute(
        rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return f"{major}.{minor}"


def device_name(device: int | None = None) -> str:
    rt = cudart()
    if device is None:
        device = int(check(rt.cudaGetDevice(), "cudaGetDevice"))
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
