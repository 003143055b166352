"""The TensorRT backend driven end to end on a simulated GPU (no TensorRT, no GPU needed).

`sim_cuda.FakeCudart` replaces cuda-python's runtime module under the real `backends.cuda` helpers,
and `sim_trt.fake_trt` replaces the TensorRT module under the real plan checks and sessions, so what
runs is our code: load_plan, TrtSession, SharedDeviceMemory, TrtStepSession (warm-up, capture,
replay, ping-pong pointers, the coefficient table) and the pipeline's one-sync batch path. The
simulated engines compute known functions (`sim_trt.*_reference`), so every result is compared
with a numpy oracle, exactly: the same numpy arithmetic runs inside the simulated kernels.
"""
from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from arc2face_rt.backends import cuda
from arc2face_rt.backends.trt import plan as trt_plan
from arc2face_rt.backends.trt import SharedDeviceMemory, TrtSession, TrtStepSession, open_sessions
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError, InvalidInputError, MissingWeightsError
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, image_noise, pick_backend, random_identity
from arc2face_rt.schedulers import make_schedule
from sim_cuda import FakeCudart
from sim_trt import HostKernels, fake_trt, loop_reference, make_sim_engines, projector_reference, vae_reference


def make_world(monkeypatch, root, cc="8.9", trt_name="tensorrt_rtx", **engines_kw):
    rt = FakeCudart(cc=cc)
    trt = fake_trt(HostKernels(rt), name=trt_name)
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    monkeypatch.setattr(trt_plan, "import_trt", lambda: trt)
    return types.SimpleNamespace(rt=rt, trt=trt, engines=make_sim_engines(root, trt, **engines_kw))


@pytest.fixture
def sim(monkeypatch, tmp_path):
    return make_world(monkeypatch, tmp_path / "engines")


def _inputs(rng, batch, steps, with_noise):
    x = rng.standard_normal((batch, 4, 64, 64)).astype(np.float32)
    cond = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    table = np.zeros((steps, 8), np.float32)
    table[:, 0] = np.linspace(999, 40, steps)
    table[:, 1], table[:, 2], table[:, 3] = 1.0, 1.0, rng.uniform(-0.3, -0.1, steps)
    table[:, 4], table[:, 5], table[:, 6] = 0.6, 0.4, rng.uniform(0, 0.1, steps)
    table[:, 7] = 0.05 if with_noise else 0.0
    noise = rng.standard_normal((steps, batch, 4, 64, 64)).astype(np.float32) if with_noise else None
    return x, cond, table, noise


SIGNATURES = [(1, 5), (1, 5), (1, 4), (4, 25), (2, 25)]


@pytest.mark.parametrize("stage,guidance,with_noise", [("step_cfg", 3.0, False), ("step", None, True)])
def test_graph_loop_equals_plain_loop_and_reference(sim, stage, guidance, with_noise):
    rng = np.random.default_rng(1)
    graph = TrtStepSession(sim.engines / f"{stage}.plan", mode="graph")
    plain = TrtStepSession(sim.engines / f"{stage}.plan", mode="plain")
    seen = set()
    for batch, steps in SIGNATURES:
        x, cond, table, noise = _inputs(rng, batch, steps, with_noise)
        syncs, captures = sim.rt.syncs, sim.rt.captures
        got = graph.denoise_loop(x, cond, table, guidance, noise)
        new = (batch, steps) not in seen
        seen.add((batch, steps))
        assert sim.rt.captures - captures == int(new)               # one capture per new signature
        assert sim.rt.syncs - syncs == (2 if new else 1)              # + the warm-up sync when capturing
        np.testing.assert_array_equal(got, plain.denoise_loop(x, cond, table, guidance, noise))
        np.testing.assert_array_equal(got, loop_reference(x, cond, table, guidance, noise))
    assert graph.mode == "graph" and sim.rt.launches == len(SIGNATURES)
    assert sim.rt.pageable_waits == 0             # the loop waits asleep, then copies the latents back
    graph.close(), plain.close()
    assert sim.rt.live_device_bytes() == 0


