"""Thin cuda-python helpers for the TensorRT backend and ONNX Runtime's device loop (no torch, nothing
touches the GPU at import).

cuda-python moved its runtime module from `cuda.cudart` (<= 12.x) to `cuda.bindings.runtime`
(12.6+, 13.x); both return `(err, *values)` tuples, which `check` unpacks.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

import numpy as np

from ..errors import BackendUnavailableError


log = logging.getLogger(__name__)

BLOCKING_SYNC_ENV = "ARC2FACE_CUDA_BLOCKING_SYNC"


@lru_cache(maxsize=1)
def cudart():
    """The cuda-python runtime module, or BackendUnavailableError naming the package to install. On
    first use with ARC2FACE_CUDA_BLOCKING_SYNC=1, the device's scheduling becomes blocking-sync
    (`_sleep_in_every_wait`)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(
                "the TensorRT backend needs cuda-python; install it with "
                "`pip install 'arc2face-rt[gpu]'` (or `pip install cuda-python`), or use --backend ort") from e
    if os.environ.get(BLOCKING_SYNC_ENV) == "1":
        _sleep_in_every_wait(rt)
    return rt


def _sleep_in_every_wait(rt) -> None:
    """cudaDeviceScheduleBlockingSync on the current device: every host wait in this process sleeps,
    ONNX Runtime's and TensorRT's own included (stream syncs, copies into pageable memory), not only
    ours (`synchronize`). An experiment, off by default: on an H200, generation at batch 16 still used
    7.1 s of CPU in 8.2 s with our waits asleep (gpu-check-write-20261128T043034Z.json), and the cost,
    a thread's wake-up per wait, is not measured yet. A failure is logged, never raised: the waits then
    spin as by default."""
    err, *_ = rt.cudaSetDeviceFlags(rt.cudaDeviceScheduleBlockingSync)
    if err != rt.cudaError_t.cudaSuccess:
        log.warning("%s=1: cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync) failed (%s); CUDA's waits "
                    "keep their default scheduling", BLOCKING_SYNC_ENV, err)


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


class HostBuffer:
    """`nbytes` of pinned (page-locked) host memory: asynchronous copies from and to it really are
    asynchronous. `array(dtype, shape)` views its start as a numpy array; free() or `with`."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})"))

    def array(self, dtype, shape) -> np.ndarray:
        dtype, shape = np.dtype(dtype), tuple(shape)
        n = int(np.prod(shape)) * dtype.itemsize
        if n > self.nbytes:
            raise ValueError(f"a {shape} {dtype} view needs {n} bytes, the buffer has {self.nbytes}")
        raw = (ctypes.c_uint8 * max(n, 1)).from_address(self.ptr)
        return np.frombuffer(raw, np.uint8, n).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


def create_stream(blocking: bool = False) -> int:
    """A new stream; non-blocking (no implicit ordering with the legacy default stream) unless `blocking`."""
    rt = cudart()
    flags = 0 if blocking else rt.cudaStreamNonBlocking
    return int(check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreate"))


def destroy_stream(stream: int) -> None:
    check(cudart().cudaStreamDestroy(stream), "cudaStreamDestroy")


def synchronize(stream: int) -> None:
    """Wait until the work enqueued on `stream` is done, with the host thread asleep: through an event
    made with cudaEventBlockingSync. cudaStreamSynchronize under CUDA's default scheduling spins while
    there are more cores than CUDA contexts: on an H200 host, `pipeline` generation at batch 16 used
    8.25 s of CPU in 8.24 s (gpu-check-write-20261127T220618Z.json), a core the PNG writer and the face
    filter could use, the more so on a Jetson's few cores. One wait per batch: the wake-up is noise."""
    rt = cudart()
    event = check(rt.cudaEventCreateWithFlags(rt.cudaEventBlockingSync | rt.cudaEventDisableTiming),
                  "cudaEventCreate")
    try:
        check(rt.cudaEventRecord(event, stream), "cudaEventRecord")
        check(rt.cudaEventSynchronize(event), "cudaEventSynchronize")
    finally:
        rt.cudaEventDestroy(event)


def upload(dst_ptr: int, array, stream: int) -> None:
    """Host -> device copy of a C-contiguous numpy array, enqueued on `stream`."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst_ptr, array.ctypes.data, array.nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D")


def download(array, src_ptr: int, stream: int) -> None:
    """Device -> host copy into a C-contiguous numpy array, enqueued on `stream`. Into pinned memory (a
    PinnedBuffer's array) the copy is asynchronous: `synchronize` after it, before reading. Into pageable
    memory (a plain numpy array) CUDA returns only once the copy is done, waiting for the stream's earlier
    work in CUDA's default way (spinning): `synchronize` before it; the array is ready when this returns."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(array.ctypes.data, src_ptr, array.nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H")


def copy_device(dst_ptr: int, src_ptr: int, nbytes: int, stream: int) -> None:
    """Device -> device copy of `nbytes`, enqueued on `stream`."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpyAsync D2D")


def memset(ptr: int, nbytes: int, stream: int) -> None:
    check(cudart().cudaMemsetAsync(ptr, 0, nbytes, stream), "cudaMemsetAsync")


class Event:
    """A CUDA event for timing work on a stream without a host synchronisation in between."""

    def __init__(self):
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: int) -> None:
        check(cudart().cudaEventRecord(self.handle, stream), "cudaEventRecord")

    def seconds_since(self, start: "Event") -> float:
        """Seconds between `start` and this event (both recorded and completed)."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime")) / 1e3

    def destroy(self) -> None:
        if self.handle is not None:
            cudart().cudaEventDestroy(self.handle)
            self.handle = None


class CudaGraph:
    """A stream capture turned into an executable graph: begin(stream), enqueue work, end(stream), then
    launch(stream) any number of times.

    `end` returns False instead of raising when CUDA invalidated the capture (something in it cannot
    be captured on this stream); the caller then runs the work uncaptured.
    """

    def __init__(self):
        self._graph = None
        self._exec = None

    def begin(self, stream: int) -> None:
        rt = cudart()
        # Thread-local: another thread's unrelated CUDA calls must not invalidate this capture.
        check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")

    def end(self, stream: int) -> bool:
        """Finish the capture and instantiate it; False when the capture was invalidated."""
        rt = cudart()
        err, graph = rt.cudaStreamEndCapture(stream)
        if err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated:
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            return False
        self._graph = check((err, graph), "cudaStreamEndCapture")
        self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        return True

    def abort(self, stream: int) -> bool:
        """End a capture that raised, discarding what was captured; True when CUDA had invalidated it
        (the error then came from the capture itself), False for any other state."""
        rt = cudart()
        err, graph = rt.cudaStreamEndCapture(stream)
        if graph is not None:
            rt.cudaGraphDestroy(graph)
        return err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated

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
