"""The simulated engines' kernels on a real NVIDIA GPU: CuPy RawKernels (NVRTC) computing the stage
functions of `sim_trt` from the device pointers the simulated execution context was given.

Launches are allocation-free (pointers and sizes are passed by value, nothing is allocated per call),
so they can be captured in a CUDA graph, and they run on the stream TensorRT would have been given
(`external_stream`). The first launch of each kernel compiles and loads it: the step
session's warm-up enqueue, before any capture, does that. The step keeps eps in the context's
activation memory, so a context pointed at freed or too small activation memory computes garbage or
faults, as a real engine would.
"""
from __future__ import annotations

import numpy as np


class _StreamHandle:
    """A raw cudaStream_t offered through the CUDA stream protocol (`__cuda_stream__`: version 0, the
    handle), which is how CuPy 14 takes a stream it does not own."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def external_stream(cp, ptr: int):
    """CuPy's view of the stream TensorRT would have been given: `Stream.from_external` (CuPy 14, where
    `ExternalStream` is deprecated and warns on every launch), else `ExternalStream` (CuPy 13). Neither
    destroys the stream when the view goes."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    return from_external(_StreamHandle(ptr)) if from_external else cp.cuda.ExternalStream(ptr)

_SOURCE = r"""
#define LAT (4 * 64 * 64)
typedef unsigned long long ptr_t;

extern "C" __global__ void step_eps(ptr_t px, ptr_t pcond, ptr_t pc, ptr_t pg, ptr_t peps, int n, int cfg) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* x = (const float*)px; const float* cond = (const float*)pcond; const float* c = (const float*)pc;
    int b = i / LAT, ch = (i / (64 * 64)) % 4;
    float x_in = c[1] * x[i];
    float eps_c = tanhf(x_in) * 0.5f + cond[(size_t)b * 77 * 768 + ch] + c[0] * 1e-3f;
    float eps = eps_c;
    if (cfg) { float eps_u = x_in * 0.25f; eps = eps_u + ((const float*)pg)[0] * (eps_c - eps_u); }
    ((float*)peps)[i] = eps;
}

extern "C" __global__ void step_update(ptr_t px, ptr_t pm, ptr_t pn, ptr_t pc, ptr_t peps, ptr_t pxo, ptr_t pmo,
                                       int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* x = (const float*)px; const float* c = (const float*)pc;
    float m0 = c[2] * x[i] + c[3] * ((const float*)peps)[i];
    ((float*)pmo)[i] = m0;
    ((float*)pxo)[i] = c[4] * x[i] + c[5] * m0 + c[6] * ((const float*)pm)[i] + c[7] * ((const float*)pn)[i];
}

extern "C" __global__ void projector(ptr_t pid, ptr_t pcond, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int j = i % 768, r = (i / 768) % 77, b = i / (77 * 768);
    ((float*)pcond)[i] = tanhf(((const float*)pid)[b * 512 + j % 512]) + 0.01f * (float)(r % 7);
}

extern "C" __global__ void vae(ptr_t plat, ptr_t pimg, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int c = i % 3, x = (i / 3) % 512, y = (i / (3 * 512)) % 512, b = i / (3 * 512 * 512);
    float v = rintf(((const float*)plat)[(size_t)b * LAT + c * 64 * 64 + (y / 8) * 64 + x / 8] * 50.0f + 128.0f);
    ((unsigned char*)pimg)[i] = (unsigned char)fminf(fmaxf(v, 0.0f), 255.0f);
}
"""


class CupyKernels:
    """`launch` as `sim_trt.HostKernels` has it, on the GPU."""

    def __init__(self):
        import cupy

        self.cp = cupy
        module = cupy.RawModule(code=_SOURCE, options=("--std=c++14",))   # compiled and loaded here, not
        self.k = {name: module.get_function(name)                          # during a capture
                  for name in ("step_eps", "step_update", "projector", "vae")}

    def launch(self, stage: str, ptrs: dict[str, int], batch: int, scratch: tuple[int, int], stream: int) -> None:
        u, i32 = np.uint64, np.int32
        p = {k: u(v) for k, v in ptrs.items()}
        with external_stream(self.cp, stream):
            if stage in ("step", "step_cfg"):
                n = batch * 4 * 64 * 64
                grid, eps = ((n + 255) // 256,), u(scratch[0])
                cfg = "guidance" in p
                self.k["step_eps"](grid, (256,), (p["x"], p["cond"], p["coeffs"], p.get("guidance", u(0)), eps,
                                                  i32(n), i32(cfg)))
                self.k["step_update"](grid, (256,), (p["x"], p["m_prev"], p["noise"], p["coeffs"], eps, p["x_out"],
                                                     p["m0"], i32(n)))
            elif stage == "projector":
                n = batch * 77 * 768
                self.k["projector"](((n + 255) // 256,), (256,), (p["id"], p["cond"], i32(n)))
            elif stage == "vae_decoder":
                n = batch * 512 * 512 * 3
                self.k["vae"](((n + 255) // 256,), (256,), (p["latents"], p["image"], i32(n)))
            else:
                raise ValueError(stage)