def test_full_tensorrt_flavour_runs_the_same_loop(monkeypatch, tmp_path):
    """Full TensorRT (what a Hopper GPU needs): no runtime config, plans built for this GPU only."""
    world = make_world(monkeypatch, tmp_path, cc="9.0", trt_name="tensorrt", ccs=("9.0",))
    x, cond, table, _ = _inputs(np.random.default_rng(9), 2, 6, False)
    with TrtStepSession(world.engines / "step_cfg.plan") as sess:
        np.testing.assert_array_equal(sess.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0))
        assert sess._runtime_cache is None and world.rt.captures == 1
    other = make_sim_engines(tmp_path / "other", world.trt, ccs=("8.9",))
    with pytest.raises(EngineMismatchError, match=r"built for compute capability \['8.9'\].*9\.0"):
        TrtSession(other / "projector.plan")


def test_not_capturable_context_runs_the_loop_uncaptured(monkeypatch, tmp_path, caplog):
    world = make_world(monkeypatch, tmp_path, step_cfg={"capturable": False})
    x, cond, table, _ = _inputs(np.random.default_rng(2), 2, 3, False)
    with TrtStepSession(world.engines / "step_cfg.plan") as sess, caplog.at_level(logging.WARNING):
        for _ in range(2):
            np.testing.assert_array_equal(sess.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0))
        assert sess.mode == "plain" and world.rt.launches == 0
    assert "cannot be captured" in caplog.text


def test_capture_invalidated_at_end_runs_the_loop_uncaptured(sim, caplog):
    x, cond, table, _ = _inputs(np.random.default_rng(3), 1, 4, False)
    sim.rt.invalidate_next_capture = True
    with TrtStepSession(sim.engines / "step_cfg.plan") as sess, caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(sess.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0))
        assert sess.mode == "plain"
    assert "invalidated" in caplog.text


def test_misaligned_tensor_address_is_named_as_such(sim):
    with TrtSession(sim.engines / "projector.plan") as sess:
        d_in, d_out = cuda.DeviceBuffer(4096), cuda.DeviceBuffer(2 * 77 * 768 * 4)
        stream = cuda.create_stream()
        with pytest.raises(InvalidInputError, match=r"'id'.*not aligned to 256 bytes"):
            sess.enqueue({"id": d_in.ptr + 32, "cond": d_out.ptr}, stream, batch=1)
        with pytest.raises(InvalidInputError, match="no tensor 'idx'"):
            sess.enqueue({"idx": d_in.ptr, "cond": d_out.ptr}, stream, batch=1)
        d_in.free(), d_out.free()


def _no_trt() -> str:
    """What auto picks when TensorRT cannot run and this onnxruntime has no CUDA (no usable GPU):
    OpenVINO on the CPU when installed, else ONNX Runtime."""
    from arc2face_rt.backends.openvino import openvino_installed
    return "openvino" if openvino_installed() else "ort"


def test_rtx_on_a_gpu_it_cannot_target_needs_full_tensorrt(monkeypatch, tmp_path):
    world = make_world(monkeypatch, tmp_path, cc="9.0", step_cfg={"invalid": ["UNSUPPORTED_CC"]})
    for stage in ("step_cfg", "projector"):
        with pytest.raises(BackendUnavailableError) as e:
            TrtSession(world.engines / f"{stage}.plan")
        assert "pip install tensorrt" in str(e.value) and "current" not in str(e.value)
    from arc2face_rt.manifest import load_manifest
    assert pick_backend(world.engines, load_manifest(world.engines), "auto") == _no_trt()
    assert trt_plan.unusable_reason().startswith("tensorrt_rtx 1.7.1.116 cannot run on Simulated GPU")


