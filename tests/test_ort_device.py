"""ONNX Runtime: where a session runs comes from the session, and the fixed-address device loop.

onnxruntime-gpu falls back to the CPU without an error when CUDA or cuDNN fail to load; that is
simulated here by an onnxruntime that lists the CUDA provider while its sessions run on the CPU
(exactly what the CPU build does when asked for CUDA: it warns and drops it).
"""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime
import pytest

from arc2face_rt.backends import cuda
from arc2face_rt.backends import ort as ort_backend
from arc2face_rt.backends.ort_loop import OrtStepSession
from arc2face_rt.errors import BackendUnavailableError
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, image_noise, random_identity


@pytest.fixture
def cuda_fails_to_load(monkeypatch):
    """onnxruntime-gpu whose CUDA libraries did not load: CUDA listed, sessions on the CPU."""
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **kw: None, raising=False)


def _images(engines, device, n=2, steps=3):
    opts = GenerationOptions(steps=steps, seed=5, batch_size=2)
    with Arc2FacePipeline(engines, backend="ort", device=device) as pipe:
        res = pipe.generate(random_identity(5), n, opts)
        return res.images, {k: type(s).__name__ for k, s in pipe._sessions.items()}, pipe._sessions


@pytest.mark.parametrize("with_cuda_python", [False, True])
def test_cuda_that_did_not_load_runs_on_the_cpu_with_a_warning(tiny_engines, cuda_fails_to_load, monkeypatch,
                                                                 caplog, with_cuda_python):
    if with_cuda_python:                          # the device loop is set up, then finds the session on the CPU
        from sim_cuda import FakeCudart
        rt = FakeCudart()
        monkeypatch.setattr(cuda, "cudart", lambda: rt)
    want, _, _ = _images(tiny_engines, "cpu")
    with caplog.at_level(logging.WARNING):
        got, kinds, sessions = _images(tiny_engines, "auto")
    np.testing.assert_array_equal(got, want)
    assert kinds["step_cfg"] == "OrtSession" and not any(s.on_gpu for s in sessions.values())
    assert "could not load its CUDA execution provider" in caplog.text
    if with_cuda_python:
        assert not rt.streams                     # the loop's stream was given back


def test_cuda_asked_for_but_not_loaded_is_an_error(tiny_engines, cuda_fails_to_load):
    with pytest.raises(BackendUnavailableError, match="could not load its CUDA execution provider.*--device cpu"):
        ort_backend.OrtSession(tiny_engines / "projector.onnx", device="cuda")


def test_cpu_sessions_report_the_cpu(tiny_engines):
    sess = ort_backend.open_session(tiny_engines / "step_cfg.onnx", device="auto", step=True)
    assert type(sess).__name__ == "OrtSession" and sess.providers == ["CPUExecutionProvider"] and not sess.on_gpu


def test_device_loop_keeps_its_bound_addresses_and_matches_the_host_loop(tiny_engines):
    """The CUDA graph needs every bound tensor at a fixed address; here on the CPU provider."""
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as pipe:
        loop = OrtStepSession(tiny_engines / "step_cfg.onnx", device="cpu")
        plain = OrtStepSession(tiny_engines / "step.onnx", device="cpu")
        addresses = {}
        for batch, steps, sampler in [(2, 3, "dpmpp2m"), (1, 4, "lcm"), (2, 2, "ddim"), (1, 2, "dpmpp2m")]:
            sched = pipe.schedule(sampler, steps)
            x = np.stack([image_noise(7, i, sched)[0] for i in range(batch)])
            cond = np.repeat(pipe.project(random_identity(7)[None]), batch, axis=0)
            if sampler == "lcm":
                noise = np.stack([image_noise(7, i, sched)[1] for i in range(batch)], axis=1)
                got = plain.denoise_loop(x, cond, sched.table(), None, noise)
                np.testing.assert_allclose(got, pipe.denoise(cond, x, sched, 1.0, noise), rtol=1e-5, atol=1e-5)
                continue
            got = loop.denoise_loop(x, cond, sched.table(), 3.0)
            np.testing.assert_allclose(got, pipe.denoise(cond, x, sched, 3.0), rtol=1e-5, atol=1e-5)
            ptrs = {n: loop._bound[batch].ptr(n) for n in loop._bound[batch].values}
            assert addresses.setdefault(batch, ptrs) == ptrs
        assert sorted(loop._bound) == [1, 2] and not loop.cuda_graph and loop.device_type == "cpu"


