"""What a session says when the GPU path gives up: a CUDA graph ONNX Runtime refuses (the loop runs
without one, and the session keeps the reason), and a fused `--ort-cuda` graph that loads but fails to
run (one line naming ARC2FACE_ORT_FUSED=0). Simulated on the CPU provider."""
from __future__ import annotations

import numpy as np
import pytest

from arc2face_rt.backends import cuda
from arc2face_rt.backends import ort as ort_backend
from arc2face_rt.backends.ort_loop import OrtStepSession
from arc2face_rt.errors import EngineMismatchError


def test_a_refused_cuda_graph_is_kept_as_the_sessions_reason(tiny_engines, monkeypatch):
    import onnxruntime
    from sim_cuda import FakeCudart

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **kw: None, raising=False)
    rt = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    real = ort_backend.OrtSession.__init__

    def init(self, path, device="auto", threads=None, cuda_options=None):
        if (cuda_options or {}).get("enable_cuda_graph") == "1":
            raise EngineMismatchError(f"{path}: simulated: all compute graph nodes have not been partitioned")
        real(self, path, device, threads, cuda_options)

    monkeypatch.setattr(ort_backend.OrtSession, "__init__", init)
    sess = OrtStepSession(tiny_engines / "step_cfg.onnx", device="auto")
    assert "not been partitioned" in sess.cuda_graph_refused and not sess.cuda_graph
    sess.close()
    plain = OrtStepSession(tiny_engines / "step_cfg.onnx", device="cpu")
    assert plain.cuda_graph_refused is None


def test_a_fused_graph_that_fails_to_run_names_the_way_out(tiny_engines):
    sess = ort_backend.OrtSession(tiny_engines / "vae_decoder.onnx", device="cpu")
    bad = {"latents": np.zeros((1, 3, 64, 64), np.float32)}        # a run-time failure (wrong shape)
    with pytest.raises(Exception) as plain:
        sess.run(bad)
    assert not isinstance(plain.value, EngineMismatchError)
    sess.fused_graph = True                                            # as open_session marks the fused graph
    with pytest.raises(EngineMismatchError, match=r"vae_decoder.onnx: ONNX Runtime failed running this fused CUDA "
                                                  r"graph .*ARC2FACE_ORT_FUSED=0") as e:
        sess.run(bad)
    assert "\n" not in str(e.value)


def test_the_step_loop_names_the_way_out_too(tiny_engines, monkeypatch):
    sess = OrtStepSession(tiny_engines / "step_cfg.onnx", device="cpu")
    sess.fused_graph = True

    def fails(*a, **k):          # what the CUDA kernel of a fused op answers a width it does not take
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : hidden size should be 2560, 5120 or 10240")

    monkeypatch.setattr(sess._sess, "run_with_iobinding", fails)
    x = np.zeros((1, 4, 64, 64), np.float32)
    with pytest.raises(EngineMismatchError, match="step_cfg.onnx: .*hidden size should be.*ARC2FACE_ORT_FUSED=0"):
        sess.denoise_loop(x, np.zeros((1, 77, 768), np.float32), np.zeros((2, 8), np.float32), 3.0)
