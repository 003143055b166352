"""TensorRT backend: plans built by `arc2face-export build-engines`, run with cuda-python (no torch).

`tensorrt` (full TensorRT) or `tensorrt_rtx` (TensorRT-RTX), whichever is installed, through the API
they share; both are imported lazily, and nothing touches the GPU at import time. Before any
TensorRT runtime object exists we check that CUDA sees a device (TensorRT can crash the process
without one), then the plan's manifest record (library, GPU compute capability, file size), and only
then deserialise.

    sess = TrtSession("engines/x/projector.plan")       # same surface as OrtSession
    out = sess.run({"id": ids})                         # synchronous debug path, host arrays
    sess.enqueue({"id": d_id, "cond": d_cond}, stream, batch=2)   # async: caller owns buffers, stream

    step = TrtStepSession("engines/x/step_cfg.plan")
    x0 = step.denoise_loop(x, cond, table, guidance=3.0)  # whole N-step loop in one CUDA graph

Activation ("device") memory: sessions that run one after another on a stream share one buffer
(`SharedDeviceMemory`, sized to the largest engine), through user-managed context memory.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import manifest as mf
from ..errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from . import cuda

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- library

def import_trt():
    """`tensorrt` when installed, else `tensorrt_rtx` (same Python API for everything used here)."""
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_rtx as trt
        except ImportError as e:
            raise BackendUnavailableError(
                "the TensorRT backend needs TensorRT or TensorRT-RTX; install `pip install 'arc2face-rt[trt]'` "
                "(tensorrt-rtx) or NVIDIA's tensorrt, or use --backend ort") from e
    return trt


def library_info(trt) -> dict:
    return {"name": trt.__name__, "version": trt.__version__}


def is_rtx(trt) -> bool:
    return trt.__name__ == "tensorrt_rtx"


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}


def dtype_name(trt_dtype) -> str:
    return _DTYPE_NAMES.get(trt_dtype.name, trt_dtype.name.lower())


def make_logger(trt, logger: logging.Logger = log):
    """A trt.ILogger forwarding to `logger` (TensorRT's console logger prints to stdout)."""

    class Forward(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                     trt.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            logger.log(level, "[%s] %s", trt.__name__, msg)

    return Forward()


def rebuild_command(engines_dir: Path, record: dict | None = None) -> str:
    precision = ((record or {}).get("build") or {}).get("precision")
    prec = f" --precision {precision}" if precision in ("fp32", "fp16", "int8") else ""
    return f"`arc2face-export build-engines --out {engines_dir}{prec} --force`"


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
    device = cuda.require_device()                       # before any TensorRT runtime object
    trt = import_trt()
    library = library_info(trt)
    rec = plan_record(engines_dir, stage)
    if rec.get("file") != path.name:
        raise EngineMismatchError(f"{path}: the manifest's plan for '{stage}' is {rec.get('file')}")
    gpu_cc = cuda.compute_capability(device)
    targeted = check_plan_record(rec, engines_dir, library, gpu_cc)
    if not targeted and not is_rtx(trt):
        raise EngineMismatchError(
            f"{path}: built for compute capability {rec.get('compute_capabilities')}, this GPU "
            f"({cuda.device_name(device)}) is {gpu_cc}; rebuild on it with {rebuild_command(engines_dir, rec)}")
    data = read_plan(path, rec, verify_sha256)
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    if hasattr(runtime, "get_engine_validity"):          # TensorRT-RTX: ask the library about this GPU
        validity, diagnostics = runtime.get_engine_validity(data)
        if validity == trt.EngineValidity.INVALID:
            why = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(v)]
            raise EngineMismatchError(
                f"{path}: {library['name']} cannot run this plan on {cuda.device_name(device)} (sm {gpu_cc}): "
                f"{', '.join(why) or 'invalid'}; it targets {rec.get('compute_capabilities')}. Rebuild with "
                f"{rebuild_command(engines_dir, rec)} --compute-capability current")
        if not targeted:
            log.warning("%s: this GPU (sm %s) is not among the plan's targets %s; %s reports it %s", path.name,
                        gpu_cc, rec.get("compute_capabilities"), library["name"], validity.name)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineMismatchError(f"{path}: {library['name']} could not deserialise the plan (corrupt, or built "
                                  f"for another GPU/version); rebuild with {rebuild_command(engines_dir, rec)}")
    return trt, runtime, engine, rec, logger


# ----------------------------------------------------------------------------- device memory

class SharedDeviceMemory:
    """One activation buffer for execution contexts that never run at the same time (one stream,
    stages in sequence), sized to the largest; contexts are re-pointed when it grows.

    `generation` changes on every reallocation: CUDA graphs captured before it must be re-captured.
    """

    def __init__(self):
        self._buf: cuda.DeviceBuffer | None = None
        self._contexts: list = []
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes if self._buf else 0

    def attach(self, context, nbytes: int) -> None:
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


# ----------------------------------------------------------------------------- session

class TrtSession:
    """One plan in one execution context with user-managed activation memory.

    `enqueue` is the real path (device pointers in, nothing synchronised); `run` is the synchronous
    debug path with host arrays, like OrtSession.run.
    """

    def __init__(self, plan_path: str | Path, stage: str | None = None, memory: SharedDeviceMemory | None = None,
                 verify_sha256: bool = False, runtime_cache: bool = True):
        self.path = Path(plan_path)
        self._use_runtime_cache, self._runtime_cache = runtime_cache, None
        self._trt, self._runtime, self.engine, self.record, self._logger = load_plan(self.path, stage, verify_sha256)
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
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            tmp.write_bytes(memoryview(self._runtime_cache.serialize()))
            tmp.replace(p)
        except OSError as e:
            log.warning("%s: could not save the runtime cache (%s)", p, e)
            tmp.unlink(missing_ok=True)

    def shape(self, name: str, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == -1 else d for d in self.shapes[name])

    def nbytes(self, name: str, batch: int) -> int:
        return int(np.prod(self.shape(name, batch))) * self.dtypes[name].itemsize

    def set_batch(self, batch: int) -> None:
        if batch == self._batch:
            return
        for name in self.input_names:
            if -1 in self.shapes[name] and not self.context.set_input_shape(name, self.shape(name, batch)):
                raise InvalidInputError(f"{self.path.name}: batch {batch} is outside the plan's profile "
                                        f"{self.record.get('build', {}).get('profile')}; rebuild with --batch")
        self._batch = batch

    def enqueue(self, bindings: dict[str, int], stream: int, batch: int | None = None) -> None:
        """Enqueue one inference on `stream`: `bindings` maps every input and output name to a device
        pointer the caller owns. Nothing is synchronised; outputs are ready when the stream is."""
        if batch is not None:
            self.set_batch(batch)
        elif self._batch is None:
            raise InvalidInputError("enqueue: pass batch= on the first call")
        for name, ptr in bindings.items():
            if not self.context.set_tensor_address(name, int(ptr)):
                raise InvalidInputError(f"{self.path.name}: no tensor '{name}' (has {self.input_names + self.output_names})")
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.path.name}: TensorRT enqueue failed (see the log)")

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
        for name, arr in outs.items():
            cuda.download(arr, bindings[name], stream)
        cuda.synchronize(stream)
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


