"""A step plan and the whole denoise loop on the device, replayed as one CUDA graph per signature.

    step = TrtStepSession("engines/x/step_cfg.plan")
    x0 = step.denoise_loop(x, cond, table, guidance=3.0)  # host arrays in, final latents out, one sync

The device-level API, for callers that keep everything on one stream (the pipeline's batch path):

    st = step.loop_state(batch, steps, with_noise)        # its buffers (and graph), kept per signature
    step.upload_inputs(st, stream, x=..., table=step.padded_table(t), ...)   # or fill st.bufs on the device
                                                          # (control plans: control=, control_scale= too)
    step.enqueue_loop(st, stream)                         # replay (or warm up, capture, replay)
    step.output_ptr(st)                                   # final latents, ready when the stream is
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ...errors import EngineMismatchError, InvalidInputError
from .. import cuda
from .session import ALIGN, TrtSession

log = logging.getLogger("arc2face_rt.backends.trt")


@dataclass(eq=False)
class LoopState:
    """Device buffers of one loop signature, and its CUDA graph once captured.

    x0/x1 and m0/m1 are the ping-pong pairs; `table` holds the N coefficient rows, each padded to
    `TrtStepSession.row_bytes` (a multiple of 256: TensorRT wants aligned tensor addresses); `noise`
    holds N latents (or one zeroed latent for samplers without noise). ControlNet step plans also have
    `control` (the condition images) and `control_scale`: fixed device buffers, like `cond`."""
    batch: int
    steps: int
    with_noise: bool
    bufs: dict[str, cuda.DeviceBuffer]
    graph: cuda.CudaGraph | None = None
    generation: int = -1                  # SharedDeviceMemory.generation the graph was captured with
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.batch, self.steps, self.with_noise)


class TrtStepSession(TrtSession):
    """A step plan (`step_cfg` / `step`) plus the whole denoise loop on the device.

    Step k binds row k of the coefficient table by pointer offset and ping-pongs x/m between two
    buffer pairs. In "graph" mode the N steps are captured once per signature (batch, N, noise) as
    ONE CUDA graph (warm-up enqueue, capture, instantiate) and replayed afterwards; the last
    `MAX_LOOPS` signatures keep their buffers and graphs (a final partial batch does not re-capture
    the full one). A change of the shared activation buffer (`memory.generation`) re-captures.
    When the context cannot be captured on this stream, or CUDA invalidates the capture, the session
    logs it and runs the loop uncaptured from then on (`mode` becomes "plain"). `mode="plain"` enqueues
    the steps directly (debugging, and the reference in tests).
    """

    MAX_LOOPS = 8

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
        self.control = "control" in self.input_names     # a ControlNet step plan (step_cfg_control / step_control)
        self.row_bytes = -(-self.nbytes("coeffs", 1) // ALIGN) * ALIGN
        self._loops: OrderedDict[tuple, LoopState] = OrderedDict()
        self._loop_stream: int | None = None

    # ---- buffers ------------------------------------------------------------------------------
    @property
    def loop_stream(self) -> int:
        """The session's own stream (created on first use), used by `denoise_loop`."""
        if self._loop_stream is None:
            self._loop_stream = cuda.create_stream()
        return self._loop_stream

    def loop_state(self, batch: int, steps: int, with_noise: bool) -> LoopState:
        """The buffers (and graph) of a signature: kept from an earlier call, or allocated now."""
        key = (batch, steps, with_noise)
        st = self._loops.get(key)
        if st is not None:
            self._loops.move_to_end(key)
            return st
        while len(self._loops) >= self.MAX_LOOPS:
            self._free_state(self._loops.popitem(last=False)[1])
        lat = self.nbytes("x", batch)
        sizes = {"x0": lat, "x1": lat, "m0": lat, "m1": lat, "cond": self.nbytes("cond", batch),
                 "table": steps * self.row_bytes, "noise": (steps if with_noise else 1) * lat}
        if self.cfg:
            sizes["guidance"] = self.nbytes("guidance", 1)
        if self.control:
            sizes["control"] = self.nbytes("control", batch)
            sizes["control_scale"] = self.nbytes("control_scale", 1)
        bufs = {}
        try:
            for k, n in sizes.items():
                bufs[k] = cuda.DeviceBuffer(n)
        except BaseException:
            for b in bufs.values():
                b.free()
            raise
        st = self._loops[key] = LoopState(batch, steps, with_noise, bufs)
        return st

    def padded_table(self, table: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[N, 8] coefficients -> [N, row_bytes/4] float32 rows (the layout of the device table)."""
        width = self.row_bytes // 4
        out = np.zeros((table.shape[0], width), np.float32) if out is None else out
        out[:, :table.shape[1]] = table
        return out

    def upload_inputs(self, st: LoopState, stream: int, x=None, cond=None, table=None, noise=None,
                      guidance=None, control=None, control_scale=None) -> None:
        """Enqueue host -> device copies of the given inputs (host arrays stay untouched until the
        stream has run them; pinned ones make the copies asynchronous). `table` is `padded_table`'s."""
        b = st.bufs
        for name, arr in (("x0", x), ("cond", cond), ("table", table), ("noise", noise), ("guidance", guidance),
                          ("control", control), ("control_scale", control_scale)):
            if arr is None:
                continue
            if name not in b:
                raise InvalidInputError(f"{self.path.name}: has no '{name}' input")
            if name == "noise" and not st.with_noise:
                raise InvalidInputError(f"{self.path.name}: noise given to a loop set up without noise")
            if arr.nbytes != b[name].nbytes:
                raise InvalidInputError(f"{self.path.name}: {name} has {arr.nbytes} bytes, its loop buffer "
                                        f"{b[name].nbytes}")
            cuda.upload(b[name].ptr, arr, stream)

    def output_ptr(self, st: LoopState) -> int:
        """Where the final latents are once the stream has run the loop."""
        return st.bufs["x0" if st.steps % 2 == 0 else "x1"].ptr

    # ---- the loop -----------------------------------------------------------------------------
    def _bindings(self, st: LoopState, k: int) -> dict[str, int]:
        b, lat = st.bufs, self.nbytes("x", st.batch)
        x_in, x_out = (b["x0"], b["x1"]) if k % 2 == 0 else (b["x1"], b["x0"])
        m_in, m_out = (b["m0"], b["m1"]) if k % 2 == 0 else (b["m1"], b["m0"])
        out = {"x": x_in.ptr, "m_prev": m_in.ptr, "x_out": x_out.ptr, "m0": m_out.ptr, "cond": b["cond"].ptr,
               "coeffs": b["table"].ptr + k * self.row_bytes,
               "noise": b["noise"].ptr + (k * lat if st.with_noise else 0)}
        if self.cfg:
            out["guidance"] = b["guidance"].ptr
        if self.control:
            out["control"], out["control_scale"] = b["control"].ptr, b["control_scale"].ptr
        return out

    def _zero_state(self, st: LoopState, stream: int) -> None:
        # m_prev of step 0 is zero; so is the noise of samplers without noise (their c3 is 0 anyway)
        cuda.memset(st.bufs["m0"].ptr, st.bufs["m0"].nbytes, stream)
        if not st.with_noise:
            cuda.memset(st.bufs["noise"].ptr, st.bufs["noise"].nbytes, stream)

    def _enqueue_steps(self, st: LoopState, stream: int) -> None:
        self._zero_state(st, stream)
        for k in range(st.steps):
            self.enqueue(self._bindings(st, k), stream)

    def enqueue_loop(self, st: LoopState, stream: int) -> None:
        """Enqueue all N steps of `st` on `stream` (graph replay, or plain enqueues). No host sync,
        except the warm-up before a signature's first capture."""
        self.set_batch(st.batch)           # every loop: run() may have left the context at another batch
        if self.mode == "graph":
            if st.graph is not None and st.generation != self.memory.generation:
                st.graph.destroy()                       # activation memory moved: its pointers are stale
                st.graph = None
            if st.graph is None:
                self._capture(st, stream)
        if self.mode == "graph" and st.graph is not None:
            st.graph.launch(stream)
        else:
            self._enqueue_steps(st, stream)

    def _capture(self, st: LoopState, stream: int) -> None:
        # Warm-up: TensorRT (and RTX's JIT) do first-enqueue work that cannot be captured. Step 0 only
        # writes x1/m1, which the graph's step 0 does not read.
        self._zero_state(st, stream)
        self.enqueue(self._bindings(st, 0), stream)
        cuda.synchronize(stream)
        self.mark_warm()
        if hasattr(self.context, "is_stream_capturable") and not self.context.is_stream_capturable(stream):
            log.warning("%s: this context cannot be captured in a CUDA graph on this stream; running the loop "
                        "uncaptured", self.path.name)
            self.mode = "plain"
            return
        graph = cuda.CudaGraph()
        graph.begin(stream)
        try:
            self._enqueue_steps(st, stream)
        except Exception:
            if not graph.abort(stream):                  # a real error, not a capture CUDA gave up on
                raise
            captured = False
        else:
            captured = graph.end(stream)
        if not captured:
            graph.destroy()
            log.warning("%s: CUDA invalidated the capture of the loop; running it uncaptured", self.path.name)
            self.mode = "plain"
            return
        st.graph, st.generation = graph, self.memory.generation
        log.debug("%s: captured %d steps (batch %d) in one CUDA graph", self.path.name, st.steps, st.batch)

    def denoise_loop(self, x: np.ndarray, cond: np.ndarray, table: np.ndarray, guidance: float | None = None,
                     noise: np.ndarray | None = None, control: np.ndarray | None = None,
                     control_scale: float = 1.0) -> np.ndarray:
        """Run all N steps; return the final latents. One host synchronisation (two at a capture).

        x: [B,4,64,64] f32 initial latents; cond: [B,77,768] f32; table: [N,8] f32 per-step coefficients;
        guidance: CFG scale (step_cfg plans) or None (step plans); noise: [N,B,4,64,64] f32 or None;
        control: [B,3,512,512] f32 in [0, 1] (ControlNet step plans) or None, with its control_scale.
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
        if noise is not None:
            noise = np.ascontiguousarray(noise, np.float32)
            if noise.shape != (steps,) + x.shape:
                raise InvalidInputError(f"noise must be {(steps,) + x.shape}, got {noise.shape}")
        ctrl = self.control_inputs(batch, control, control_scale)
        st = self.loop_state(batch, steps, noise is not None)
        stream = self.loop_stream
        g = np.array([guidance], np.float32) if self.cfg else None
        self.upload_inputs(st, stream, x=x, cond=cond, table=self.padded_table(table), noise=noise, guidance=g,
                           **ctrl)
        self.enqueue_loop(st, stream)
        cuda.synchronize(stream)        # the one host synchronisation of the loop, asleep (see cuda.download)
        out = np.empty_like(x)
        cuda.download(out, self.output_ptr(st), stream)
        self.mark_warm()
        return out

    def control_inputs(self, batch: int, control, control_scale: float) -> dict:
        """{control, control_scale} host arrays for `upload_inputs` (checked), or {} for plans without them."""
        if self.control != (control is not None):
            raise InvalidInputError(f"{self.path.name}: a control image must be {'given' if self.control else 'None'} "
                                    "for this plan")
        if control is None:
            return {}
        control = np.ascontiguousarray(control, np.float32)
        if control.shape != self.shape("control", batch):
            raise InvalidInputError(f"control {control.shape} does not match {self.shape('control', batch)}")
        return {"control": control, "control_scale": np.array([control_scale], np.float32)}

    def _free_state(self, st: LoopState) -> None:
        if st.graph is not None:
            st.graph.destroy()
            st.graph = None
        for b in st.bufs.values():
            b.free()
        st.bufs = {}

    def close(self) -> None:
        if getattr(self, "context", None) is None:
            return
        if self._loop_stream is not None:
            cuda.synchronize(self._loop_stream)
        for st in self._loops.values():
            self._free_state(st)
        self._loops.clear()
        if self._loop_stream is not None:
            cuda.destroy_stream(self._loop_stream)
            self._loop_stream = None
        super().close()
