"""The CUDA-graph denoise loop proven on a real NVIDIA GPU without TensorRT.

The simulated TensorRT of `sim_trt` (engines with the stages' exact I/O, alignment and profile rules)
runs CuPy kernels (`sim_cupy`) on real device memory, under the REAL cuda-python helpers and the REAL
TrtStepSession: warm-up, stream capture, instantiate, replay, ping-pong pointers, the padded
coefficient table, shared activation memory and its growth, and the pipeline's one-sync batch path.
Results are compared with plain enqueues (exactly) and with the numpy oracles of `sim_trt`.
Both library flavours are simulated: full TensorRT (what an H100 needs) and TensorRT-RTX (runtime
config and cache), each claiming this GPU's compute capability.
"""
from __future__ import annotations

import numpy as np
import pytest

from arc2face_rt.backends import cuda
from arc2face_rt.backends.trt import plan as trt_plan
from arc2face_rt.backends.trt import SharedDeviceMemory, TrtSession, TrtStepSession
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

# CuPy 14 deprecated ExternalStream, which warned on every simulated launch: `sim_cupy.external_stream`
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error:ExternalStream is deprecated:DeprecationWarning")]
cupy = pytest.importorskip("cupy")
if cuda.device_count() == 0:
    pytest.skip("needs an NVIDIA GPU that cuda-python can see", allow_module_level=True)

from sim_cupy import CupyKernels  # noqa: E402
from sim_trt import RTX_CCS, fake_trt, loop_reference, make_sim_engines  # noqa: E402
from test_trt_sim import SIGNATURES, _inputs, _pipeline_reference  # noqa: E402


@pytest.fixture(params=["tensorrt", "tensorrt_rtx"])
def gpu_sim(request, monkeypatch, tmp_path):
    cc = cuda.compute_capability()
    trt = fake_trt(CupyKernels(), name=request.param, ccs=tuple(dict.fromkeys(RTX_CCS + (cc,))))
    monkeypatch.setattr(trt_plan, "import_trt", lambda: trt)
    syncs = {"n": 0}
    real_sync = cuda.synchronize

    def counting_sync(stream):
        syncs["n"] += 1
        real_sync(stream)
    monkeypatch.setattr(cuda, "synchronize", counting_sync)
    return trt, make_sim_engines(tmp_path / "engines", trt, ccs=(cc,)), syncs


@pytest.mark.parametrize("stage,guidance,with_noise", [("step_cfg", 3.0, False), ("step", None, True)])
def test_graph_loop_on_the_gpu_equals_plain_and_numpy(gpu_sim, stage, guidance, with_noise):
    trt, engines, syncs = gpu_sim
    rng = np.random.default_rng(11)
    graph = TrtStepSession(engines / f"{stage}.plan", mode="graph")
    plain = TrtStepSession(engines / f"{stage}.plan", mode="plain")
    try:
        seen = set()
        for batch, steps in SIGNATURES:
            x, cond, table, noise = _inputs(rng, batch, steps, with_noise)
            before = syncs["n"]
            got = graph.denoise_loop(x, cond, table, guidance, noise)
            new = (batch, steps) not in seen
            seen.add((batch, steps))
            assert syncs["n"] - before == (2 if new else 1)          # replay: one host sync
            np.testing.assert_array_equal(got, plain.denoise_loop(x, cond, table, guidance, noise))
            np.testing.assert_allclose(got, loop_reference(x, cond, table, guidance, noise), rtol=1e-4, atol=1e-4)
        assert graph.mode == "graph"
        assert len(graph._loops) == 4 and all(st.graph is not None for st in graph._loops.values())
    finally:
        graph.close()
        plain.close()


def test_activation_memory_growth_on_the_gpu_recaptures(gpu_sim, tmp_path):
    trt, engines, _ = gpu_sim
    x, cond, table, _ = _inputs(np.random.default_rng(12), 2, 6, False)
    mem = SharedDeviceMemory()
    step = TrtStepSession(engines / "step_cfg.plan", memory=mem)
    try:
        step.denoise_loop(x, cond, table, 3.0)
        gen = mem.generation
        big = make_sim_engines(tmp_path / "big", trt, stages=("vae_decoder",), ccs=(cuda.compute_capability(),),
                               vae_decoder={"device_memory": 256 << 20})
        vae = TrtSession(big / "vae_decoder.plan", memory=mem)
        assert mem.generation == gen + 1
        np.testing.assert_allclose(step.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0),
                                   rtol=1e-4, atol=1e-4)
        vae.close()
    finally:
        step.close()


def test_pipeline_batches_on_the_gpu_sync_once(gpu_sim):
    trt, engines, syncs = gpu_sim
    identity = random_identity(4)
    opts = GenerationOptions(steps=25, guidance=3.0, seed=1, batch_size=4)
    with Arc2FacePipeline(engines, backend="trt") as pipe:
        first = pipe.generate(identity, 6, opts)
        before = syncs["n"]
        again = pipe.generate(identity, 6, opts)
        assert syncs["n"] - before == 2                             # two batches, one host sync each
    np.testing.assert_array_equal(first.images, again.images)
    ref = _pipeline_reference(identity, 6, opts)
    assert np.abs(first.images.astype(int) - ref.astype(int)).max() <= 1