def test_the_loop_waits_before_it_copies_the_latents_back(tiny_engines):
    """On CUDA a device-to-host copy into a plain numpy array returns only once it is done, waiting
    for the whole loop inside CUDA (spinning a core: the H200 run 20261128T025959Z used 8.18 s of CPU
    in 8.17 s at batch 16); the loop's own wait sleeps, so it must come first."""
    from arc2face_rt.backends.ort_loop import _HostCopies

    calls = []

    class Recording(_HostCopies):
        def download(self, array, src):
            calls.append("download")
            super().download(array, src)

        def sync(self):
            calls.append("sync")

    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as pipe:
        sched = pipe.schedule("dpmpp2m", 2)
        x = image_noise(3, 0, sched)[0][None]
        cond = pipe.project(random_identity(3)[None])
        loop = OrtStepSession(tiny_engines / "step_cfg.onnx", device="cpu")
        loop._copies = Recording()
        got = loop.denoise_loop(x, cond, sched.table(), 3.0)
        np.testing.assert_allclose(got, pipe.denoise(cond, x, sched, 3.0), rtol=1e-5, atol=1e-5)
    assert calls == ["sync", "download"]


@pytest.mark.parametrize("loads", [False, True])
@pytest.mark.parametrize("env,verbose", [({}, False), ({"ARC2FACE_ORT_FUSE_CONV_BIAS": "1"}, True)])
def test_cuda_sessions_take_their_provider_options_from_the_environment_and_quiet_the_process_logger(
        tiny_engines, cuda_fails_to_load, monkeypatch, caplog, tmp_path, env, verbose, loads):
    """ARC2FACE_ORT_FUSE_CONV_BIAS=1 asks cuDNN to add the convolutions' bias itself, in the --ort-cuda
    graphs only, with TF32 (which ONNX Runtime needs for that plan); without it the key is left out (an
    onnxruntime older than the option refuses keys it does not know). The cuDNN plans ONNX Runtime
    retries are logged through its process-wide logger: once CUDA has loaded, it follows -v like the
    session's; a CUDA that did not load leaves it alone, so ONNX Runtime's reason stays visible."""
    import shutil

    seen, levels = [], []
    real = onnxruntime.InferenceSession

    class OnCuda:                             # a session that reports CUDA, as onnxruntime-gpu's does
        def __init__(self, sess):
            self._sess = sess

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._sess, name)

    def spy(path, sess_options=None, providers=None, **kw):
        seen.append((path, providers))
        sess = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        return OnCuda(sess) if loads else sess
    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", levels.append)
    for name in ("ARC2FACE_ORT_FUSE_CONV_BIAS", "ARC2FACE_ORT_TF32"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fused = shutil.copy(tiny_engines / "projector.onnx", tmp_path / "projector.ort-cuda.onnx")
    with caplog.at_level(logging.INFO if verbose else logging.WARNING, logger="arc2face_rt"):
        for path in (tiny_engines / "projector.onnx", fused):
            ort_backend.OrtSession(path, device="auto")
    for path, providers in seen:
        cuda_options = next(p[1] for p in providers if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider")
        conv_bias = bool(env) and path.endswith(".ort-cuda.onnx")
        assert cuda_options.get("fuse_conv_bias") == ("1" if conv_bias else None)
        assert cuda_options["use_tf32"] == ("1" if conv_bias else "0")
        assert cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert levels == ([3 if verbose else 4] * 2 if loads else [])


def test_blocking_sync_variable_without_cuda_python_is_said_once(tiny_engines, cuda_fails_to_load, monkeypatch,
                                                                 caplog):
    """ARC2FACE_CUDA_BLOCKING_SYNC=1 is set through cuda-python before ONNX Runtime's first CUDA session;
    where cuda-python is missing the variable cannot act, and one warning says so."""
    def missing():
        raise BackendUnavailableError("no cuda-python")
    monkeypatch.setattr(cuda, "cudart", missing)
    monkeypatch.setattr(ort_backend, "_blocking_sync_warned", False)
    monkeypatch.setenv("ARC2FACE_CUDA_BLOCKING_SYNC", "1")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            ort_backend.OrtSession(tiny_engines / "projector.onnx", device="auto").close()
    assert caplog.text.count("ARC2FACE_CUDA_BLOCKING_SYNC=1 needs cuda-python") == 1
