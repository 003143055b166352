"""One batch end to end on the device: projector -> denoise loop -> VAE decoder, one host sync (two on
the first batch of a (steps, batch, noise) signature, whose warm-up precedes the CUDA graph's capture).

    gen = TrtGenerator(projector_session, step_session, decoder_session)
    images, seconds = gen.generate(identity, x, table, guidance, noise)   # uint8 [B,512,512,3]

Everything is enqueued on the step session's stream: host inputs are staged in pinned buffers and
copied asynchronously, the projector writes the conditioning of the one identity, which is copied B
times into the loop's `cond` buffer on the device, the loop replays its CUDA graph, the decoder
writes uint8 pixels that come back through a pinned buffer (with the final latents, which the host
checks for NaN/inf: FloatingPointError), and only then does the host wait, once.
CUDA events time the three stages on the device (`seconds`: project, denoise, decode).
"""
from __future__ import annotations

import numpy as np

from ...specs import ID_DIM
from .. import cuda
from .session import TrtSession
from .step import TrtStepSession


class TrtGenerator:
    """Owns the pinned staging buffers and the projector/decoder device buffers (grown on demand);
    the sessions stay owned by their caller."""

    def __init__(self, projector: TrtSession, step: TrtStepSession, decoder: TrtSession):
        self.projector, self.step, self.decoder = projector, step, decoder
        self._host: dict[str, cuda.HostBuffer] = {}
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._events: list[cuda.Event] = []

    def _pinned(self, name: str, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self._host.get(name)
        if buf is None or buf.nbytes < n:
            if buf is not None:
                buf.free()
            buf = self._host[name] = cuda.HostBuffer(n)
        return buf.array(dtype, shape)

    def _buffer(self, name: str, nbytes: int) -> int:
        buf = self._device.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self._device[name] = cuda.DeviceBuffer(nbytes)
        return buf.ptr

    def generate(self, identity: np.ndarray, x: np.ndarray, table: np.ndarray, guidance: float | None,
                 noise: np.ndarray | None = None, control: np.ndarray | None = None,
                 control_scale: float = 1.0) -> tuple[np.ndarray, dict]:
        """identity [512] (unit), x [B,4,64,64], table [N,8], noise [N,B,4,64,64] or None, control
        [B,3,512,512] (ControlNet step plans: one more fixed device buffer of the loop) or None -> images, seconds."""
        step, stream = self.step, self.step.loop_stream
        batch, steps = x.shape[0], table.shape[0]
        if step.cfg != (guidance is not None):
            raise ValueError(f"{step.path.name}: guidance must be {'given' if step.cfg else 'None'}")
        ctrl = step.control_inputs(batch, control, control_scale)
        st = step.loop_state(batch, steps, noise is not None)
        if not self._events:
            self._events = [cuda.Event() for _ in range(4)]
        h_id = self._pinned("id", np.float32, (1, ID_DIM))
        h_id[0] = identity
        h_x = self._pinned("x", np.float32, x.shape)
        h_x[...] = x
        h_table = self._pinned("table", np.float32, (steps, step.row_bytes // 4))
        h_table[...] = 0
        step.padded_table(np.asarray(table, np.float32), out=h_table)
        h_noise = None
        if noise is not None:
            h_noise = self._pinned("noise", np.float32, noise.shape)
            h_noise[...] = noise
        h_g = None
        if guidance is not None:
            h_g = self._pinned("guidance", np.float32, (1,))
            h_g[0] = guidance
        for name, arr in ctrl.items():          # pinned, so the copies are asynchronous like the others
            h = self._pinned(name, np.float32, arr.shape)
            h[...] = arr
            ctrl[name] = h
        h_img = self._pinned("image", np.uint8, self.decoder.shape("image", batch))
        h_lat = self._pinned("latents", step.dtypes["x"], step.shape("x", batch))
        cond_bytes = self.projector.nbytes("cond", 1)
        d_id = self._buffer("id", self.projector.nbytes("id", 1))
        d_cond = self._buffer("cond", cond_bytes)
        d_img = self._buffer("image", self.decoder.nbytes("image", batch))

        ev = self._events
        ev[0].record(stream)
        cuda.upload(d_id, h_id, stream)
        self.projector.enqueue({"id": d_id, "cond": d_cond}, stream, batch=1)
        ev[1].record(stream)
        for i in range(batch):
            cuda.copy_device(st.bufs["cond"].ptr + i * cond_bytes, d_cond, cond_bytes, stream)
        step.upload_inputs(st, stream, x=h_x, table=h_table, noise=h_noise, guidance=h_g, **ctrl)
        step.enqueue_loop(st, stream)
        ev[2].record(stream)
        cuda.download(h_lat, step.output_ptr(st), stream)      # 64 KiB an image, checked for NaN/inf below
        self.decoder.enqueue({"latents": step.output_ptr(st), "image": d_img}, stream, batch=batch)
        cuda.download(h_img, d_img, stream)
        ev[3].record(stream)
        cuda.synchronize(stream)                 # the one host synchronisation of the batch
        for sess in (self.projector, step, self.decoder):
            sess.mark_warm()
        if not np.isfinite(h_lat).all():         # the decoder would turn them into black pixels
            raise FloatingPointError(f"{step.path.name}: the denoising loop produced NaN/inf latents")
        seconds = {"project": ev[1].seconds_since(ev[0]), "denoise": ev[2].seconds_since(ev[1]),
                   "decode": ev[3].seconds_since(ev[2])}
        return h_img.copy(), seconds

    def close(self) -> None:
        """Free the buffers (after the stream's work is done); the sessions are left open."""
        if self.step.context is not None and self.step._loop_stream is not None:
            cuda.synchronize(self.step._loop_stream)
        for b in list(self._host.values()) + list(self._device.values()):
            b.free()
        for e in self._events:
            e.destroy()
        self._host, self._device, self._events = {}, {}, []
