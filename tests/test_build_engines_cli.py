"""`arc2face-export build-engines` on folders it must take as they are, or refuse before any work: a partial
export (LCM recipe), --stages the folder cannot have, calibration settings that changed since the
quantised graph was written, and where --force reaches.

The engines folders are the tiny stand-in graphs of test_trt_graphs (plans build in well under a second)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from arc2face_rt import manifest as mf
from arc2face_rt import specs
from arc2face_rt.errors import EngineMismatchError, InvalidInputError
from trt_needed import tensorrt

trt_build, _ = tensorrt()
build_cli = pytest.importorskip("arc2face_export.build_cli")

from test_trt_graphs import make_engines_dir, random_feeds  # noqa: E402

LCM_STAGES = ("projector", "step", "vae_decoder")     # README: `onnx --stages projector step vae_decoder`


def _run(*argv):
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", *map(str, argv)])
    return args.func(args)


def _manifest(d):
    return json.loads((d / mf.MANIFEST).read_text())


class _Exported(Exception):
    pass


@pytest.fixture
def export_calls(monkeypatch):
    """export_all replaced by a spy that records its arguments and stops the command there."""
    from arc2face_export import onnx_export

    calls = []

    def spy(model_dir, out, **kw):
        calls.append({"out": out, **kw})
        raise _Exported

    monkeypatch.setattr(onnx_export, "export_all", spy)
    return calls


def test_without_stages_a_partial_export_builds_the_stages_its_manifest_has(tmp_path):
    d = make_engines_dir(tmp_path / "lcm", "fp16", stages=LCM_STAGES)
    assert _run("--out", d, "--no-face") == 0
    assert sorted(_manifest(d)["plans"]) == sorted(LCM_STAGES)
    for s in LCM_STAGES:
        assert (d / specs.STAGES[s].plan_file).is_file()


def test_a_stage_the_export_lacks_names_advice_that_works_when_followed(tmp_path, tiny_model_dir, export_calls):
    d = make_engines_dir(tmp_path / "lcm", "fp16", stages=LCM_STAGES)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(EngineMismatchError, match=r"fp16 ONNX graph\(s\) of step_cfg are not in this folder; pass "
                                                  r"--model-dir MODEL --force .*leave them out of --stages"):
        _run("--out", d, "--no-face", "--stages", "step_cfg")
    with pytest.raises(EngineMismatchError, match=r"not in this folder; pass --force to re-export"):
        _run("--out", d, "--no-face", "--stages", "step_cfg", "--model-dir", tiny_model_dir)
    assert not export_calls and sorted(p.name for p in d.iterdir()) == before
    with pytest.raises(_Exported):               # the advice followed: build-engines' --force reaches the export
        _run("--out", d, "--no-face", "--stages", "step_cfg", "--model-dir", tiny_model_dir, "--force")
    assert export_calls == [{"out": d, "precision": "fp16", "force": True}]


def test_a_complete_export_of_other_model_files_is_not_built_silently(tmp_path, tiny_model_dir, export_calls):
    """build-engines --model-dir run/checkpoint-2000 into a folder exported from checkpoint-1000 built the
    old graphs' plans, exit 0; now the differing files are named, and --force re-exports."""
    import shutil

    from arc2face_ref.loading import model_files

    d = make_engines_dir(tmp_path / "e", "fp16", stages=LCM_STAGES)
    m = _manifest(d)
    m["source"]["files"] = {str(p.relative_to(tiny_model_dir)): mf.file_record(p) for p in model_files(tiny_model_dir)}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    newer = tmp_path / "checkpoint-2000"
    shutil.copytree(tiny_model_dir, newer)
    changed = model_files(newer)[0]
    changed.write_bytes(changed.read_bytes() + b" ")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(EngineMismatchError, match=rf"exported from other model files than --model-dir {newer} "
                                                  rf"\({changed.relative_to(newer)} differ\); pass --force"):
        _run("--out", d, "--no-face", "--model-dir", newer)
    assert not export_calls and {p.name: p.read_bytes() for p in d.iterdir()} == before
    with pytest.raises(_Exported):
        _run("--out", d, "--no-face", "--model-dir", newer, "--force")
    assert export_calls == [{"out": d, "precision": "fp16", "force": True}]
    export_calls.clear()
    assert _run("--out", d, "--no-face", "--model-dir", tiny_model_dir) == 0     # the same files: built as is
    assert not export_calls and sorted(_manifest(d)["plans"]) == sorted(LCM_STAGES)
    m = _manifest(d)                              # a damaged record was an AttributeError traceback
    rel = str(model_files(tiny_model_dir)[0].relative_to(tiny_model_dir))
    m["source"]["files"] = {rel: "x"}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    with pytest.raises(EngineMismatchError, match=rf"\({rel} differ\); pass --force"):
        _run("--out", d, "--no-face", "--model-dir", tiny_model_dir)


