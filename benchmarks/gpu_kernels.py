"""GPU time per CUDA kernel while a callable runs, recorded by CUPTI through torch.profiler.

CUPTI sees every kernel the process launches, ONNX Runtime's and cuDNN's included. ONNX Runtime's own
profile (`enable_profiling`) times each node on the host, which for asynchronous CUDA kernels is mostly
the launch: on an H200 it summed to 2.9 ms for a 14 ms VAE decode. This is where a GPU session learns
which kernels hold a step back. Needs a CUDA torch; returns {"skipped": why} without one.
"""
from __future__ import annotations

from typing import Callable, Iterable

# kernel-name keywords per family, tried in order (a cuDNN convolution can be an "implicit gemm", and
# a GroupNorm kernel can name its NHWC layout)
FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "mha")),
    ("normalization", ("norm",)),
    ("convolution", ("conv", "fprop", "dgrad", "implicit", "winograd")),
    ("matmul", ("gemm", "cutlass", "cublas", "matmul")),
    ("elementwise", ("elementwise", "vectorized", "cast", "add", "mul", "silu", "gelu", "softmax",
                     "transpose", "copy", "memcpy", "memset")),
)


def family(kernel: str) -> str:
    low = kernel.lower()
    for name, words in FAMILIES:
        if any(w in low for w in words):
            return name
    return "other"


def kernel_profile(run: Callable[[], object], calls: int = 1, per: int = 1, top: int = 15) -> dict:
    """Call `run()` once untimed, then `calls` times under the profiler; GPU time per call divided by
    `per` (e.g. the steps of a loop), by kernel name and by family."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return {"skipped": f"needs torch ({e})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    torch.cuda.init()
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return summarise_kernels(prof.key_averages(), calls * per, top)


def summarise_kernels(averages: Iterable, divide: int, top: int = 15) -> dict:
    """torch.profiler's key averages (key, device_type, self_device_time_total in µs, count) of CUDA
    kernels, in ms per unit: the `top` kernels, each family's total, the sum and the kernel count."""
    by_kernel, launches = {}, 0
    for e in averages:
        if not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        by_kernel[e.key] = by_kernel.get(e.key, 0.0) + e.self_device_time_total
        launches += getattr(e, "count", 1)
    by_family = {}
    for k, us in by_kernel.items():
        f = family(k)
        by_family[f] = by_family.get(f, 0.0) + us
    div = max(1, divide) * 1e3

    def ms(d, n=None):
        return [(k[:160], round(v / div, 4)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]
    return {"ms_by_kernel": ms(by_kernel, top), "ms_by_family": ms(by_family),
            "total_ms": round(sum(by_kernel.values()) / div, 4), "kernels": round(launches / max(1, divide), 1)}
