"""A CPU stand-in for cuda-python's runtime module (`cuda.bindings.runtime`), for tests without a GPU.

`FakeCudart` answers the calls `arc2face_rt.backends.cuda` makes, with the same `(err, *values)`
tuples and error codes, so the REAL helpers (DeviceBuffer, HostBuffer, CudaGraph, upload, ...) and
everything above them run unchanged. Device memory is host memory: `cudaMalloc` hands out 256-byte
aligned addresses inside numpy buffers, filled with 0xFF (device memory is never zeroed for you),
and every device access is bounds-checked against a live allocation (a freed or overrun buffer
fails the test instead of corrupting memory). Stream work runs when enqueued (eagerly), except
while the stream is being captured: then it is recorded into the graph and runs on each launch.
What the capture rules forbid (a host synchronisation of the capturing stream, cudaMalloc on the
capturing thread) invalidates the capture, as CUDA does. Counters (`syncs`, `captures`,
`instantiations`, `launches`) and a log of memcpys (`copies`: kind, bytes, pinned host side) let
tests assert the protocol: one host synchronisation per batch, pinned host buffers, no re-capture.
`pageable_waits` counts the copies into pageable host memory issued while their stream still had work
the host has not seen finish (by a sync, an event sync up to the event's record, or an earlier such
copy, which returns done): CUDA returns from those only when that work is done, waiting its default
way (spinning a core) instead of on the caller's blocking-sync event.
"""
from __future__ import annotations

import ctypes
import enum
import time
import types

import numpy as np

ALIGN = 256


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorCapturedEvent = 907


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrComputeCapabilityMajor = 75
    cudaDevAttrComputeCapabilityMinor = 76


class IllegalAddress(AssertionError):
    """A simulated kernel or copy touched memory outside every live allocation."""


class _Alloc:
    def __init__(self, nbytes: int, pinned: bool):
        self.raw = np.full(nbytes + ALIGN, 0xFF, np.uint8)
        base = self.raw.ctypes.data
        self.off = (-base) % ALIGN
        self.ptr = base + self.off
        self.nbytes = nbytes
        self.pinned = pinned

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        start = ptr - self.ptr
        return self.raw[self.off + start: self.off + start + nbytes]


