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
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError, InvalidInputError

trt_build = pytest.importorskip("arc2face_export.trt_build")
try:
    TRT = trt_build.import_trt()
except BackendUnavailableError:
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed", allow_module_level=True)

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
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 7


class _FakeTrt(types.SimpleNamespace):
    """Stands in for the TensorRT module: any use beyond name/version fails the test (AttributeError)."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA sees an 'sm 8.9' GPU, so the plan checks run; TensorRT itself is never reached."""
    state = {"cc": "8.9", "trt": _FakeTrt(__name__=TRT.__name__, __version__=TRT.__version__)}
    monkeypatch.setattr(cuda, "require_device", lambda what="": 0)
    monkeypatch.setattr(cuda, "compute_capability", lambda device=None: state["cc"])
    monkeypatch.setattr(cuda, "device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(trt_backend, "import_trt", lambda: state["trt"])
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
    lib = trt_backend.library_info(TRT)
    assert trt_backend.check_plan_record(rec, built, lib, rec["compute_capabilities"][0]) is True
    assert trt_backend.check_plan_record(rec, built, lib, "9.0") is False   # RTX: left to the library


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
# The loop logic (ping-pong buffers, table rows by pointer offset, warm-up/capture/replay protocol,
# one host sync) checked without a GPU: device memory is host bytes addressed by fake pointers,
# a "CUDA graph" records the stream's operations during capture and replays them, and the
# "engine" runs the step's ONNX graph with onnxruntime on whatever its tensor addresses point at.

class _SimDevice:
    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.next_ptr = 1 << 20
        self.capturing: list | None = None
        self.syncs = 0
        self.captures = 0

    def alloc(self, n):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + ((n + 4095) // 4096 + 1) * 4096
        self.mem[ptr] = np.full(n, 0xFF, np.uint8)        # garbage, not zeros
        return ptr

    def view(self, ptr, nbytes):
        base = max(b for b in self.mem if b <= ptr)
        off = ptr - base
        assert off + nbytes <= self.mem[base].size, "out-of-bounds device access"
        return self.mem[base][off:off + nbytes]

    def op(self, fn):
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()


@pytest.fixture
def sim(monkeypatch, built):
    dev = _SimDevice()

    class Buf:
        def __init__(self, n):
            self.nbytes, self.ptr = int(n), dev.alloc(int(n))

        def free(self):
            dev.mem.pop(self.ptr, None)
            self.ptr = 0

    class Graph:
        def begin(self, stream):
            dev.capturing, dev.captures = [], dev.captures + 1

        def end(self, stream):
            self.ops, dev.capturing = dev.capturing, None

        def abort(self, stream):
            dev.capturing = None

        def launch(self, stream):
            for fn in self.ops:
                fn()

        def destroy(self):
            self.ops = []

    def upload(dst, arr, stream):
        data = np.ascontiguousarray(arr).view(np.uint8).reshape(-1).copy()
        dev.op(lambda: dev.view(dst, data.size).__setitem__(slice(None), data))

    def download(arr, src, stream):
        dev.op(lambda: arr.reshape(-1).view(np.uint8).__setitem__(slice(None), dev.view(src, arr.nbytes)))

    def memset(ptr, n, stream):
        dev.op(lambda: dev.view(ptr, n).__setitem__(slice(None), 0))

    def synchronize(stream):
        assert dev.capturing is None, "host sync during capture"
        dev.syncs += 1

    for name, fn in {"require_device": lambda what="": 0, "compute_capability": lambda device=None: "8.9",
                     "device_name": lambda device=None: "Simulated GPU", "DeviceBuffer": Buf, "CudaGraph": Graph,
                     "create_stream": lambda: 7, "destroy_stream": lambda s: None, "synchronize": synchronize,
                     "upload": upload, "download": download, "memset": memset}.items():
        monkeypatch.setattr(cuda, name, fn)

    class Enum(types.SimpleNamespace):
        pass

    fake_trt = Enum(TensorIOMode=Enum(INPUT="in", OUTPUT="out"),
                    ExecutionContextAllocationStrategy=Enum(USER_MANAGED="user"))

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, {}

        def set_device_memory(self, ptr, n):
            self.memory = (ptr, n)

        def set_input_shape(self, name, shape):
            self.shape[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return name in self.engine.spec_names

        def is_stream_capturable(self, stream):
            return True

        def execute_async_v3(self, stream):
            addr, batch = dict(self.addr), next(iter(self.shape.values()))[0]   # snapshot, as a captured launch is
            eng = self.engine

            def run():
                feeds = {}
                for t in eng.spec.inputs:
                    shape = t.concrete(batch)
                    feeds[t.name] = dev.view(addr[t.name], int(np.prod(shape)) * 4).view(np.float32).reshape(shape).copy()
                outs = eng.ort.run([t.name for t in eng.spec.outputs], feeds)
                for t, o in zip(eng.spec.outputs, outs):
                    dev.view(addr[t.name], o.nbytes)[:] = np.ascontiguousarray(o).view(np.uint8).reshape(-1)
            dev.op(run)
            return True

    class Engine:
        device_memory_size_v2 = 4096

        def __init__(self, stage):
            self.spec = specs.STAGES[stage]
            self.ort = _ort(built / self.spec.onnx_file)
            self.tensors = list(self.spec.inputs) + list(self.spec.outputs)
            self.spec_names = {t.name for t in self.tensors}
            self.num_io_tensors = len(self.tensors)

        def get_tensor_name(self, i):
            return self.tensors[i].name

        def get_tensor_mode(self, name):
            return "in" if any(t.name == name for t in self.spec.inputs) else "out"

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name={"float32": "FLOAT", "uint8": "UINT8"}[
                next(t.dtype for t in self.tensors if t.name == name)])

        def get_tensor_shape(self, name):
            return tuple(-1 if d == "B" else d for d in next(t.shape for t in self.tensors if t.name == name))

        def create_execution_context(self, strategy):
            assert strategy == "user"
            return Context(self)

    def load_plan(path, stage=None, verify_sha256=False):
        rec = json.loads((path.parent / mf.MANIFEST).read_text())["plans"][path.stem]
        return fake_trt, None, Engine(path.stem), rec, None

    monkeypatch.setattr(trt_backend, "load_plan", load_plan)
    monkeypatch.setattr(trt_backend, "dtype_name", lambda dt: {"FLOAT": "float32", "UINT8": "uint8"}[dt.name])
    return dev


@pytest.mark.parametrize("stage,guidance,with_noise", [("step_cfg", 3.0, False), ("step", None, True)])
def test_simulated_graph_loop_equals_plain_and_host_loop(built, sim, stage, guidance, with_noise):
    rng = np.random.default_rng(1)
    ort_sess = _ort(built / f"{stage}.onnx")
    graph = trt_backend.TrtStepSession(built / f"{stage}.plan", mode="graph", runtime_cache=False)
    plain = trt_backend.TrtStepSession(built / f"{stage}.plan", mode="plain", runtime_cache=False)
    captures = 0
    for batch, n, recapture in [(1, 4, True), (1, 4, False), (1, 3, True), (2, 3, True), (2, 3, False)]:
        x = rng.standard_normal((batch, 4, 64, 64)).astype(np.float32)
        cond = rng.standard_normal((batch, 77, 768)).astype(np.float32)
        noise = rng.standard_normal((n, batch, 4, 64, 64)).astype(np.float32) if with_noise else None
        table = _table(n, seed=n)
        syncs = sim.syncs
        got = graph.denoise_loop(x, cond, table, guidance, noise)
        assert sim.syncs - syncs == (2 if recapture else 1)    # warm-up sync only when capturing
        captures += recapture
        assert sim.captures == captures
        np.testing.assert_array_equal(got, plain.denoise_loop(x, cond, table, guidance, noise))
        np.testing.assert_allclose(got, _host_loop(ort_sess, x, cond, table, guidance, noise), rtol=1e-6, atol=1e-6)
    graph.close()
    plain.close()


def test_simulated_run_and_shared_memory(built, sim):
    sessions = trt_backend.open_sessions(built, ["projector", "step"], runtime_cache=False)
    assert sessions["projector"].memory is sessions["step"].memory
    feeds = random_feeds(specs.PROJECTOR, 3)
    out = sessions["projector"].run(feeds)
    np.testing.assert_array_equal(out["cond"], _ort(built / "projector.onnx").run(None, feeds)[0])
    with pytest.raises(InvalidInputError, match="guidance must be None"):
        sessions["step"].denoise_loop(np.zeros((1, 4, 64, 64), np.float32), np.zeros((1, 77, 768), np.float32),
                                      _table(2), guidance=3.0)
    for s in sessions.values():
        s.close()
    assert sim.mem == {}                                  # every device buffer was freed
