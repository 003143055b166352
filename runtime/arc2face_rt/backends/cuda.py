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


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned, as TensorRT wants); free() or `with`."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


def create_stream() -> int:
    rt = cudart()
    return int(check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"))


def destroy_stream(stream: int) -> None:
    check(cudart().cudaStreamDestroy(stream), "cudaStreamDestroy")


def synchronize(stream: int) -> None:
    check(cudart().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def upload(dst_ptr: int, array, stream: int) -> None:
    """Host -> device copy of a C-contiguous numpy array, enqueued on `stream`."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst_ptr, array.ctypes.data, array.nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D")


def download(array, src_ptr: int, stream: int) -> None:
    """Device -> host copy into a C-contiguous numpy array, enqueued on `stream` (sync before reading)."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(array.ctypes.data, src_ptr, array.nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H")


def memset(ptr: int, nbytes: int, stream: int) -> None:
    check(cudart().cudaMemsetAsync(ptr, 0, nbytes, stream), "cudaMemsetAsync")


class CudaGraph:
    """A stream capture turned into an executable graph: `with g.capture(stream): ...; g.launch(stream)`."""

    def __init__(self):
        self._graph = None
        self._exec = None

    def begin(self, stream: int) -> None:
        rt = cudart()
        # Thread-local: another thread's unrelated CUDA calls must not invalidate this capture.
        check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")

    def end(self, stream: int) -> None:
        rt = cudart()
        self._graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def abort(self, stream: int) -> None:
        """End a failed capture, discarding what was captured (errors ignored: the capture is broken anyway)."""
        rt = cudart()
        err, graph = rt.cudaStreamEndCapture(stream)
        if err == rt.cudaError_t.cudaSuccess and graph is not None:
            rt.cudaGraphDestroy(graph)

    def launch(self, stream: int) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self._exec is not None:
            rt.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
            self._graph = None