class TrtStepSession(TrtSession):
    """A step plan (`step_cfg` / `step`) plus the whole denoise loop on the device.

    `denoise_loop` uploads once, keeps the [N,8] coefficient table on the device (step k binds
    row k by pointer offset), ping-pongs x/m between two buffer pairs, and replays the N steps as ONE
    CUDA graph per signature (batch, N, cfg, noise, memory generation): warm-up enqueue, capture,
    instantiate, replay; a new signature re-captures. One synchronisation, at the end, to download.
    `mode="plain"` enqueues the steps directly instead (debugging, and the reference in tests).
    """

    def __init__(self, plan_path, stage=None, memory=None, verify_sha256=False, runtime_cache=True,
                 mode: str = "graph"):
        super().__init__(plan_path, stage, memory, verify_sha256, runtime_cache)
        need = {"x", "m_prev", "noise", "cond", "coeffs", "x_out", "m0"}
        if not need <= set(self.input_names + self.output_names):
            raise EngineMismatchError(f"{self.path}: not a step plan (tensors {self.input_names + self.output_names})")
        if mode not in ("graph", "plain"):
            raise ValueError("mode is 'graph' or 'plain'")
        self.mode = mode
        self.cfg = "guidance" in self.input_names
        self._sig = None
        self._bufs: dict[str, cuda.DeviceBuffer] = {}
        self._graph: cuda.CudaGraph | None = None
        self._loop_stream: int | None = None

    def _allocate(self, batch: int, steps: int, with_noise: bool) -> None:
        for b in self._bufs.values():
            b.free()
        lat = self.nbytes("x", batch)
        sizes = {"x0": lat, "x1": lat, "m0": lat, "m1": lat, "cond": self.nbytes("cond", batch),
                 "table": steps * self.nbytes("coeffs", 1), "noise": (steps if with_noise else 1) * lat}
        if self.cfg:
            sizes["guidance"] = self.nbytes("guidance", 1)
        self._bufs = {k: cuda.DeviceBuffer(n) for k, n in sizes.items()}

    def _bindings(self, k: int, batch: int, with_noise: bool) -> dict[str, int]:
        b, lat = self._bufs, self.nbytes("x", batch)
        x_in, x_out = (b["x0"], b["x1"]) if k % 2 == 0 else (b["x1"], b["x0"])
        m_in, m_out = (b["m0"], b["m1"]) if k % 2 == 0 else (b["m1"], b["m0"])
        out = {"x": x_in.ptr, "m_prev": m_in.ptr, "x_out": x_out.ptr, "m0": m_out.ptr, "cond": b["cond"].ptr,
               "coeffs": b["table"].ptr + k * self.nbytes("coeffs", 1),
               "noise": b["noise"].ptr + (k * lat if with_noise else 0)}
        if self.cfg:
            out["guidance"] = b["guidance"].ptr
        return out

    def _enqueue_loop(self, steps: int, batch: int, with_noise: bool, stream: int) -> None:
        # m_prev of step 0 is zero; the zero noise buffer (no-noise samplers have c3 = 0) is zeroed too.
        cuda.memset(self._bufs["m0"].ptr, self._bufs["m0"].nbytes, stream)
        if not with_noise:
            cuda.memset(self._bufs["noise"].ptr, self._bufs["noise"].nbytes, stream)
        for k in range(steps):
            self.enqueue(self._bindings(k, batch, with_noise), stream)

    def denoise_loop(self, x: np.ndarray, cond: np.ndarray, table: np.ndarray, guidance: float | None = None,
                     noise: np.ndarray | None = None) -> np.ndarray:
        """Run all N steps; return the final latents.

        x: [B,4,64,64] f32 initial latents; cond: [B,77,768] f32; table: [N,8] f32 per-step coefficients;
        guidance: CFG scale (step_cfg plans) or None (step plans); noise: [N,B,4,64,64] f32 or None.
        """
        x = np.ascontiguousarray(x, np.float32)
        cond = np.ascontiguousarray(cond, np.float32)
        table = np.ascontiguousarray(table, np.float32)
        batch, steps = x.shape[0], table.shape[0]
        if table.ndim != 2 or table.shape[1] != self.shapes["coeffs"][0] or steps < 1:
            raise InvalidInputError(f"table must be [N,{self.shapes['coeffs'][0]}], got {table.shape}")
        if x.shape != self.shape("x", batch) or cond.shape != self.shape("cond", batch):
            raise InvalidInputError(f"x {x.shape} / cond {cond.shape} do not match {self.shape('x', batch)} / "
                                    f"{self.shape('cond', batch)}")
        if self.cfg != (guidance is not None):
            raise InvalidInputError(f"{self.path.name}: guidance must be {'given' if self.cfg else 'None'} for this plan")
        with_noise = noise is not None
        if with_noise:
            noise = np.ascontiguousarray(noise, np.float32)
            if noise.shape != (steps,) + x.shape:
                raise InvalidInputError(f"noise must be {(steps,) + x.shape}, got {noise.shape}")
        if self._loop_stream is None:
            self._loop_stream = cuda.create_stream()
        stream = self._loop_stream
        sig = (batch, steps, self.cfg, with_noise, self.memory.generation)
        if sig != self._sig:
            self._drop_graph()
            self._allocate(batch, steps, with_noise)
            self.set_batch(batch)
            self._sig = sig

        b = self._bufs
        cuda.upload(b["x0"].ptr, x, stream)
        cuda.upload(b["cond"].ptr, cond, stream)
        cuda.upload(b["table"].ptr, table, stream)
        if with_noise:
            cuda.upload(b["noise"].ptr, noise, stream)
        g = np.array([guidance if guidance is not None else 1.0], np.float32)
        if self.cfg:
            cuda.upload(b["guidance"].ptr, g, stream)

        if self.mode == "plain":
            self._enqueue_loop(steps, batch, with_noise, stream)
        else:
            if self._graph is None:
                self._capture(steps, batch, with_noise, stream)
            self._graph.launch(stream)
        out = np.empty_like(x)
        cuda.download(out, b["x0" if steps % 2 == 0 else "x1"].ptr, stream)
        cuda.synchronize(stream)        # the one host synchronisation of the loop
        return out

    def _capture(self, steps: int, batch: int, with_noise: bool, stream: int) -> None:
        # Warm-up: TensorRT (and RTX's JIT) do first-enqueue work that cannot be captured. Step 0 only
        # writes x1/m1, which the graph's step 0 does not read.
        # (noise is already uploaded: only the zero-noise buffer may be cleared here.)
        cuda.memset(self._bufs["m0"].ptr, self._bufs["m0"].nbytes, stream)
        if not with_noise:
            cuda.memset(self._bufs["noise"].ptr, self._bufs["noise"].nbytes, stream)
        self.enqueue(self._bindings(0, batch, with_noise), stream)
        cuda.synchronize(stream)
        if hasattr(self.context, "is_stream_capturable") and not self.context.is_stream_capturable(stream):
            log.warning("%s: this context cannot be captured in a CUDA graph; running the loop plainly", self.path.name)
            self.mode = "plain"
            self._enqueue_loop(steps, batch, with_noise, stream)
            return
        graph = cuda.CudaGraph()
        graph.begin(stream)
        try:
            self._enqueue_loop(steps, batch, with_noise, stream)
        except BaseException:
            graph.abort(stream)
            raise
        graph.end(stream)
        self._graph = graph
        log.debug("%s: captured %d steps (batch %d) in one CUDA graph", self.path.name, steps, batch)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.destroy()
            self._graph = None

    def close(self) -> None:
        if getattr(self, "context", None) is None:
            return
        if self._loop_stream is not None:
            cuda.synchronize(self._loop_stream)
        self._drop_graph()
        for b in self._bufs.values():
            b.free()
        self._bufs = {}
        if self._loop_stream is not None:
            cuda.destroy_stream(self._loop_stream)
            self._loop_stream = None
        super().close()


STEP_STAGES = ("step_cfg", "step")


def open_session(plan_path: str | Path, memory: SharedDeviceMemory | None = None, **kw) -> TrtSession:
    """A TrtStepSession for step plans (they have denoise_loop), a TrtSession otherwise."""
    cls = TrtStepSession if Path(plan_path).stem in STEP_STAGES else TrtSession
    return cls(plan_path, memory=memory, **kw)


def open_sessions(engines_dir: str | Path, stages, **kw) -> dict[str, TrtSession]:
    """Sessions for `stages` of an engines folder, sharing one activation buffer (they run in sequence)."""
    engines_dir = Path(engines_dir)
    memory = SharedDeviceMemory()
    sessions = {}
    try:
        for s in stages:
            sessions[s] = open_session(engines_dir / f"{s}.plan", memory=memory, **kw)
    except BaseException:
        for sess in sessions.values():
            sess.close()
        memory.close()
        raise
    return sessions