def test_a_lora_export_is_not_re_exported_without_its_lora(tmp_path, tiny_model_dir, export_calls):
    d = make_engines_dir(tmp_path / "lcm", "fp16", stages=LCM_STAGES)
    m = _manifest(d)
    m["lora"] = {"file": "pytorch_lora_weights.safetensors", "sha256": "0" * 64, "bytes": 1, "scale": 0.5}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    with pytest.raises(EngineMismatchError) as e:
        _run("--out", d, "--no-face", "--stages", "step_cfg", "--model-dir", tiny_model_dir, "--force")
    # the whole re-export command, its scale included (a bare file name ran only from the adapter's folder)
    assert f"without its LoRA: {mf.reexport_advice(d)}" in str(e.value)
    assert "--lora LORA --lora-scale 0.5" in str(e.value) and "pytorch_lora_weights.safetensors" in str(e.value)
    assert not export_calls


@pytest.mark.parametrize("argv,words", [
    (["--no-face", "--stages", "detector"], "detector: --no-face leaves the face stages out"),
    (["--stages", "arcface"], "arcface: no face model for it in"),
    (["--stages", "step_cfg_control"], "has no controlnet/"),
], ids=["face-with-no-face", "face-without-models", "control-without-controlnet"])
def test_stages_that_cannot_be_had_are_refused_before_the_export(tmp_path, tiny_model_dir, export_calls, argv, words):
    out = tmp_path / "new"
    with pytest.raises(InvalidInputError, match=words) as e:
        _run("--out", out, "--model-dir", tiny_model_dir, *argv)
    assert "leave them out of --stages" in str(e.value) and "\n" not in str(e.value)
    assert not export_calls and not out.exists()          # no export started, no folder left behind


def test_face_stages_the_folder_already_has_stay_buildable_with_no_face(tmp_path):
    """--no-face adds no face stage; one the folder records already is still built when --stages names it."""
    import shutil

    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    shutil.copyfile(d / "projector.onnx", d / "detector.onnx")           # a stand-in graph with recorded I/O
    m = _manifest(d)
    io = {k: m["stages"]["projector"][k] for k in ("inputs", "outputs")}
    m["face_stages"] = {"detector": {"files": {"detector.onnx": mf.file_record(d / "detector.onnx")}, "io": io,
                                     "batch_range": [1, 1, 4]}}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    assert _run("--out", d, "--precision", "fp32", "--no-face", "--stages", "detector") == 0
    assert list(_manifest(d)["plans"]) == ["detector"] and (d / "detector.plan").is_file()


# ----------------------------------------------------------------------------- calibration settings

