"""One TensorRT plan in one execution context, and the activation memory that contexts share.

    sess = TrtSession("engines/x/projector.plan")       # same surface as OrtSession
    out = sess.run({"id": ids})                         # synchronous debug path, host arrays
    sess.enqueue({"id": d_id, "cond": d_cond}, stream, batch=2)   # async: caller owns buffers, stream

Activation ("device") memory: sessions that run one after another on a stream share one buffer
(`SharedDeviceMemory`, sized to the largest engine), through user-managed context memory.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ...atomic import atomic_write
from ...errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from .. import cuda
from . import plan as _plan
from .plan import dtype_name, rebuild_command

log = logging.getLogger("arc2face_rt.backends.trt")

ALIGN = 256          # TensorRT wants every tensor and activation address 256-byte aligned (cudaMalloc is)


class SharedDeviceMemory:
    """One activation buffer for execution contexts that never run at the same time (one stream,
    stages in sequence), sized to the largest; contexts are re-pointed when it grows.

    `generation` changes on every reallocation: CUDA graphs captured before it must be re-captured.
    The buffer is never smaller than `MIN_BYTES`, so an engine that needs no activation memory still
    gets a valid address.
    """

    MIN_BYTES = ALIGN

    def __init__(self):
        self._buf: cuda.DeviceBuffer | None = None
        self._contexts: list = []
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes if self._buf else 0

    def attach(self, context, nbytes: int) -> None:
        nbytes = max(int(nbytes), self.MIN_BYTES)
        if nbytes > self.nbytes:
            old, self._buf = self._buf, None
            if old is not None:
                cuda.check(cuda.cudart().cudaDeviceSynchronize(), "cudaDeviceSynchronize")
                old.free()
            self._buf = cuda.DeviceBuffer(nbytes)
            self.generation += 1
            for c in self._contexts:
                c.set_device_memory(self._buf.ptr, self._buf.nbytes)
        context.set_device_memory(self._buf.ptr, self._buf.nbytes)
        self._contexts.append(context)

    def detach(self, context) -> None:
        """Forget a context (its session is closing); the buffer is freed with the last one."""
        self._contexts = [c for c in self._contexts if c is not context]
        if not self._contexts:
            self.close()

    def close(self) -> None:
        if self._buf is not None:
            self._buf.free()
            self._buf = None
        self._contexts = []


class TrtSession:
    """One plan in one execution context with user-managed activation memory.

    `enqueue` is the real path (device pointers in, nothing synchronised); `run` is the synchronous
    debug path with host arrays, like OrtSession.run.
    """

    def __init__(self, plan_path: str | Path, stage: str | None = None, memory: SharedDeviceMemory | None = None,
                 verify_sha256: bool = False, runtime_cache: bool = True):
        self.path = Path(plan_path)
        self._use_runtime_cache, self._runtime_cache = runtime_cache, None
        self._trt, self._runtime, self.engine, self.record, self._logger = _plan.load_plan(self.path, stage, verify_sha256)
        trt = self._trt
        self.input_names, self.output_names, self.dtypes, self.shapes = [], [], {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.input_names if is_input else self.output_names).append(name)
            self.dtypes[name] = np.dtype(dtype_name(self.engine.get_tensor_dtype(name)))
            self.shapes[name] = tuple(self.engine.get_tensor_shape(name))   # -1 on the batch axis
        self._check_io()
        self.context = self._create_context()
        self.memory = memory or SharedDeviceMemory()
        self.memory.attach(self.context, self.engine.device_memory_size_v2)
        self._batch: int | None = None
        self._warm_batches: set[int] = set()
        self._noted_batches: set[int] = set()
        self._stream: int | None = None
        self._debug_buffers: dict[str, cuda.DeviceBuffer] = {}

    def _check_io(self) -> None:
        io = self.record.get("io")
        if not io:
            return
        want = {r[0]: (r[1], tuple(-1 if d == "B" else d for d in r[2])) for r in io["inputs"] + io["outputs"]}
        got = {n: (self.dtypes[n].name, self.shapes[n]) for n in self.input_names + self.output_names}
        if got != want:
            raise EngineMismatchError(f"{self.path}: engine I/O {got} differs from the manifest's {want}; "
                                      f"rebuild with {rebuild_command(self.path.parent, self.record)}")

    def _create_context(self):
        trt = self._trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(self.engine, "create_runtime_config"):
            cfg = self.engine.create_runtime_config()
            cfg.set_execution_context_allocation_strategy(strategy)
            # TensorRT-RTX: compile shape-specialised kernels at the first enqueue of a shape (warm-up),
            # not in the background: a CUDA graph captured later must hold the final kernels.
            if hasattr(cfg, "dynamic_shapes_kernel_specialization_strategy"):
                cfg.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            if hasattr(cfg, "cuda_graph_strategy"):   # RTX's own graphs stay off: we capture the whole loop
                cfg.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
            if self._use_runtime_cache and hasattr(cfg, "create_runtime_cache"):
                self._runtime_cache = self._load_runtime_cache(cfg)
            self._runtime_config = cfg       # kept alive with the context it configured
            ctx = self.engine.create_execution_context(cfg)
        else:
            ctx = self.engine.create_execution_context(strategy)
        if ctx is None:
            raise BackendUnavailableError(f"{self.path}: TensorRT could not create an execution context")
        return ctx

    @property
    def runtime_cache_path(self) -> Path:
        return self.path.with_suffix(".rtcache")

    def _load_runtime_cache(self, cfg):
        """TensorRT-RTX compiles kernels on the device at load/first run; its runtime cache keeps them
        across processes in `<stage>.rtcache` (the library validates a cache against this GPU,
        driver and version itself, and ignores one that does not match)."""
        cache = cfg.create_runtime_cache()
        p = self.runtime_cache_path
        if p.is_file() and not cache.deserialize(p.read_bytes()):
            log.info("%s: runtime cache does not match this GPU/driver/version; starting a new one", p.name)
        cfg.set_runtime_cache(cache)
        return cache

    def save_runtime_cache(self) -> None:
        """Write the TensorRT-RTX runtime cache next to the plan (atomic; failures are only logged)."""
        if self._runtime_cache is None:
            return
        p = self.runtime_cache_path
        try:
            atomic_write(p, memoryview(self._runtime_cache.serialize()), overwrite=True)
        except OSError as e:
            log.warning("%s: could not save the runtime cache (%s)", p, e)

    def shape(self, name: str, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == -1 else d for d in self.shapes[name])

    def nbytes(self, name: str, batch: int) -> int:
        return int(np.prod(self.shape(name, batch))) * self.dtypes[name].itemsize

    def set_batch(self, batch: int) -> None:
        """Set the batch of every batched input (a no-op when it is already this batch)."""
        if batch == self._batch:
            return
        profile = self.record.get("build", {}).get("profile") or {}
        for name in self.input_names:
            if -1 in self.shapes[name] and not self.context.set_input_shape(name, self.shape(name, batch)):
                raise InvalidInputError(f"{self.path.name}: batch {batch} is outside the plan's profile "
                                        f"{profile}; rebuild with --batch")
        if profile.get("opt") not in (None, batch) and batch not in self._noted_batches:
            self._noted_batches.add(batch)
            log.info("%s: serving batch %d, the plan is optimised for batch %d (build-engines --opt-batch %d "
                     "tunes it for this one)", self.path.name, batch, profile["opt"], batch)
        self._batch = batch

    def mark_warm(self) -> None:
        """Call after a host synchronisation that followed enqueues at the current batch: the first
        time a batch has run, the TensorRT-RTX runtime cache (its kernels compiled for that shape) is
        saved, so a crash or kill later does not lose the compilation."""
        if self._batch is not None and self._batch not in self._warm_batches:
            self._warm_batches.add(self._batch)
            self.save_runtime_cache()

    def enqueue(self, bindings: dict[str, int], stream: int, batch: int | None = None) -> None:
        """Enqueue one inference on `stream`: `bindings` maps every input and output name to a device
        pointer the caller owns. Nothing is synchronised; outputs are ready when the stream is."""
        if batch is not None:
            self.set_batch(batch)
        elif self._batch is None:
            raise InvalidInputError("enqueue: pass batch= on the first call")
        for name, ptr in bindings.items():
            if not self.context.set_tensor_address(name, int(ptr)):
                raise InvalidInputError(self._address_refused(name, int(ptr)))
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.path.name}: TensorRT enqueue failed (see the log)")

    def _address_refused(self, name: str, ptr: int) -> str:
        if name not in self.dtypes:
            return f"{self.path.name}: no tensor '{name}' (has {self.input_names + self.output_names})"
        if ptr % ALIGN:
            return (f"{self.path.name}: TensorRT refused the address of '{name}' ({ptr:#x}): not aligned to "
                    f"{ALIGN} bytes (offsets into a buffer must keep cudaMalloc's alignment)")
        return f"{self.path.name}: TensorRT refused the address {ptr:#x} of '{name}' (see its log)"

    def _debug_buffer(self, name: str, nbytes: int) -> int:
        buf = self._debug_buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self._debug_buffers[name] = cuda.DeviceBuffer(nbytes)
        return buf.ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Synchronous debug path: upload, enqueue, download, synchronise."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise InvalidInputError(f"{self.path.name}: missing inputs {sorted(missing)}")
        batch = next((feeds[n].shape[0] for n in self.input_names if -1 in self.shapes[n]), 1)
        if self._stream is None:
            self._stream = cuda.create_stream()
        stream, bindings, host = self._stream, {}, []
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if arr.shape != self.shape(name, batch):
                raise InvalidInputError(f"{self.path.name}: input '{name}' has shape {arr.shape}, "
                                        f"expected {self.shape(name, batch)}")
            bindings[name] = self._debug_buffer(name, arr.nbytes)
            cuda.upload(bindings[name], arr, stream)
            host.append(arr)   # keep alive until the copy is done
        outs = {n: np.empty(self.shape(n, batch), self.dtypes[n]) for n in self.output_names}
        for name, arr in outs.items():
            bindings[name] = self._debug_buffer(name, arr.nbytes)
        self.enqueue(bindings, stream, batch)
        cuda.synchronize(stream)        # asleep, before the copies into pageable memory (see cuda.download)
        for name, arr in outs.items():
            cuda.download(arr, bindings[name], stream)
        self.mark_warm()
        return outs

    def close(self) -> None:
        if getattr(self, "context", None) is None:
            return
        if self._stream is not None:
            cuda.synchronize(self._stream)
        self.save_runtime_cache()
        for b in self._debug_buffers.values():
            b.free()
        self._debug_buffers = {}
        ctx, self.context = self.context, None
        self.memory.detach(ctx)
        del ctx                              # the context goes before its memory can be freed
        if self._stream is not None:
            cuda.destroy_stream(self._stream)
            self._stream = None
        self.engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