class FakeCudart:
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaDeviceAttr = cudaDeviceAttr
    cudaStreamNonBlocking = 1
    cudaEventBlockingSync, cudaEventDisableTiming = 1, 2
    cudaDeviceScheduleBlockingSync = 4

    def __init__(self, cc: str = "8.9", name: str = "Simulated GPU", devices: int = 1):
        self.cc, self.name, self.devices = cc, name, devices
        self.allocs: dict[int, _Alloc] = {}
        self.streams: dict[int, dict] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.events: dict[int, float | None] = {}
        self.captured_events: set[int] = set()
        self._next = 1
        self.syncs = self.device_syncs = self.captures = self.instantiations = self.launches = 0
        self.copies: list[tuple[str, int, bool]] = []
        self.invalidate_next_capture = False
        self.device_flags: int | None = None     # cudaSetDeviceFlags' last flags
        self.refuse_device_flags = False
        # per stream: work items enqueued so far, and how many of them the host has seen finish (a
        # sync, an event sync up to the event's record, a pageable copy that returned)
        self.work: dict[int, int] = {}
        self.seen_done: dict[int, int] = {}
        self.event_marks: dict[int, tuple[int, int]] = {}      # event -> (stream, work count at its record)
        self.pageable_waits = 0

    # ---- memory -----------------------------------------------------------------------------
    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _capturing(self) -> bool:
        return any(s["capture"] is not None for s in self.streams.values())

    def _alloc(self, nbytes: int, pinned: bool):
        if self._capturing():
            self._invalidate_all()
            return cudaError_t.cudaErrorStreamCaptureUnsupported, 0
        a = _Alloc(int(nbytes), pinned)
        self.allocs[a.ptr] = a
        return cudaError_t.cudaSuccess, a.ptr

    def cudaMalloc(self, nbytes):
        return self._alloc(nbytes, pinned=False)

    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes, pinned=True)

    def _free(self, ptr, pinned: bool):
        a = self.allocs.get(int(ptr))
        if a is None or a.pinned != pinned:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.allocs[int(ptr)]
        return (cudaError_t.cudaSuccess,)

    def cudaFree(self, ptr):
        return self._free(ptr, pinned=False)

    def cudaFreeHost(self, ptr):
        return self._free(ptr, pinned=True)

    def find(self, ptr: int, nbytes: int, pinned: bool | None = False) -> _Alloc | None:
        for a in self.allocs.values():
            if a.ptr <= ptr and ptr + nbytes <= a.ptr + a.nbytes and (pinned is None or a.pinned == pinned):
                return a
        return None

    def device_view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes [ptr, ptr+nbytes) of one live device allocation (IllegalAddress otherwise)."""
        a = self.find(int(ptr), int(nbytes))
        if a is None:
            raise IllegalAddress(f"device access [{ptr:#x}, +{nbytes}) outside every live allocation")
        return a.view(int(ptr), int(nbytes))

    def device_array(self, ptr: int, dtype, shape) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.device_view(ptr, int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)

    def live_device_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocs.values() if not a.pinned)

    # ---- streams and work ---------------------------------------------------------------------
    def cudaStreamCreateWithFlags(self, flags):
        h = self._handle()
        self.streams[h] = {"capture": None, "invalidated": False}
        return cudaError_t.cudaSuccess, h

    def cudaStreamDestroy(self, stream):
        return (cudaError_t.cudaSuccess if self.streams.pop(int(stream), None) is not None
                else cudaError_t.cudaErrorInvalidResourceHandle,)

    def enqueue(self, stream: int, fn) -> None:
        """Run `fn` as work on `stream`: recorded while it is captured, else now."""
        s = self.streams[int(stream)]
        if s["capture"] is not None:
            s["capture"].append(fn)
        else:
            fn()
            self.work[int(stream)] = self.work.get(int(stream), 0) + 1

    def _invalidate_all(self):
        for s in self.streams.values():
            if s["capture"] is not None:
                s["invalidated"] = True

    def cudaStreamSynchronize(self, stream):
        s = self.streams[int(stream)]
        if s["capture"] is not None:            # forbidden during capture: invalidates it
            s["invalidated"] = True
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        self.syncs += 1
        self.seen_done[int(stream)] = self.work.get(int(stream), 0)
        return (cudaError_t.cudaSuccess,)

    def cudaDeviceSynchronize(self):
        if self._capturing():
            self._invalidate_all()
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        self.device_syncs += 1
        self.seen_done.update(self.work)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        dst, src, nbytes, kind = int(dst), int(src), int(nbytes), cudaMemcpyKind(kind)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.device_view(dst, nbytes)
            pinned = self.find(src, nbytes, pinned=True) is not None
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.device_view(src, nbytes)
            pinned = self.find(dst, nbytes, pinned=True) is not None
            busy = self.work.get(int(stream), 0) > self.seen_done.get(int(stream), 0)
            self.pageable_waits += int(not pinned and busy)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            self.device_view(src, nbytes)
            self.device_view(dst, nbytes)
            pinned = True
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.copies.append((kind.name[len("cudaMemcpy"):], nbytes, pinned))

        def run():              # re-checked when it runs: a replayed graph may outlive a buffer
            if kind != cudaMemcpyKind.cudaMemcpyDeviceToHost:
                self.device_view(dst, nbytes)
            if kind != cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.device_view(src, nbytes)
            ctypes.memmove(dst, src, nbytes)
        self.enqueue(stream, run)
        if kind == cudaMemcpyKind.cudaMemcpyDeviceToHost and not pinned and not self.streams[int(stream)]["capture"]:
            self.seen_done[int(stream)] = self.work.get(int(stream), 0)   # it returned done: the stream is idle
        return (cudaError_t.cudaSuccess,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        view = self.device_view(int(ptr), int(nbytes))
        self.enqueue(stream, lambda: view.__setitem__(slice(None), int(value)))
        return (cudaError_t.cudaSuccess,)

    # ---- graphs -------------------------------------------------------------------------------
    def cudaStreamBeginCapture(self, stream, mode):
        s = self.streams[int(stream)]
        if s["capture"] is not None:
            return (cudaError_t.cudaErrorIllegalAddress,)
        s["capture"], s["invalidated"] = [], False
        self.captures += 1
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        s = self.streams[int(stream)]
        ops, s["capture"] = s["capture"], None
        if ops is None:
            return cudaError_t.cudaErrorInvalidValue, None
        if s["invalidated"] or self.invalidate_next_capture:
            self.invalidate_next_capture = False
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        h = self._handle()
        self.graphs[h] = ops
        return cudaError_t.cudaSuccess, h

    def cudaGraphInstantiate(self, graph, flags):
        h = self._handle()
        self.execs[h] = list(self.graphs[int(graph)])
        self.instantiations += 1
        return cudaError_t.cudaSuccess, h

    def cudaGraphLaunch(self, exec_, stream):
        ops = self.execs.get(int(exec_)) if exec_ is not None else None
        if ops is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.launches += 1
        for fn in ops:
            self.enqueue(stream, fn)
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(int(graph), None)
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_):
        self.execs.pop(int(exec_), None)
        return (cudaError_t.cudaSuccess,)

    # ---- events -------------------------------------------------------------------------------
    def cudaEventCreate(self):
        h = self._handle()
        self.events[h] = None
        return cudaError_t.cudaSuccess, h

    def cudaEventCreateWithFlags(self, flags):
        self.event_flags = flags
        return self.cudaEventCreate()

    def cudaEventSynchronize(self, event):
        if int(event) not in self.events:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if int(event) in self.captured_events:  # last recorded in a capturing stream: refused, capture kept
            return (cudaError_t.cudaErrorCapturedEvent,)
        self.syncs += 1
        if int(event) in self.event_marks:      # the work up to the event's record is done, not what came after
            stream, mark = self.event_marks[int(event)]
            self.seen_done[stream] = max(self.seen_done.get(stream, 0), mark)
        return (cudaError_t.cudaSuccess,)

    def cudaEventRecord(self, event, stream):
        if self.streams[int(stream)]["capture"] is not None:
            self.captured_events.add(int(event))
        else:
            self.captured_events.discard(int(event))
        self.enqueue(stream, lambda: self.events.__setitem__(int(event), time.perf_counter()))
        self.event_marks[int(event)] = (int(stream), self.work.get(int(stream), 0))
        return (cudaError_t.cudaSuccess,)

    def cudaEventElapsedTime(self, start, end):
        a, b = self.events.get(int(start)), self.events.get(int(end))
        if a is None or b is None:
            return cudaError_t.cudaErrorInvalidResourceHandle, 0.0
        return cudaError_t.cudaSuccess, (b - a) * 1e3

    def cudaEventDestroy(self, event):
        self.events.pop(int(event), None)
        return (cudaError_t.cudaSuccess,)

    # ---- device -------------------------------------------------------------------------------
    def cudaSetDeviceFlags(self, flags):
        if self.refuse_device_flags:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.device_flags = int(flags)
        return (cudaError_t.cudaSuccess,)

    def cudaGetDeviceCount(self):
        if not self.devices:
            return cudaError_t.cudaErrorNoDevice, 0
        return cudaError_t.cudaSuccess, self.devices

    def cudaGetDevice(self):
        return cudaError_t.cudaSuccess, 0

    def cudaDeviceGetAttribute(self, attr, device):
        major, minor = self.cc.split(".")
        return cudaError_t.cudaSuccess, int(major if attr == cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else minor)

    def cudaGetDeviceProperties(self, device):
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=self.name.encode())

    def cudaGetErrorName(self, err):
        return cudaError_t.cudaSuccess, cudaError_t(int(err)).name.encode()
