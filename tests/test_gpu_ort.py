"""gpu-check's `ort` phase without a GPU: its variants measured on the CPU provider (the fused graphs,
CUDA-only, recorded as errors), the conv-bias and tf32 variants' provider options, and the CUPTI
kernel summary."""
from __future__ import annotations

import pytest


def test_the_ort_phase_measures_every_variant_it_can_open(tiny_fp16_engines, tmp_path, monkeypatch):
    """gpu-check's `ort` phase code on the CPU provider: plain variants measured and agreeing, the
    fused graphs (CUDA-only kernels) recorded as errors instead of ending the phase."""
    from test_bad_input import engines_copy

    from benchmarks.gpu_ort import measure_ort_loop, measure_vae_decode

    engines = engines_copy(tiny_fp16_engines[0], tmp_path / "engines")     # the profiles go beside it
    loop = measure_ort_loop(engines, steps=3, guidance=3.0, batches=(1,), repeats=1, device="cpu")
    assert "error" in loop["variants"]["fused+graph"]
    plain = loop["variants"]["plain+graph"]
    assert plain["cuda_graph"] is False and plain["batches"]["1"]["rel_l2_vs_plain"] == 0.0
    assert plain["cuda_graph_refused"] is None and loop["onnxruntime"]["version"]
    vae = measure_vae_decode(engines, batches=(1,), repeats=1, device="cpu")
    assert "error" in vae["variants"]["fused"]
    assert vae["variants"]["plain"]["profile_batch_1"]["ms_by_op"]

    # a variant that opens and then fails while it runs is recorded; the others are still measured
    import benchmarks.gpu_ort as gpu_ort
    from arc2face_rt.backends.ort import OrtSession
    real_loop, real_run, calls = gpu_ort.time_denoise_loop, OrtSession.run, []

    def first_fails(real):
        def f(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : simulated kernel refusal")
            return real(*a, **k)
        return f
    monkeypatch.setattr(gpu_ort, "time_denoise_loop", first_fails(real_loop))
    loop = measure_ort_loop(engines, steps=3, guidance=3.0, batches=(1,), repeats=1, device="cpu")
    assert "simulated kernel refusal" in loop["variants"]["plain+graph"]["error"]
    assert loop["variants"]["plain"]["batches"]["1"]["loop_median_s"] > 0
    assert loop["variants"]["plain+graph+exhaustive"]["batches"]["1"]["rel_l2_vs_plain"] == 0.0
    calls.clear()
    monkeypatch.setattr(OrtSession, "run", first_fails(real_run))
    vae = measure_vae_decode(engines, batches=(1,), repeats=1, device="cpu")
    assert "simulated kernel refusal" in vae["variants"]["plain"]["error"]
    assert vae["variants"]["plain+exhaustive"]["profile_batch_1"]["ms_by_op"]


def test_kernel_summary_splits_gpu_time_by_kernel_and_family():
    """gpu_kernels.summarise_kernels on torch.profiler-shaped averages: only CUDA kernels count, times
    (µs) become ms per unit, and each family gets its kernels' total."""
    from types import SimpleNamespace as E

    from benchmarks.gpu_kernels import family, summarise_kernels
    events = [E(key="flash_fwd_kernel<...>", device_type="DeviceType.CUDA", self_device_time_total=5000.0, count=50),
              E(key="sm90_xmma_fprop_implicit_gemm_f16", device_type="DeviceType.CUDA",
                self_device_time_total=3000.0, count=100),
              E(key="cutlass_80_tensorop_h16816gemm", device_type="DeviceType.CUDA", self_device_time_total=1500.0,
                count=50),
              E(key="GroupNormNHWCSumKernel", device_type="DeviceType.CUDA", self_device_time_total=500.0, count=25),
              E(key="cudaLaunchKernel", device_type="DeviceType.CPU", self_device_time_total=0.0, count=900)]
    s = summarise_kernels(events, divide=25, top=2)
    assert s["ms_by_kernel"] == [("flash_fwd_kernel<...>", 0.2), ("sm90_xmma_fprop_implicit_gemm_f16", 0.12)]
    assert dict(s["ms_by_family"]) == {"attention": 0.2, "convolution": 0.12, "matmul": 0.06, "normalization": 0.02}
    assert s["total_ms"] == 0.4 and s["kernels"] == 9.0
    assert family("some_unknown_kernel") == "other"


def test_kernel_profile_says_why_it_cannot_run_without_a_cuda_torch():
    import torch

    from benchmarks.gpu_kernels import kernel_profile
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    calls = []
    assert kernel_profile(lambda: calls.append(1)) == {"skipped": "torch sees no CUDA device"}
    assert calls == []


def test_the_conv_bias_variants_fuse_the_bias_of_the_fused_graphs_only_and_the_others_never(monkeypatch):
    """conv-bias: fuse_conv_bias with TF32 (ONNX Runtime builds the fused plan only with it) for the
    --ort-cuda graphs, never for the plain ones; every variant sets the variables, so one exported before
    gpu-check ran changes no baseline."""
    from arc2face_rt.backends.ort import cuda_provider_options
    from benchmarks.gpu_ort import VAE_VARIANTS, VARIANTS, envs_set

    monkeypatch.setenv("ARC2FACE_ORT_FUSE_CONV_BIAS", "1")
    monkeypatch.setenv("ARC2FACE_ORT_TF32", "1")
    for name, (_, _, env) in VARIANTS.items():
        with envs_set(env):
            fused, plain = cuda_provider_options(fused=True), cuda_provider_options(fused=False)
        assert "fuse_conv_bias" not in plain and plain["use_tf32"] == ("1" if name == "fused+graph+tf32" else "0")
        assert fused.get("fuse_conv_bias") == ("1" if "conv-bias" in name else None), name
        assert fused["use_tf32"] == ("1" if "conv-bias" in name or "tf32" in name else "0"), name
    with envs_set(VAE_VARIANTS["fused+conv-bias"][1]):
        assert cuda_provider_options(fused=True)["fuse_conv_bias"] == "1"
