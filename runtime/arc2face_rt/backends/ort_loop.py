"""ONNX Runtime's denoise loop with everything on the execution device (CUDA: one host sync per loop).

    sess = OrtStepSession("engines/fp16/step_cfg.onnx", device="cuda")
    x0 = sess.denoise_loop(x, cond, table, guidance=3.0)

Per batch size the session keeps fixed-address tensors bound once through I/O binding (x, m_prev,
noise, cond, coeffs, guidance, and for the ControlNet step graphs control and control_scale in;
x_out, m0 out), which is what ONNX Runtime's CUDA graphs need
(`enable_cuda_graph`: the first runs of a graph id capture the step, later runs replay it; each batch
size has its own id). Between steps only the CONTENTS of those tensors change, by device-to-device
copies on the stream ONNX Runtime computes on (`user_compute_stream`): row k of the coefficient table
(kept on the device) into `coeffs`, step k's noise into `noise`, then x_out -> x and m0 -> m_prev.
Runs are not synchronised (`disable_synchronize_execution_providers`); the host waits once, asleep,
before it copies the final latents back. On the CPU provider the same loop runs with host copies (how
it is tested here).

Environment: ARC2FACE_ORT_CUDA_GRAPH=0 turns the CUDA graph off. (The CUDA provider's `prefer_nhwc`
is not offered: on an H200 it made the plain fp16 step 17% slower and ONNX Runtime 1.31 then refuses
the CUDA graph; the `--ort-cuda` graphs have their own NHWC convolutions.)
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np

from .. import specs
from ..errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from .ort import CUDA_EP, OrtSession, ort_providers

log = logging.getLogger("arc2face_rt.backends.ort")


def cuda_loop_unavailable() -> str | None:
    """Why the CUDA loop cannot run here (its device copies use cuda-python and a device), or None."""
    from . import cuda
    try:
        cuda.cudart()
    except BackendUnavailableError as e:
        return str(e)
    return None if cuda.device_count() > 0 else "cuda-python finds no CUDA device"


@dataclass(frozen=True)
class CudaLoopOptions:
    """CUDA execution provider settings of the loop (environment: see the module docstring)."""
    cuda_graph: bool = True

    @classmethod
    def from_env(cls) -> "CudaLoopOptions":
        return cls(cuda_graph=os.environ.get("ARC2FACE_ORT_CUDA_GRAPH", "1") != "0")

    def provider_options(self, stream: int) -> dict:
        return {"enable_cuda_graph": str(int(self.cuda_graph)), "user_compute_stream": str(stream)}


class _HostCopies:
    """Copies between CPU tensors (the CPU provider runs synchronously, so they are ordered)."""

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def upload(self, dst: int, array: np.ndarray) -> None:
        ctypes.memmove(dst, array.ctypes.data, array.nbytes)

    def download(self, array: np.ndarray, src: int) -> None:
        ctypes.memmove(array.ctypes.data, src, array.nbytes)

    def zero(self, dst: int, nbytes: int) -> None:
        ctypes.memset(dst, 0, nbytes)

    def sync(self) -> None:
        pass


class _DeviceCopies:
    """Copies on the stream ONNX Runtime computes on, so they are ordered with its runs."""

    def __init__(self, stream: int):
        from . import cuda
        self.cuda, self.stream = cuda, stream

    def copy(self, dst, src, nbytes):
        self.cuda.copy_device(dst, src, nbytes, self.stream)

    def upload(self, dst, array):
        self.cuda.upload(dst, array, self.stream)

    def download(self, array, src):
        self.cuda.download(array, src, self.stream)

    def zero(self, dst, nbytes):
        self.cuda.memset(dst, nbytes, self.stream)

    def sync(self):
        self.cuda.synchronize(self.stream)


class _Bound:
    """The fixed-address tensors of one batch size, bound once; plus the (unbound) device copies of
    the coefficient table and the noise, which only serve as copy sources and may be reallocated."""

    def __init__(self, sess, ort, device: str, batch: int, spec):
        def new(shape):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, device, 0)
        self.new = new
        self.values = {t.name: new(t.concrete(batch)) for t in spec.inputs + spec.outputs}
        self.binding = sess.io_binding()
        for t in spec.inputs:
            self.binding.bind_ortvalue_input(t.name, self.values[t.name])
        for t in spec.outputs:
            self.binding.bind_ortvalue_output(t.name, self.values[t.name])
        self.sources: dict[str, object] = {}

    def ptr(self, name: str) -> int:
        return self.values[name].data_ptr()

    def source(self, name: str, shape) -> int:
        """A device tensor of at least `shape`'s size, kept for the next loops."""
        n = int(np.prod(shape))
        v = self.sources.get(name)
        if v is None or int(np.prod(v.shape())) < n:
            v = self.sources[name] = self.new((n,))
        return v.data_ptr()


