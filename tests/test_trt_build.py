"""Plan building with TensorRT(-RTX) on the CPU: I/O against the stage specs, cache keys, manifest, int8.

TensorRT-RTX builds engines without a GPU; deserialising them needs one, so the engines' I/O is
checked on the parsed network (what the builder compiles) and recorded in the manifest, which the
runtime compares with the deserialised engine.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest

from arc2face_rt import manifest as mf
from arc2face_rt import specs
from arc2face_rt.backends import cuda
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from trt_needed import tensorrt

trt_build, TRT = tensorrt()
build_cli = pytest.importorskip("arc2face_export.build_cli")
trt_network = pytest.importorskip("arc2face_export.trt_network")

from test_trt_graphs import make_engines_dir, make_stage_onnx, random_feeds  # noqa: E402

NO_GPU = cuda.device_count() == 0


@pytest.fixture
def count_builds(monkeypatch):
    built = []
    real = trt_build.build_plan

    def spy(onnx_path, plan_path, spec, *a, **kw):
        built.append(spec.name)
        return real(onnx_path, plan_path, spec, *a, **kw)

    monkeypatch.setattr(trt_build, "build_plan", spy)
    return built


def _manifest(d):
    return json.loads((d / mf.MANIFEST).read_text())


@pytest.mark.skipif(not NO_GPU and not trt_build.is_rtx(TRT), reason="full TensorRT needs the target GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_every_stage_with_spec_io_and_manifest_record(tmp_path, precision):
    d = make_engines_dir(tmp_path / precision, precision)
    m = trt_build.build_engines(d)
    lib = trt_build.library_info(TRT)
    assert _manifest(d)["plans"] == m["plans"]           # written to disk, atomically
    for name, spec in specs.STAGES.items():
        rec = m["plans"][name]
        plan = d / spec.plan_file
        assert plan.is_file() and plan.stat().st_size == rec["bytes"] > 0
        assert rec["sha256"] == mf.sha256_file(plan)
        assert rec["library"] == lib
        assert rec["build"]["precision"] == precision and rec["build"]["strongly_typed"]
        assert rec["build"]["profile"] == dict(zip(("min", "opt", "max"), trt_build.stage_profile(spec, trt_build.BuildOptions())[0]))
        assert rec["onnx"] == {spec.onnx_file: m["stages"][name]["files"][spec.onnx_file]["sha256"]}
        # The network TensorRT compiled has exactly the spec's I/O (names, dtypes, shapes with "B").
        assert rec["io"] == trt_network.spec_io(spec)
        assert trt_network.onnx_io(d / spec.onnx_file) == trt_network.spec_io(spec)
        if NO_GPU:
            assert rec["compute_capabilities"] == list(trt_build.PORTABLE_RTX_CCS)


def test_cache_key_skip_force_and_changes(tmp_path, count_builds):
    d = make_engines_dir(tmp_path / "e", "fp16", stages=("projector", "step"))
    trt_build.build_engines(d)
    assert sorted(count_builds) == ["projector", "step"]
    keys = {k: v["key"] for k, v in _manifest(d)["plans"].items()}

    count_builds.clear()
    trt_build.build_engines(d)                           # nothing changed: nothing built
    assert count_builds == []

    trt_build.build_engines(d, force=True)               # --force rebuilds all
    assert sorted(count_builds) == ["projector", "step"]
    assert {k: v["key"] for k, v in _manifest(d)["plans"].items()} == keys   # same inputs, same key

    count_builds.clear()                                 # a changed ONNX (recorded by a re-export)
    m = _manifest(d)
    p = make_stage_onnx("step", d / "step.onnx", "fp16", seed=42)
    m["stages"]["step"]["files"] = {"step.onnx": mf.file_record(p)}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    trt_build.build_engines(d)
    assert count_builds == ["step"]
    assert _manifest(d)["plans"]["step"]["key"] != keys["step"]

    count_builds.clear()                                 # a changed option changes every key
    trt_build.build_engines(d, options=trt_build.BuildOptions(opt_level=1))
    assert sorted(count_builds) == ["projector", "step"]
    assert _manifest(d)["plans"]["step"]["build"]["opt_level"] == 1

    count_builds.clear()                                 # a damaged plan is rebuilt
    plan = d / "projector.plan"
    plan.write_bytes(plan.read_bytes()[:1000])
    trt_build.build_engines(d, options=trt_build.BuildOptions(opt_level=1))
    assert count_builds == ["projector"]


def test_onnx_changed_behind_the_manifest_is_refused(tmp_path):
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("step",))
    with open(d / "step.onnx", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(EngineMismatchError, match="re-export"):
        trt_build.build_engines(d)


def test_a_same_size_change_is_refused_before_a_plan_is_built_from_it(tmp_path, count_builds):
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("step",))
    data = bytearray((d / "step.onnx").read_bytes())
    data[-5] ^= 0xFF                                     # size unchanged: only the hash can tell
    (d / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match="content differs"):
        trt_build.build_engines(d)
    assert count_builds == []


def test_batch_option_sets_the_profile(tmp_path):
    assert trt_build.parse_batch("8") == (1, 8, 8)
    assert trt_build.parse_batch("1,4") == (1, 4, 4)
    assert trt_build.parse_batch("1,4,8") == (1, 4, 8)
    assert trt_build.parse_batch(" 1, 4 ") == (1, 4, 4)
    for bad in ("0", "4,2,8", "a", "1,2,3,4", "1,,4", "4,", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            trt_build.parse_batch(bad)
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("vae_decoder",))
    m = trt_build.build_engines(d, options=trt_build.BuildOptions(batch=(1, 4, 8)))
    assert m["plans"]["vae_decoder"]["build"]["profile"] == {"min": 1, "opt": 4, "max": 8}


def test_per_image_stages_are_tuned_for_the_served_batch(tmp_path):
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector", "vae_decoder"))
    m = trt_build.build_engines(d)
    vae, proj = m["plans"]["vae_decoder"]["build"], m["plans"]["projector"]["build"]
    assert vae["profile"] == {"min": 1, "opt": specs.DEFAULT_BATCH, "max": 16}      # what generate serves
    assert "default --batch" in vae["opt_batch_from"]
    assert proj["profile"]["opt"] == 1                                             # once per identity
    assert trt_build.stage_profile(specs.STEP_CFG, trt_build.BuildOptions(opt_batch=8)) == ((1, 8, 16), "--opt-batch")
    assert trt_build.stage_profile(specs.STEP, trt_build.BuildOptions(batch=(1, 2, 8)))[0] == (1, 2, 8)
    assert trt_build.stage_profile(specs.PROJECTOR, trt_build.BuildOptions(opt_batch=8))[0] == (1, 1, 16)
    with pytest.raises(InvalidInputError, match="outside the batch profile"):
        trt_build.stage_profile(specs.STEP, trt_build.BuildOptions(batch=(1, 2, 4), opt_batch=8))


@pytest.mark.skipif(not trt_build.is_rtx(TRT), reason="TensorRT-RTX only")
def test_rtx_will_not_target_a_gpu_it_cannot_run_on(monkeypatch):
    from sim_cuda import FakeCudart

    rt = FakeCudart(cc="9.0", name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    for requested in ("auto", "current"):
        with pytest.raises(BackendUnavailableError, match=r"H100.*9\.0.*pip install tensorrt"):
            trt_build.resolve_compute_capabilities(TRT, requested)
    assert trt_build.resolve_compute_capabilities(TRT, "8.9,12.0") == ("8.9", "12.0")   # for other GPUs: fine


def test_onnx_that_does_not_match_its_spec_is_refused(tmp_path):
    # A projector graph saved as "step": names and shapes differ from the step spec.
    p = make_stage_onnx("projector", tmp_path / "step.onnx")
    with pytest.raises(EngineMismatchError, match="differ from stage spec 'step'"):
        trt_build.build_plan(p, tmp_path / "step.plan", specs.STEP)
    assert not (tmp_path / "step.plan").exists()


@pytest.mark.skipif(not trt_build.is_rtx(TRT) or not NO_GPU, reason="TensorRT-RTX on a machine without a GPU")
def test_compute_capability_choice_without_gpu():
    assert trt_build.resolve_compute_capabilities(TRT, "auto") == trt_build.PORTABLE_RTX_CCS
    assert trt_build.resolve_compute_capabilities(TRT, "8.9, 12.0") == ("8.9", "12.0")
    assert trt_build.resolve_compute_capabilities(TRT, "7.5") == ("7.5",)
    with pytest.raises(InvalidInputError, match="cannot target"):
        trt_build.resolve_compute_capabilities(TRT, "9.9")
    with pytest.raises(BackendUnavailableError):
        trt_build.resolve_compute_capabilities(TRT, "current")


@pytest.mark.skipif(not trt_build.is_rtx(TRT), reason="TensorRT-RTX only")
def test_explicit_compute_capability_is_keyed_and_recorded(tmp_path, count_builds):
    d = make_engines_dir(tmp_path / "e", "fp16", stages=("step_cfg",))
    trt_build.build_engines(d, options=trt_build.BuildOptions(compute_capability="8.9"))
    rec = _manifest(d)["plans"]["step_cfg"]
    assert rec["compute_capabilities"] == ["8.9"]
    trt_build.build_engines(d, options=trt_build.BuildOptions(compute_capability="8.6,8.9"))
    assert count_builds == ["step_cfg", "step_cfg"]
    assert _manifest(d)["plans"]["step_cfg"]["key"] != rec["key"]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_step_graphs_build(tmp_path, precision):
    from arc2face_export import quantize

    d = make_engines_dir(tmp_path / "e", "fp16", stages=("step_cfg", "step", "projector"))
    feeds = [random_feeds(specs.STEP_CFG, 2, seed=i) for i in range(6)]
    for stage in ("step_cfg", "step"):
        rec = quantize.quantize_stage(d, stage, [quantize.QuantRecipe(precision)], feeds=feeds)[precision]
        assert rec["quantized_layers"] >= 3 and rec["calibration_samples"] == 6
        for out, loss in rec["loss_vs_source"].items():
            assert loss["rel_l2"] < 0.05 and loss["psnr_db"] > 30, (stage, out, loss)
    m = trt_build.build_engines(d, precision=precision)
    for stage in ("step_cfg", "step"):
        plan = m["plans"][stage]
        assert plan["build"]["precision"] == precision
        assert list(plan["onnx"]) == [quantize.quant_onnx_file(stage, precision)]
        assert plan["io"] == trt_network.spec_io(specs.STAGES[stage])
        _, net, _, _ = trt_network.parse_onnx(TRT, d / quantize.quant_onnx_file(stage, precision))
        kinds = {net.get_layer(i).type.name for i in range(net.num_layers)}
        assert {"QUANTIZE", "DEQUANTIZE"} <= kinds          # explicit Q/DQ reached TensorRT
    assert m["plans"]["projector"]["build"]["precision"] == "fp16"   # no quantised graph: the fp16 one


def test_quantized_from_recorded_calibration_data(tmp_path):
    from arc2face_export import quantize

    d = make_engines_dir(tmp_path / "e", "fp16", stages=("step",))
    npz = tmp_path / "calib.npz"
    feeds = [random_feeds(specs.STEP, 1, seed=i) for i in range(3)]
    np.savez(npz, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    recipe = quantize.QuantRecipe("int8")
    quantize.ensure_quant_graphs(d, [recipe], calib_path=npz)
    m = _manifest(d)
    assert m["quantized"]["step"]["calibration_samples"] == 3
    assert m["quantized"]["step"]["calibration"]["source"] == "recorded"
    cal = quantize.calib.Calibration(data_sha256=mf.sha256_file(npz))
    assert m["quantized"]["step"]["calibration"]["data_sha256"] == cal.data_sha256
    assert quantize.quant_is_current(d, m, "step", recipe, cal)


@pytest.mark.parametrize("bad,words", [
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), "not an .npz"),
    (lambda p: p.write_bytes(b"PK\x03\x04 garbage"), "cannot read"),
    (lambda p: np.savez(p, x=np.float32(1)), "no per-sample arrays"),
    (lambda p: np.savez(p, x=np.zeros((2, 1, 4, 64, 64), np.float32)), "is missing"),
    (lambda p: np.savez(p, **{k: (v[..., :8, :] if k == "x" else v) for k, v in _calib_arrays().items()}),
     "'x' is float32[1, 4, 8, 64]"),
    (lambda p: p.write_bytes(b"not an archive " * 20), "(not an .npz archive)"),   # numpy: "allow_pickle=..."
    (lambda p: np.savez(p, **{**_calib_arrays(), "x": np.full_like(_calib_arrays()["x"], np.nan)}), "holds NaN"),
    (lambda p: np.savez(p, **{**_calib_arrays(), "x": np.full_like(_calib_arrays()["x"], 1e30)}),
     "beyond fp16's range"),
    (lambda p: np.savez(p, **{k: v[:, :0] if v.ndim > 2 else v for k, v in _calib_arrays().items()}), "with B >= 1"),
    (lambda p: np.savez(p, **{**_calib_arrays(), "cond": np.concatenate([_calib_arrays()["cond"]] * 2, axis=1)}),
     "'cond' is float32[2, 77, 768]; the step graph takes float ['B', 77, 768] with B = 1"),
    # all zeros: accepted, and the manifest then held NaN and Infinity, which strict JSON readers refuse
    (lambda p: np.savez(p, **{k: np.zeros_like(v) for k, v in _calib_arrays().items()}),
     "input 'x' holds the one value 0 in every sample"),
], ids=["npy", "garbage", "scalar", "missing-input", "wrong-shape", "text", "nan", "1e30", "batch-0", "mixed-batch",
        "zeros"])
def test_unusable_calibration_data_is_refused_before_any_work(tmp_path, bad, words):
    d = make_engines_dir(tmp_path / "e", "fp16", stages=("step",))
    before = sorted(p.name for p in d.iterdir())
    npz = tmp_path / "calib.npz"
    bad(npz)
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", "--out", str(d), "--precision", "int8", "--calib-data", str(npz),
                              "--stages", "step"])
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        args.func(args)
    assert sorted(p.name for p in d.iterdir()) == before


def _calib_arrays():
    feeds = [random_feeds(specs.STEP, 1, seed=i) for i in range(2)]
    return {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}


def test_build_engines_cli_on_an_exported_folder(tmp_path):
    d = make_engines_dir(tmp_path / "e", "fp16", stages=("projector",))
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", "--out", str(d), "--stages", "projector", "--batch", "1,2,4",
                              "--opt-level", "2"])
    assert args.func(args) == 0
    rec = _manifest(d)["plans"]["projector"]
    assert rec["build"]["opt_level"] == 2 and rec["build"]["profile"] == {"min": 1, "opt": 2, "max": 4}


def test_build_engines_cli_without_onnx_needs_model_dir(tmp_path):
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", "--out", str(tmp_path / "none")])
    with pytest.raises(EngineMismatchError, match="--model-dir"):
        args.func(args)


def test_plans_from_the_real_tiny_export(tiny_engines, tmp_path):
    """Every stage of the real tiny random-weight export builds, with the I/O of its spec."""
    d = tmp_path / "engines"
    shutil.copytree(tiny_engines, d)                    # the fixture is shared: build in a copy
    m = trt_build.build_engines(d)
    assert set(m["plans"]) == set(specs.STAGES)
    for name, spec in specs.STAGES.items():
        assert m["plans"][name]["io"] == trt_network.spec_io(spec)
        assert (d / spec.plan_file).stat().st_size == m["plans"][name]["bytes"]


def test_without_tensorrt_the_build_advice_fits_build_engines(monkeypatch):
    """The runtime's advice (`--backend ort`, a generate flag) is not what build-engines can take."""
    import sys

    from arc2face_export import trt_network
    from arc2face_rt.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailableError) as e:
        trt_network.import_trt()
    assert str(e.value).endswith("runs the ONNX graphs that `arc2face-export onnx` writes"), e.value