@pytest.mark.parametrize("lcm", [False, True], ids=["arc2face", "lcm-lora"])
def test_int8_calibrates_on_the_sampler_the_folder_serves(tmp_path, monkeypatch, lcm):
    """The pipeline calibration runs the folder's default sampler: 4 LCM steps (with their per-step
    noise) on an LCM-LoRA folder, 25 DPM-Solver++ steps otherwise. A graph quantised before the sampler
    was recorded (it ran DPM-Solver++) stays current on an Arc2Face folder and is made again on an LCM one."""
    from arc2face_export import quantize
    from arc2face_rt.pipeline import Arc2FacePipeline

    d = make_engines_dir(tmp_path / "e", "fp16", stages=LCM_STAGES)
    if lcm:
        m = _manifest(d)
        m["lora"] = {"file": "pytorch_lora_weights.safetensors", "sha256": "0" * 64, "bytes": 1, "scale": 1.0}
        mf.write_json_atomic(d / mf.MANIFEST, m)
    schedules, noises, done = [], [], []
    real_schedule, real_denoise, real_quantize = (Arc2FacePipeline.schedule, Arc2FacePipeline.denoise,
                                                   quantize.quantize_stage)
    monkeypatch.setattr(Arc2FacePipeline, "schedule", lambda self, name, steps: schedules.append((name, steps))
                        or real_schedule(self, name, steps))
    monkeypatch.setattr(Arc2FacePipeline, "denoise", lambda self, *a, noise=None, **kw: noises.append(
        None if noise is None else noise.shape) or real_denoise(self, *a, noise=noise, **kw))
    monkeypatch.setattr(quantize, "quantize_stage", lambda *a, **kw: done.append(a[1]) or real_quantize(*a, **kw))
    _run("--out", d, "--no-face", "--precision", "int8", "--stages", "step", "--calib-identities", "1")
    want = ("lcm", 4) if lcm else ("dpmpp2m", 25)
    assert schedules == [want]
    assert noises == ([(4, 1, 4, 64, 64)] if lcm else [None])
    rec = _manifest(d)["quantized"]["step"]["calibration"]
    assert (rec["scheduler"], rec["steps"]) == want
    m = _manifest(d)
    del m["quantized"]["step"]["calibration"]["scheduler"]               # as recorded before the sampler was
    mf.write_json_atomic(d / mf.MANIFEST, m)
    _run("--out", d, "--no-face", "--precision", "int8", "--stages", "step", "--calib-identities", "1")
    assert done == (["step", "step"] if lcm else ["step"])
    if lcm:                       # steps the LCM schedule cannot take: refused up front, naming the flag
        before = _manifest(d)
        with pytest.raises(InvalidInputError, match=r"^--calib-steps 60: scheduler 'lcm'.*1\.\.50"):
            _run("--out", d, "--no-face", "--precision", "int8", "--stages", "step", "--calib-steps", "60")
        assert _manifest(d) == before and done == ["step", "step"]


def _calib_npz(path, scale: float = 1.0):
    feeds = [random_feeds(specs.STEP, 1, seed=i) for i in range(2)]
    arrays = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}
    np.savez(path, **{k: v * scale if k in ("x", "m_prev", "noise", "cond") else v for k, v in arrays.items()})
    return path


def test_changed_calibration_data_or_percentile_and_force_requantise(tmp_path, monkeypatch):
    from arc2face_export import quantize

    d = make_engines_dir(tmp_path / "e", "fp16")                  # the pipeline calibration runs every stage
    a, b = _calib_npz(tmp_path / "a.npz"), _calib_npz(tmp_path / "b.npz", scale=10.0)
    done = []
    real = quantize.quantize_stage
    monkeypatch.setattr(quantize, "quantize_stage", lambda *a, **kw: done.append(a[1]) or real(*a, **kw))

    def build(*extra):
        _run("--out", d, "--no-face", "--precision", "int8", "--stages", "step", *extra)
        return _manifest(d)["quantized"]["step"]

    rec = build("--calib-identities", "1", "--calib-steps", "2")         # the pipeline on this folder
    assert rec["calibration"]["source"] == "pipeline" and len(done) == 1
    rec = build("--calib-data", a)
    assert rec["calibration"]["source"] == "recorded" and len(done) == 2
    assert rec["calibration"]["data_sha256"] == mf.sha256_file(a)
    graph_a = mf.sha256_file(d / "step.int8.onnx")
    build("--calib-data", a)                                             # nothing changed: kept
    assert len(done) == 2
    rec = build("--calib-data", b)                                       # other data: redone
    assert len(done) == 3 and rec["calibration"]["data_sha256"] == mf.sha256_file(b)
    assert mf.sha256_file(d / "step.int8.onnx") != graph_a
    rec = build("--calib-data", b, "--calib-percentile", "60")           # other percentile: redone
    assert len(done) == 4 and rec["calibration"]["percentile"] == 60
    build("--calib-data", b, "--calib-percentile", "60", "--force")      # --force: redone
    assert len(done) == 5
    assert _manifest(d)["plans"]["step"]["onnx"] == {"step.int8.onnx": mf.sha256_file(d / "step.int8.onnx")}