def test_auto_picks_trt_where_the_library_can_run(monkeypatch, tmp_path):
    world = make_world(monkeypatch, tmp_path, cc="8.6")
    from arc2face_rt.manifest import load_manifest
    assert pick_backend(world.engines, load_manifest(world.engines), "auto") == "trt"
    world.rt.cc = "8.7"                                        # Jetson Orin: TensorRT-RTX cannot
    assert pick_backend(world.engines, load_manifest(world.engines), "auto") == _no_trt()


def test_plain_loop_sets_its_batch_every_time(sim):
    rng = np.random.default_rng(4)
    x, cond, table, _ = _inputs(rng, 1, 3, False)
    with TrtStepSession(sim.engines / "step_cfg.plan", mode="plain") as sess:
        sess.denoise_loop(x, cond, table, 3.0)
        feeds = {"x": np.ones((2, 4, 64, 64), np.float32), "m_prev": np.zeros((2, 4, 64, 64), np.float32),
                 "noise": np.zeros((2, 4, 64, 64), np.float32), "cond": np.zeros((2, 77, 768), np.float32),
                 "coeffs": table[0], "guidance": np.array([3.0], np.float32)}
        sess.run(feeds)                                         # the debug path at batch 2 in between
        np.testing.assert_array_equal(sess.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0))


def test_shared_memory_starts_with_a_zero_byte_engine(sim):
    sessions = open_sessions(sim.engines, ["projector", "step_cfg", "vae_decoder"])
    mem = sessions["projector"].memory
    assert sessions["projector"].engine.device_memory_size_v2 == 0
    assert mem.nbytes >= max(s.engine.device_memory_size_v2 for s in sessions.values())
    ids = np.random.default_rng(5).standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_array_equal(sessions["projector"].run({"id": ids})["cond"], projector_reference(ids))
    assert sim.rt.pageable_waits == 0             # run() waits asleep before copying into numpy arrays
    for s in sessions.values():
        s.close()
    assert sim.rt.live_device_bytes() == 0


def test_memory_growth_recaptures_the_loop(sim):
    x, cond, table, _ = _inputs(np.random.default_rng(6), 1, 3, False)
    mem = SharedDeviceMemory()
    step = TrtStepSession(sim.engines / "step_cfg.plan", memory=mem)
    step.denoise_loop(x, cond, table, 3.0)
    big = make_sim_engines(sim.engines.parent / "big", sim.trt, stages=("vae_decoder",),
                           vae_decoder={"device_memory": 64 << 20})
    vae = TrtSession(big / "vae_decoder.plan", memory=mem)          # grows the buffer, frees the old one
    captures = sim.rt.captures
    np.testing.assert_array_equal(step.denoise_loop(x, cond, table, 3.0), loop_reference(x, cond, table, 3.0))
    assert sim.rt.captures == captures + 1
    step.close(), vae.close()
    assert sim.rt.live_device_bytes() == 0


def test_runtime_cache_is_saved_after_the_first_warm_up(sim):
    x, cond, table, _ = _inputs(np.random.default_rng(7), 1, 2, False)
    sess = TrtStepSession(sim.engines / "step_cfg.plan")
    cache = sim.engines / "step_cfg.rtcache"
    assert not cache.exists()
    sess.denoise_loop(x, cond, table, 3.0)
    assert cache.is_file() and b"step_cfg:1" in cache.read_bytes()      # before close: a crash keeps it
    x4, cond4, _, _ = _inputs(np.random.default_rng(7), 4, 2, False)
    sess.denoise_loop(x4, cond4, table, 3.0)
    assert b"step_cfg:4" in cache.read_bytes()                           # a new shape is saved too
    sess.close()


def test_an_interrupted_runtime_cache_save_leaves_no_temporary_file(sim, monkeypatch):
    """Killed between writing and renaming: nothing left but what remove_stale_temps would recognise."""
    import os

    x, cond, table, _ = _inputs(np.random.default_rng(7), 1, 2, False)
    sess = TrtStepSession(sim.engines / "step_cfg.plan")

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(os, "replace", killed)
        sess.denoise_loop(x, cond, table, 3.0)
    assert not [p.name for p in sim.engines.iterdir() if p.name.startswith(".")]
    sess.close()


