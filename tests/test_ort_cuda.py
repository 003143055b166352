"""ONNX Runtime on CUDA (onnxruntime-gpu and a GPU): the device-resident loop with ORT's CUDA graph
against the CPU path. fp32 on the GPU must stay within one grey level of the CPU; fp16 graphs on the
GPU at >= 40 dB PSNR against fp32 on the CPU. Skipped where ONNX Runtime cannot run on CUDA."""
from __future__ import annotations

import numpy as np
import pytest

from arc2face_rt.backends import cuda
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, image_noise, random_identity

pytestmark = pytest.mark.gpu


def _ort_on_cuda(engines) -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or cuda.device_count() == 0:
        return False
    from arc2face_rt.backends.ort import OrtSession
    return OrtSession(engines / "projector.onnx", device="auto").on_gpu


@pytest.fixture(scope="module")
def fp32(tiny_engines):
    if not _ort_on_cuda(tiny_engines):
        pytest.skip("ONNX Runtime cannot run on CUDA here (onnxruntime-gpu with its CUDA 13 libraries, and a GPU)")
    return tiny_engines


@pytest.fixture(scope="module")
def fp16(fp32, tiny_model_dir, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("engines") / "fp16"
    export_all(tiny_model_dir, out, precision="fp16")
    return out


def _generate(engines, device, n=4, steps=6, batch=2):
    opts = GenerationOptions(steps=steps, seed=3, batch_size=batch)
    with Arc2FacePipeline(engines, backend="ort", device=device) as pipe:
        res = pipe.generate(random_identity(3), n, opts)
        kinds = {k: (type(s).__name__, s.on_gpu, getattr(s, "cuda_graph", None)) for k, s in pipe._sessions.items()}
        kinds["files"] = {k: s.path.name for k, s in pipe._sessions.items()}
        kinds["cuda_graph_refused"] = {k: getattr(s, "cuda_graph_refused", None) for k, s in pipe._sessions.items()}
    return res.images, kinds


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_fp32_on_cuda_is_within_one_grey_level_of_the_cpu(fp32):
    cpu, _ = _generate(fp32, "cpu")
    gpu, kinds = _generate(fp32, "cuda")
    assert kinds["step_cfg"] == ("OrtStepSession", True, True)           # device loop with ORT's CUDA graph
    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 1


def test_fp16_on_cuda_keeps_40_db_against_fp32_on_the_cpu(fp32, fp16):
    cpu, _ = _generate(fp32, "cpu")
    gpu, kinds = _generate(fp16, "cuda")
    assert kinds["step_cfg"][0] == "OrtStepSession"
    assert _psnr(gpu, cpu) >= 40.0


@pytest.fixture(scope="module")
def fused(fp32, tiny_model_dir, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("engines") / "fused"
    export_all(tiny_model_dir, out, precision="fp16", ort_cuda=True)
    return out


def test_ort_cuda_fused_graphs_run_with_a_cuda_graph_and_keep_40_db(fp32, fused, monkeypatch):
    """`onnx --ort-cuda` graphs (ONNX Runtime's fused attention, GroupNorm, NHWC convolutions) are what
    the backend opens on the GPU, capture as a CUDA graph, and stay within 40 dB of fp32 on the CPU
    and of the plain fp16 graphs on the GPU."""
    cpu, _ = _generate(fp32, "cpu")
    gpu, kinds = _generate(fused, "cuda")
    assert kinds["step_cfg"] == ("OrtStepSession", True, True), kinds["cuda_graph_refused"]
    assert kinds["files"]["step_cfg"] == "step_cfg.ort-cuda.onnx"
    assert kinds["files"]["vae_decoder"] == "vae_decoder.ort-cuda.onnx"
    assert _psnr(gpu, cpu) >= 40.0
    monkeypatch.setenv("ARC2FACE_ORT_FUSED", "0")
    plain, kinds = _generate(fused, "cuda")
    assert kinds["files"]["step_cfg"] == "step_cfg.onnx"
    assert _psnr(gpu, plain) >= 40.0


@pytest.mark.parametrize("env", [{"ARC2FACE_ORT_CUDA_GRAPH": "0"}, {"ARC2FACE_ORT_CONV_SEARCH": "EXHAUSTIVE"}])
def test_loop_variants_agree_and_sync_once(fp32, monkeypatch, env):
    from arc2face_rt.backends.ort_loop import OrtStepSession

    with Arc2FacePipeline(fp32, backend="ort", device="cpu") as pipe:
        sched = pipe.schedule("dpmpp2m", 8)
        x = np.stack([image_noise(4, i, sched)[0] for i in range(3)])
        cond = np.repeat(pipe.project(random_identity(4)[None]), 3, axis=0)
        want = pipe.denoise(cond, x, sched, 3.0)
    base = OrtStepSession(fp32 / "step_cfg.onnx", device="cuda")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    variant = OrtStepSession(fp32 / "step_cfg.onnx", device="cuda")
    calls = []
    sync, download = cuda.synchronize, cuda.download
    monkeypatch.setattr(cuda, "synchronize", lambda s: (calls.append("sync"), sync(s)))
    monkeypatch.setattr(cuda, "download", lambda *a: (calls.append("download"), download(*a)))
    for sess in (base, variant, base):                            # the second base call replays its graph
        got = sess.denoise_loop(x, cond, sched.table(), 3.0)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert calls == ["sync", "download"] * 3      # one host sync per loop, asleep, before the pageable copy
    assert variant.cuda_graph == (env.get("ARC2FACE_ORT_CUDA_GRAPH") != "0")
    base.close(), variant.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", ["projector", "step", "step_cfg", "vae_decoder"])
def test_every_graph_opens_with_a_cuda_graph(fp32, fp16, precision, graph):
    """The real CUDA provider agrees with the exporter's placement model (tests/test_cuda_placement.py):
    no host-device copy inside any exported graph, so ONNX Runtime accepts `enable_cuda_graph`."""
    import onnx

    from arc2face_export.cuda_placement import host_to_device_edges
    from arc2face_rt.backends.ort import OrtSession

    path = (fp32 if precision == "fp32" else fp16) / f"{graph}.onnx"
    assert host_to_device_edges(onnx.load(str(path), load_external_data=False)) == []
    sess = OrtSession(path, device="cuda", cuda_options={"enable_cuda_graph": "1"})
    assert sess.on_gpu
    sess.close()
