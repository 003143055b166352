"""TensorRT runtime backend: refusals without a GPU or with a mismatched plan (always), and engine
parity with onnxruntime / CUDA-graph replay against plain enqueue (GPU only)."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from arc2face_rt import manifest as mf
from arc2face_rt import specs
from arc2face_rt.backends import cuda
from arc2face_rt.backends import trt as trt_backend
from arc2face_rt.backends.trt import plan as trt_plan
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError
from trt_needed import tensorrt

trt_build, TRT = tensorrt()

from test_trt_graphs import make_engines_dir, random_feeds  # noqa: E402

HAVE_GPU = cuda.device_count() > 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny fp16 folder with every stage built (ahead of time, so also without a GPU)."""
    d = make_engines_dir(tmp_path_factory.mktemp("trt") / "fp16", "fp16")
    trt_build.build_engines(d)
    return d


@pytest.fixture
def folder(built, tmp_path):
    """A private copy of `built` that a test may damage."""
    import shutil

    d = tmp_path / "e"
    shutil.copytree(built, d)
    return d


# ----------------------------------------------------------------------------- no GPU needed

@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU refusal")
def test_no_gpu_raises_backend_unavailable(built):
    for cls in (trt_backend.TrtSession, trt_backend.TrtStepSession):
        with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
            cls(built / "step_cfg.plan")


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU refusal")
def test_no_gpu_refusal_never_crashes_the_process(built):
    code = ("import sys; from arc2face_rt.backends.trt import open_sessions\n"
            "from arc2face_rt.errors import BackendUnavailableError\n"
            f"try: open_sessions({str(built)!r}, ['projector', 'step_cfg'])\n"
            "except BackendUnavailableError: sys.exit(7)\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600).returncode == 7


class _FakeTrt(types.SimpleNamespace):
    """Stands in for the TensorRT module: any use beyond name/version fails the test (AttributeError)."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA sees an 'sm 8.9' GPU, so the plan checks run; TensorRT itself is never reached."""
    extra = {"ComputeCapability": TRT.ComputeCapability} if trt_plan.is_rtx(TRT) else {}
    state = {"cc": "8.9", "trt": _FakeTrt(__name__=TRT.__name__, __version__=TRT.__version__, **extra)}
    monkeypatch.setattr(cuda, "require_device", lambda what="": 0)
    monkeypatch.setattr(cuda, "compute_capability", lambda device=None: state["cc"])
    monkeypatch.setattr(cuda, "device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(trt_plan, "import_trt", lambda: state["trt"])
    return state


def _edit_plan_record(d, stage, **changes):
    m = json.loads((d / mf.MANIFEST).read_text())
    m["plans"][stage].update(changes)
    mf.write_json_atomic(d / mf.MANIFEST, m)


def test_other_library_version_is_refused_with_the_rebuild_command(folder, fake_gpu):
    _edit_plan_record(folder, "step", library={"name": TRT.__name__, "version": "0.0.1"})
    with pytest.raises(EngineMismatchError, match=r"built with .* 0\.0\.1.*arc2face-export build-engines --out"):
        trt_backend.TrtSession(folder / "step.plan")


def test_other_library_is_refused(folder, fake_gpu):
    fake_gpu["trt"] = _FakeTrt(__name__="tensorrt", __version__="11.0.0")
    with pytest.raises(EngineMismatchError, match="this machine has tensorrt 11.0.0"):
        trt_backend.TrtSession(folder / "step.plan")


def test_full_tensorrt_plan_for_another_gpu_is_refused(folder, fake_gpu):
    fake_gpu["trt"] = _FakeTrt(__name__="tensorrt", __version__="11.0.0")
    _edit_plan_record(folder, "projector", library={"name": "tensorrt", "version": "11.0.0"},
                      compute_capabilities=["8.6"])
    with pytest.raises(EngineMismatchError, match=r"compute capability \['8.6'\].*is 8.9.*build-engines"):
        trt_backend.TrtSession(folder / "projector.plan")


def test_truncated_plan_is_detected(folder, fake_gpu):
    plan = folder / "vae_decoder.plan"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(EngineMismatchError, match="truncated"):
        trt_backend.TrtSession(plan)


def test_replaced_plan_is_detected_by_sha256(folder, fake_gpu):
    plan = folder / "vae_decoder.plan"
    data = bytearray(plan.read_bytes())
    data[-1] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match="sha256"):
        trt_backend.TrtSession(plan, verify_sha256=True)


def test_unrecorded_or_missing_plan_is_refused(folder, fake_gpu):
    m = json.loads((folder / mf.MANIFEST).read_text())
    del m["plans"]["step"]
    mf.write_json_atomic(folder / mf.MANIFEST, m)
    with pytest.raises(EngineMismatchError, match="no TensorRT plan recorded for 'step'"):
        trt_backend.TrtSession(folder / "step.plan")
    (folder / "step_cfg.plan").unlink()
    with pytest.raises(EngineMismatchError, match="plan missing"):
        trt_backend.TrtSession(folder / "step_cfg.plan")


def test_plan_record_targets(built):
    rec = json.loads((built / mf.MANIFEST).read_text())["plans"]["step"]
    lib = trt_plan.library_info(TRT)
    assert trt_plan.check_plan_record(rec, built, lib, rec["compute_capabilities"][0]) is True
    assert trt_plan.check_plan_record(rec, built, lib, "8.6" if "8.6" not in rec["compute_capabilities"] else "7.5") is False


# ----------------------------------------------------------------------------- GPU

def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.zeros((n, 8), np.float32)
    t[:, 0] = np.linspace(999, 40, n)
    t[:, 1] = 1.0
    t[:, 2], t[:, 3] = 1.0, rng.uniform(-0.3, -0.1, n)
    t[:, 4], t[:, 5], t[:, 6], t[:, 7] = 0.6, 0.4, rng.uniform(0, 0.1, n), 0.05
    return t


def _host_loop(ort_sess, x, cond, table, guidance, noise):
    m = np.zeros_like(x)
    for k in range(len(table)):
        feeds = {"x": x, "m_prev": m, "noise": noise[k] if noise is not None else np.zeros_like(x), "cond": cond,
                 "coeffs": table[k]}
        if guidance is not None:
            feeds["guidance"] = np.array([guidance], np.float32)
        x, m = ort_sess.run(["x_out", "m0"], feeds)
    return x


@pytest.mark.parametrize("stage", list(specs.STAGES))
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_engine_matches_onnxruntime(built, stage):
    spec = specs.STAGES[stage]
    feeds = random_feeds(spec, 2, seed=3)
    ref = dict(zip([t.name for t in spec.outputs], _ort(built / spec.onnx_file).run(None, feeds)))
    with trt_backend.TrtSession(built / spec.plan_file) as sess:
        assert sess.input_names == [t.name for t in spec.inputs]
        out = sess.run(feeds)
    for t in spec.outputs:
        assert out[t.name].dtype == np.dtype(t.dtype) and out[t.name].shape == t.concrete(2)
        if t.dtype == "uint8":
            assert np.abs(out[t.name].astype(int) - ref[t.name].astype(int)).max() <= 2
        else:
            assert _rel(out[t.name], ref[t.name]) < 2e-2


@pytest.mark.parametrize("stage,guidance,with_noise", [("step_cfg", 3.0, False), ("step", None, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_cuda_graph_loop_equals_plain_enqueue_and_host_loop(built, stage, guidance, with_noise):
    rng = np.random.default_rng(0)
    sess_graph = trt_backend.TrtStepSession(built / f"{stage}.plan", mode="graph")
    sess_plain = trt_backend.TrtStepSession(built / f"{stage}.plan", mode="plain")
    ort_sess = _ort(built / f"{stage}.onnx")
    try:
        for batch, n in [(1, 5), (1, 5), (1, 3), (2, 4)]:        # replay, then re-capture on new signatures
            x = rng.standard_normal((batch, 4, 64, 64)).astype(np.float32)
            cond = rng.standard_normal((batch, 77, 768)).astype(np.float32)
            noise = rng.standard_normal((n, batch, 4, 64, 64)).astype(np.float32) if with_noise else None
            table = _table(n, seed=n)
            got = sess_graph.denoise_loop(x, cond, table, guidance, noise)
            plain = sess_plain.denoise_loop(x, cond, table, guidance, noise)
            np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)
            assert _rel(got, _host_loop(ort_sess, x, cond, table, guidance, noise)) < 2e-2
        assert sess_graph.mode == "graph"
    finally:
        sess_graph.close()
        sess_plain.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_sessions_share_activation_memory_and_enqueue_async(built):
    sessions = trt_backend.open_sessions(built, ["projector", "step_cfg", "vae_decoder"])
    try:
        mem = sessions["projector"].memory
        assert all(s.memory is mem for s in sessions.values())
        assert mem.nbytes == max(s.engine.device_memory_size_v2 for s in sessions.values())
        proj = sessions["projector"]
        feeds = random_feeds(specs.PROJECTOR, 2)
        stream = cuda.create_stream()
        d_in, d_out = cuda.DeviceBuffer(proj.nbytes("id", 2)), cuda.DeviceBuffer(proj.nbytes("cond", 2))
        cuda.upload(d_in.ptr, feeds["id"], stream)
        proj.enqueue({"id": d_in.ptr, "cond": d_out.ptr}, stream, batch=2)
        out = np.empty((2, 77, 768), np.float32)
        cuda.download(out, d_out.ptr, stream)
        cuda.synchronize(stream)
        assert _rel(out, proj.run(feeds)["cond"]) < 1e-6
        d_in.free(), d_out.free(), cuda.destroy_stream(stream)
    finally:
        for s in sessions.values():
            s.close()


# ----------------------------------------------------------------------------- simulated device
# The loop protocol with the real tiny step graphs: FakeCudart memory, simulated engines whose kernels
# run the stage's ONNX graph with onnxruntime on whatever their tensor addresses point at, compared
# with an onnxruntime host loop (test_trt_sim.py covers the protocol with known functions).

class OrtKernels:
    def __init__(self, rt, onnx_dir):
        self.rt, self.sessions = rt, {}
        self.onnx_dir = onnx_dir

    def launch(self, stage, ptrs, batch, scratch, stream):
        spec = specs.STAGES[stage]
        if stage not in self.sessions:
            self.sessions[stage] = _ort(self.onnx_dir / spec.onnx_file)
        sess = self.sessions[stage]

        def run():
            feeds = {t.name: self.rt.device_array(ptrs[t.name], t.dtype, t.concrete(batch)).copy() for t in spec.inputs}
            for t, o in zip(spec.outputs, sess.run([t.name for t in spec.outputs], feeds)):
                self.rt.device_array(ptrs[t.name], t.dtype, t.concrete(batch))[...] = o
        self.rt.enqueue(stream, run)


@pytest.mark.parametrize("stage,guidance,with_noise", [("step_cfg", 3.0, False), ("step", None, True)])
def test_simulated_graph_loop_with_real_graphs_equals_onnxruntime(tmp_path, monkeypatch, stage, guidance, with_noise):
    from sim_cuda import FakeCudart
    from sim_trt import fake_trt, make_sim_engines

    onnx_dir = make_engines_dir(tmp_path / "onnx", "fp32", stages=(stage,))
    rt = FakeCudart()
    trt = fake_trt(OrtKernels(rt, onnx_dir))
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    monkeypatch.setattr(trt_plan, "import_trt", lambda: trt)
    engines = make_sim_engines(tmp_path / "sim", trt, stages=(stage,))
    rng = np.random.default_rng(1)
    ort_sess = _ort(onnx_dir / f"{stage}.onnx")
    with trt_backend.TrtStepSession(engines / f"{stage}.plan") as sess:
        for batch, n in [(1, 4), (1, 4), (2, 3)]:
            x = rng.standard_normal((batch, 4, 64, 64)).astype(np.float32)
            cond = rng.standard_normal((batch, 77, 768)).astype(np.float32)
            noise = rng.standard_normal((n, batch, 4, 64, 64)).astype(np.float32) if with_noise else None
            table = _table(n, seed=n)
            got = sess.denoise_loop(x, cond, table, guidance, noise)
            np.testing.assert_allclose(got, _host_loop(ort_sess, x, cond, table, guidance, noise), rtol=1e-6, atol=1e-6)
        assert sess.mode == "graph" and rt.captures == 2


@pytest.mark.skipif(cuda.device_count() > 0, reason="needs a machine without an NVIDIA GPU")
def test_backend_trt_without_a_gpu_says_so_before_what_the_folder_lacks(tiny_engines):
    """An ONNX-only folder on a machine without a GPU: building plans would not help, so the missing
    GPU is the error (it used to advise build-engines, after which the GPU error came anyway)."""
    from arc2face_rt.pipeline import Arc2FacePipeline

    with pytest.raises(BackendUnavailableError, match="GPU") as e:
        Arc2FacePipeline(tiny_engines, backend="trt")
    assert "build-engines" not in str(e.value)


def test_rebuild_advice_keeps_the_folders_quantised_precision(tmp_path):
    """A projector or decoder plan of an int8 folder records fp16 (what it was built from): advising
    --precision fp16 would rebuild the step plans unquantised. Paths are shell-quoted."""
    d = tmp_path / "my engines"
    d.mkdir()
    plans = {"projector": {"build": {"precision": "fp16"}}, "step_cfg": {"build": {"precision": "int8"}}}
    (d / mf.MANIFEST).write_text(json.dumps({"plans": plans}))
    assert trt_plan.rebuild_command(d, plans["projector"]) == \
        f"`arc2face-export build-engines --out '{d}' --precision int8 --force`"
    (d / mf.MANIFEST).write_text("{damaged")
    assert "--precision fp16" in trt_plan.rebuild_command(d, plans["projector"])   # the record alone