def test_one_graph_per_signature_is_kept(sim):
    rng = np.random.default_rng(8)
    with TrtStepSession(sim.engines / "step_cfg.plan") as sess:
        for batch in (4, 1, 4, 1, 4):                              # full batches and a final partial one
            x, cond, table, _ = _inputs(rng, batch, 5, False)
            np.testing.assert_array_equal(sess.denoise_loop(x, cond, table, 3.0),
                                          loop_reference(x, cond, table, 3.0))
    assert sim.rt.captures == 2 and sim.rt.instantiations == 2


def _pipeline_reference(identity, n, opts, config=None):
    sched = make_schedule(opts.scheduler, opts.steps, config)
    cond1 = projector_reference(identity[None])
    images = []
    for start in range(0, n, opts.batch_size):
        idx = range(start, min(start + opts.batch_size, n))
        draws = [image_noise(opts.seed, i, sched) for i in idx]
        x = np.stack([d[0] for d in draws])
        noise = np.stack([d[1] for d in draws], axis=1) if sched.uses_noise else None
        lat = loop_reference(x, np.repeat(cond1, len(idx), 0), sched.table(np.float32),
                             opts.guidance if opts.guidance > 1 else None, noise)
        images.append(vae_reference(lat))
    return np.concatenate(images)


@pytest.mark.parametrize("scheduler,guidance", [("dpmpp2m", 3.0), ("lcm", 1.0)])
def test_pipeline_one_host_sync_per_batch_through_pinned_memory(sim, scheduler, guidance):
    identity = random_identity(3)
    opts = GenerationOptions(steps=4, guidance=guidance, scheduler=scheduler, seed=2, batch_size=4)
    with Arc2FacePipeline(sim.engines, backend="trt") as pipe:
        first = pipe.generate(identity, 6, opts)                      # captures the (4,) and (2,) loops
        syncs, copies = sim.rt.syncs, len(sim.rt.copies)
        again = pipe.generate(identity, 6, opts)
        assert sim.rt.syncs - syncs == 2                                # two batches, one sync each
        assert sim.rt.pageable_waits == 0
        host_copies = [c for c in sim.rt.copies[copies:] if c[0] != "DeviceToDevice"]
        assert host_copies and all(pinned for _, _, pinned in host_copies)
        assert set(again.timings) >= {"project", "denoise", "decode", "total"}
    ref = _pipeline_reference(identity, 6, opts)
    np.testing.assert_array_equal(first.images, ref)
    np.testing.assert_array_equal(again.images, ref)
    assert sim.rt.live_device_bytes() == 0 and not sim.rt.allocs       # device and pinned memory freed


def test_nan_latents_are_refused_not_decoded_to_black(sim, monkeypatch):
    """The TensorRT loop keeps latents on the device: their copy beside the pixels (same single sync)
    is checked, so broken weights give the same one-line error as on the other backends."""
    import sim_trt

    real = sim_trt.step_reference

    def nan_step(*args, **kw):
        x_out, m0 = real(*args, **kw)
        x_out[0, 0, 0, 0] = np.nan
        return x_out, m0

    monkeypatch.setattr(sim_trt, "step_reference", nan_step)
    with Arc2FacePipeline(sim.engines, backend="trt") as pipe:
        with pytest.raises(MissingWeightsError, match="NaN/inf latents"):
            pipe.generate(random_identity(3), 2, GenerationOptions(steps=3, batch_size=2))