class OrtStepSession(OrtSession):
    """A step graph whose loop stays on the execution device (see the module docstring)."""

    def __init__(self, path, device: str = "auto", threads: int | None = None,
                 options: CudaLoopOptions | None = None):
        opts = options or CudaLoopOptions.from_env()
        stream, refused = None, None
        if CUDA_EP in ort_providers(device) and cuda_loop_unavailable() is None:
            from . import cuda
            stream = cuda.create_stream(blocking=True)   # ordered with anything ORT puts on the default stream
        try:
            try:
                super().__init__(path, device, threads, opts.provider_options(stream) if stream else None)
            except EngineMismatchError as e:
                if not (stream and opts.cuda_graph):
                    raise
                log.warning("%s: no CUDA graph (%s); running the loop without one", path, e)
                refused = str(e)[:500]
                opts = CudaLoopOptions(cuda_graph=False)
                super().__init__(path, device, threads, opts.provider_options(stream))
        except BaseException:
            if stream:
                from . import cuda
                cuda.destroy_stream(stream)
            raise
        if not self.on_gpu and stream:
            from . import cuda
            cuda.destroy_stream(stream)
            stream = None
        self.options, self._stream = opts, stream
        self.cuda_graph = self.on_gpu and opts.cuda_graph
        # why ONNX Runtime refused to load the graph with a CUDA graph (the loop then runs without one)
        self.cuda_graph_refused: str | None = refused
        self.device_type = "cuda" if self.on_gpu else "cpu"
        self.cfg = "guidance" in self.input_names
        self.control = "control" in self.input_names
        self._spec = specs.ALL_STAGES[specs.step_stage(self.cfg, self.control)]
        self._copies = _DeviceCopies(stream) if self.on_gpu else _HostCopies()
        self._bound: dict[int, _Bound] = {}
        self._run_opts: dict[int, object] = {}
        if self.cuda_graph:              # run() (host arrays, new buffers each call) must not capture or replay
            self._run_options.add_run_config_entry("gpu_graph_id", "-1")

    def _state(self, batch: int):
        if batch not in self._bound:
            import onnxruntime as ort

            self._bound[batch] = _Bound(self._sess, ort, self.device_type, batch, self._spec)
            ro = ort.RunOptions()
            if self.on_gpu:
                ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(batch))    # one captured graph per batch size
            self._run_opts[batch] = ro
        return self._bound[batch], self._run_opts[batch]

    def denoise_loop(self, x: np.ndarray, cond: np.ndarray, table: np.ndarray, guidance: float | None = None,
                     noise: np.ndarray | None = None, control: np.ndarray | None = None,
                     control_scale: float = 1.0) -> np.ndarray:
        """x [B,4,64,64], cond [B,77,768], table [N,8], noise [N,B,4,64,64] or None, control [B,3,512,512]
        (ControlNet step graphs) or None -> final latents."""
        if self.cfg != (guidance is not None):
            raise InvalidInputError(f"{self.path.name}: guidance must be {'given' if self.cfg else 'None'} for this graph")
        if self.control != (control is not None):
            raise InvalidInputError(f"{self.path.name}: a control image must be {'given' if self.control else 'None'} "
                                    "for this graph")
        x = np.ascontiguousarray(x, np.float32)
        table = np.ascontiguousarray(table, np.float32)
        batch, steps = x.shape[0], table.shape[0]
        if x.shape != self._spec.input("x").concrete(batch) or table.ndim != 2 or table.shape[1] != 8:
            raise InvalidInputError(f"x {x.shape} / table {table.shape} are not [B,4,64,64] / [N,8]")
        if self.control and np.shape(control) != self._spec.input("control").concrete(batch):
            raise InvalidInputError(f"control {np.shape(control)} is not {self._spec.input('control').concrete(batch)}")
        b, ro = self._state(batch)
        c, lat = self._copies, x.nbytes
        c.upload(b.ptr("x"), x)
        c.upload(b.ptr("cond"), np.ascontiguousarray(cond, np.float32))
        c.zero(b.ptr("m_prev"), lat)
        if self.cfg:
            c.upload(b.ptr("guidance"), np.array([guidance], np.float32))
        if self.control:      # fixed for the whole loop, like cond
            c.upload(b.ptr("control"), np.ascontiguousarray(control, np.float32))
            c.upload(b.ptr("control_scale"), np.array([control_scale], np.float32))
        row = table[0].nbytes
        d_table = b.source("table", table.shape)
        c.upload(d_table, table)
        d_noise = None
        if noise is not None:
            noise = np.ascontiguousarray(noise, np.float32)
            d_noise = b.source("noise", noise.shape)
            c.upload(d_noise, noise)
        else:
            c.zero(b.ptr("noise"), lat)
        for k in range(steps):
            c.copy(b.ptr("coeffs"), d_table + k * row, row)
            if d_noise is not None:
                c.copy(b.ptr("noise"), d_noise + k * lat, lat)
            try:
                self._sess.run_with_iobinding(b.binding, ro)
            except Exception as e:
                self._run_failed(e)
                raise
            c.copy(b.ptr("x"), b.ptr("x_out"), lat)
            c.copy(b.ptr("m_prev"), b.ptr("m0"), lat)
        # The one host synchronisation of the loop, asleep (cuda.synchronize), BEFORE the download: a
        # device-to-host copy into pageable memory returns only once it has completed, so the host would
        # otherwise wait for the whole loop inside cudaMemcpyAsync, spinning a core.
        c.sync()
        out = np.empty_like(x)
        c.download(out, b.ptr("x"))
        return out

    def close(self) -> None:
        if self._stream is not None:
            from . import cuda
            cuda.synchronize(self._stream)
        self._bound, self._run_opts = {}, {}
        super().close()
        if self._stream is not None:
            cuda.destroy_stream(self._stream)
            self._stream = None