def test_the_gpu_kernels_see_the_stream_through_the_api_of_the_cupy_installed():
    """CuPy 14 takes a foreign stream through the CUDA stream protocol (`Stream.from_external`; its
    `ExternalStream` warns on every launch); CuPy 13 has only `ExternalStream`. Stand-ins for both."""
    from sim_cupy import external_stream

    seen = []
    v14 = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=types.SimpleNamespace(from_external=lambda obj: seen.append(obj.__cuda_stream__()) or "s14"),
        ExternalStream=lambda ptr: pytest.fail("the deprecated ExternalStream was used")))
    assert external_stream(v14, 0x7F00) == "s14" and seen == [(0, 0x7F00)]
    v13 = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=object, ExternalStream=lambda ptr: ("s13", ptr)))
    assert external_stream(v13, 0x7F00) == ("s13", 0x7F00)


def test_the_host_waits_for_a_stream_asleep_on_a_blocking_sync_event(monkeypatch):
    """cudaStreamSynchronize spins a core for the whole wait under CUDA's default scheduling (an H200
    host's process used 8.25 s of CPU in 8.24 s of generation); the wait is on an event made with
    cudaEventBlockingSync instead, given back afterwards."""
    rt = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    stream = cuda.create_stream()
    cuda.synchronize(stream)
    assert rt.syncs == 1 and rt.event_flags & rt.cudaEventBlockingSync and not rt.events
    rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    with pytest.raises(RuntimeError, match="cudaEventSynchronize failed: cudaErrorCapturedEvent"):
        cuda.synchronize(stream)                 # a wait inside a capture is refused, as CUDA does
    assert not rt.events


def test_the_simulated_runtime_counts_waits_inside_pageable_copies(sim):
    """The counter the loops' tests rely on: a copy into a numpy array waits (spinning) only for work the
    host has not seen finish; an event sync covers the work up to the event's record, not after it."""
    rt = sim.rt
    stream, buf = cuda.create_stream(), cuda.DeviceBuffer(1024)
    host = np.empty(256, np.float32)
    cuda.memset(buf.ptr, 1024, stream)
    cuda.download(host, buf.ptr, stream)                      # waits for the memset
    cuda.download(host, buf.ptr, stream)                      # the first returned done: nothing to wait for
    assert rt.pageable_waits == 1
    cuda.memset(buf.ptr, 1024, stream)
    cuda.synchronize(stream)                                  # event sync up to here
    cuda.download(host, buf.ptr, stream)
    assert rt.pageable_waits == 1
    event = cuda.Event()
    event.record(stream)
    cuda.memset(buf.ptr, 1024, stream)                        # after the record
    assert rt.cudaEventSynchronize(event.handle) == (0,)
    cuda.download(host, buf.ptr, stream)
    assert rt.pageable_waits == 2
    event.destroy(), buf.free(), cuda.destroy_stream(stream)


def test_blocking_sync_for_every_wait_only_with_its_variable(monkeypatch, caplog):
    """ARC2FACE_CUDA_BLOCKING_SYNC=1 makes every CUDA wait in the process sleep (ONNX Runtime's too), on
    cuda-python's first use; without it the device keeps CUDA's default; a refusal is a warning."""
    import logging

    from sim_cuda import FakeCudart

    bindings = pytest.importorskip("cuda.bindings")
    fake = FakeCudart()
    monkeypatch.setattr(bindings, "runtime", fake, raising=False)        # what cudart() imports
    try:
        cuda.cudart.cache_clear()
        assert cuda.cudart() is fake and fake.device_flags is None
        monkeypatch.setenv("ARC2FACE_CUDA_BLOCKING_SYNC", "1")
        cuda.cudart.cache_clear()
        assert cuda.cudart() is fake and fake.device_flags == fake.cudaDeviceScheduleBlockingSync
        fake.device_flags, fake.refuse_device_flags = None, True
        cuda.cudart.cache_clear()
        with caplog.at_level(logging.WARNING):
            assert cuda.cudart() is fake
        assert "ARC2FACE_CUDA_BLOCKING_SYNC=1: cudaSetDeviceFlags(cudaDeviceScheduleBlockingSync) failed" in caplog.text
    finally:
        cuda.cudart.cache_clear()
