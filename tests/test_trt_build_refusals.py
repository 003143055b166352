"""build-engines refuses, in one line and before building, what it used to trip over: manifest records
that the builder indexes (face stages' `io`, a quantised graph's `file`), a damaged face model, a plan
path that a folder occupies; and it does not call a plan that the runtime refuses (a link out of the
folder) up to date."""
from __future__ import annotations

import copy
import json
import logging
import os

import pytest
from onnx import TensorProto, helper, save

from arc2face_rt import manifest as mf
from arc2face_rt.errors import EngineMismatchError, InvalidInputError, MissingWeightsError
from test_trt_graphs import make_engines_dir
from trt_needed import tensorrt

FACE_IO = {"inputs": [["input.1", "float32", [1, 3, 640, 640]]], "outputs": [["score", "float32", [12800, 1]]]}
FILE = {"sha256": "0" * 64, "bytes": 1}


def _with_records(d) -> dict:
    """The manifest of `d` with a face stage, a plan and an int8 graph recorded as the tools write them."""
    m = json.loads((d / mf.MANIFEST).read_text())
    m["face_stages"] = {"detector": {"files": {"detector.onnx": FILE}, "io": copy.deepcopy(FACE_IO),
                                     "batch_range": [1, 1, 1]}}
    m["plans"] = {"projector": {"file": "projector.plan", **FILE, "library": {"name": "tensorrt_rtx"},
                                "build": {"precision": "fp32"}, "io": copy.deepcopy(FACE_IO)}}
    m["quantized"] = {"step": {"file": "step.int8.onnx", "files": {"step.int8.onnx": FILE}}}
    return m


def _drop(*path):
    def edit(m):
        rec = m
        for k in path[:-1]:
            rec = rec[k]
        del rec[path[-1]]
    return edit


def _put(value, *path):
    def edit(m):
        rec = m
        for k in path[:-1]:
            rec = rec[k]
        rec[path[-1]] = value
    return edit


BAD_RECORDS = {
    "face-io-missing": (_drop("face_stages", "detector", "io"), "face_stages.detector: lacks its 'io'"),
    "face-io-string": (_put("x", "face_stages", "detector", "io"), "'io' is a string"),
    "face-io-row-of-2": (_put([["input.1", "float32"]], "face_stages", "detector", "io", "inputs"),
                         "'io' inputs row ['input.1', 'float32'] is not [name, dtype, shape]"),
    "face-io-no-outputs": (_put([], "face_stages", "detector", "io", "outputs"), "'io' outputs is empty"),
    "face-io-named-axis": (_put([["input.1", "float32", [1, 3, "H", "W"]]], "face_stages", "detector", "io", "inputs"),
                           "is not [name, dtype, shape]"),
    "plan-io-shape-string": (_put([["id", "float32", "B"]], "plans", "projector", "io", "inputs"),
                             "plans.projector: 'io' inputs row"),
    "quantized-no-file": (_drop("quantized", "step", "file"), "quantized.step: names no 'file'"),
    "stage-no-file": (_drop("stages", "projector", "file"), "stages.projector: names no 'file'"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_records_the_readers_index_are_checked_with_the_manifest(tmp_path, case):
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    m = _with_records(d)
    mf.check_manifest(m, d)                              # as written: accepted
    edit, words = BAD_RECORDS[case]
    edit(m)
    with pytest.raises(EngineMismatchError) as e:
        mf.check_manifest(m, d)
    assert words in str(e.value) and "arc2face-export onnx" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def trt_build():
    return tensorrt()[0]


@pytest.fixture
def count_builds(trt_build, monkeypatch):
    built = []
    real = trt_build.build_plan
    monkeypatch.setattr(trt_build, "build_plan", lambda onnx, plan, spec, *a, **kw: built.append(spec.name)
                        or real(onnx, plan, spec, *a, **kw))
    return built


@pytest.mark.parametrize("case,precision", [("face-io-missing", None), ("face-io-row-of-2", None),
                                            ("quantized-no-file", "int8")])
def test_build_engines_refuses_them_before_any_build(tmp_path, trt_build, count_builds, case, precision):
    """They used to give a KeyError / ValueError traceback from face_stage_specs or build_engines."""
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    m = _with_records(d)
    del m["plans"]
    BAD_RECORDS[case][0](m)
    mf.write_json_atomic(d / mf.MANIFEST, m)
    with pytest.raises(EngineMismatchError, match="re-export the folder"):
        trt_build.build_engines(d, precision=precision)
    assert count_builds == []


def _one_input_graph(path, shape, op="Identity", domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    save(helper.make_model(g, opset_imports=opsets), str(path))
    return path


@pytest.mark.parametrize("damage", ["truncated", "random", "text"])
def test_a_damaged_face_model_is_refused_by_name_and_nothing_is_copied(tmp_path, trt_build, damage):
    from arc2face_export.face_plans import add_face_stages

    models = tmp_path / "models"
    models.mkdir()
    _one_input_graph(models / "scrfd_10g_bnkps.onnx", [1, 3, "H", "W"])     # a detector that pins fine
    good = _one_input_graph(tmp_path / "good.onnx", ["N", 3, 112, 112]).read_bytes()
    bad = {"truncated": good[:len(good) // 2], "random": os.urandom(3000), "text": b"<html>not found</html>"}[damage]
    (models / "arcface.onnx").write_bytes(bad)
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(MissingWeightsError) as e:
        add_face_stages(d, models, explicit=True)
    msg = str(e.value)
    assert msg.startswith(f"{models / 'arcface.onnx'}: the recognizer is not a readable ONNX model")
    assert "download it again" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before   # the good detector was not copied either


def test_a_face_model_tensorrt_cannot_parse_names_the_model_not_a_temp_file(tmp_path, trt_build):
    from arc2face_export.face_plans import add_face_stages
    from arc2face_rt.errors import ModelFormatError

    src = _one_input_graph(tmp_path / "arcface.onnx", ["N", 3, 112, 112], op="NoSuchOp", domain="com.example")
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    with pytest.raises(ModelFormatError) as e:
        add_face_stages(d, recognizer=src)
    assert str(e.value).startswith(f"{src}: TensorRT's ONNX parser cannot read it") and ".tmp" not in str(e.value)
    assert "re-export" not in str(e.value)
    assert not (d / "arcface.onnx").exists()


def test_a_face_model_of_another_kind_is_named_as_the_wrong_model(tmp_path, trt_build):
    """The UNet's (or any) ONNX file given as the recognizer: "input dims ... cannot take ..." named no fix."""
    from arc2face_export.face_plans import add_face_stages
    from arc2face_rt.errors import ModelFormatError

    src = _one_input_graph(tmp_path / "arcface.onnx", [1, 4, 64, 64])
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    with pytest.raises(ModelFormatError) as e:
        add_face_stages(d, recognizer=src)
    msg = str(e.value)
    assert msg.startswith(f"{src}: input dims [1, 4, 64, 64] cannot take ('B', 3, 112, 112); is it the face "
                          "recognizer? The face models are scrfd_10g_bnkps.onnx"), msg
    assert "--no-face" in msg and not (d / "arcface.onnx").exists()


def test_a_plan_linked_from_outside_the_folder_is_rebuilt_in_it(tmp_path, trt_build, count_builds):
    """The runtime refuses such a link (manifest.resolve_inside): build-engines used to call it up to date."""
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    trt_build.build_engines(d)
    outside = tmp_path / "elsewhere.plan"
    (d / "projector.plan").rename(outside)
    (d / "projector.plan").symlink_to(outside)
    kept = outside.read_bytes()
    count_builds.clear()
    trt_build.build_engines(d)
    assert count_builds == ["projector"]
    plan = d / "projector.plan"
    assert not plan.is_symlink() and plan.is_file()       # the link was replaced, not written through
    assert outside.read_bytes() == kept
    mf.resolve_inside(d, "projector.plan")                 # what the runtime checks
    count_builds.clear()
    trt_build.build_engines(d)                             # and now it is up to date
    assert count_builds == []


def test_a_folder_where_a_plan_goes_is_refused_before_building(tmp_path, trt_build, count_builds):
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector", "vae_decoder"))
    (d / "vae_decoder.plan").mkdir()
    with pytest.raises(InvalidInputError) as e:
        trt_build.build_engines(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'vae_decoder.plan'}: is a folder") and "remove the folder" in msg
    assert ".tmp" not in msg and "give a file path" not in msg
    assert count_builds == []                             # nothing built first, not even the projector
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "projector.onnx", "vae_decoder.onnx",
                                                   "vae_decoder.plan"]


def test_the_refusal_names_the_commands_that_make_again_what_a_re_export_replaces(tmp_path):
    """A re-export (`onnx --force`) replaces the plans and the int8 graphs: the advice gives the commands
    that make them again, at the precision the plans were built and with the face models they came from,
    each one the exporter's own parser takes."""
    import shlex

    from arc2face_export.cli import build_parser

    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    m = _with_records(d)
    faces = tmp_path / "faces"
    (faces / "antelopev2").mkdir(parents=True)
    m["face_stages"]["detector"]["source"] = str(faces / "antelopev2" / "scrfd_10g_bnkps.onnx")
    m["plans"]["detector"] = {**m["plans"]["projector"], "file": "detector.plan"}
    m["plans"]["step"] = {**m["plans"]["projector"], "file": "step.plan", "build": {"precision": "int8"}}
    m["openvino_int8"] = {"step": {"file": "step.ov-int8.xml", "files": {"step.ov-int8.xml": FILE}}}
    del m["quantized"]["step"]["file"]
    mf.write_json_atomic(d / mf.MANIFEST, m)
    with pytest.raises(EngineMismatchError) as e:
        mf.load_manifest(d)
    cmds = str(e.value).split("`")[1::2]
    assert [c.split()[:2] for c in cmds] == [["arc2face-export", "onnx"], ["arc2face-export", "build-engines"],
                                             ["arc2face-export", "openvino-int8"]]
    args = [build_parser().parse_args([{"MODEL": "model"}.get(a, a) for a in shlex.split(c)[1:]]) for c in cmds]
    assert args[1].out == d and args[1].precision == "int8" and args[1].face_models == faces
    assert args[2].engines == d


def test_a_folder_where_a_face_model_is_copied_is_refused_before_copying(tmp_path, trt_build):
    from arc2face_export.face_plans import add_face_stages

    src = _one_input_graph(tmp_path / "arcface.onnx", ["N", 3, 112, 112])
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector",))
    (d / "arcface.onnx").mkdir()
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(InvalidInputError) as e:
        add_face_stages(d, recognizer=src)
    assert str(e.value).startswith(f"{d / 'arcface.onnx'}: is a folder") and "remove the folder" in str(e.value)
    assert sorted(p.name for p in d.iterdir()) == before   # no temporary file left either


@pytest.mark.parametrize("gone,words", [
    ("detector.onnx", "copy the face model in again: `arc2face-export build-engines --out {d} --precision fp32 "
                      "--face-models DIR`"),   # the folder's: the default fp16 would be refused on it
    ("vae_decoder.onnx", "missing; re-export the folder (`arc2face-export onnx --model-dir MODEL --out {d}"),
])
def test_a_missing_graph_is_refused_before_any_plan_is_built(tmp_path, trt_build, count_builds, gone, words):
    """The face graphs are not written by `onnx` (its advice used to be `run arc2face-export onnx`);
    and the check came only when the build reached that stage, after building the ones before it."""
    d = make_engines_dir(tmp_path / "e", "fp32", stages=("projector", "vae_decoder"))
    m = _with_records(d)
    del m["plans"], m["quantized"]
    m["face_stages"]["detector"]["files"] = {"detector.onnx": mf.file_record(
        _one_input_graph(d / "detector.onnx", [1, 3, 640, 640]))}
    mf.write_json_atomic(d / mf.MANIFEST, m)
    (d / gone).unlink()
    with pytest.raises(EngineMismatchError) as e:
        trt_build.build_engines(d, stages=["projector", "vae_decoder", "detector"])
    assert words.format(d=d) in str(e.value)
    assert count_builds == []


def test_the_command_refuses_a_folder_where_a_plan_goes_before_quantising(tmp_path, monkeypatch, capsys):
    """build-engines --precision int8 used to calibrate and quantise (minutes) before the build found it."""
    from arc2face_export import quantize
    from arc2face_export.cli import main

    def no_quantising(*a, **k):
        raise AssertionError("quantised before the plan paths were checked")

    monkeypatch.setattr(quantize, "ensure_quant_graphs", no_quantising)
    d = make_engines_dir(tmp_path / "e", "fp16")
    (d / "step_cfg.plan").mkdir()
    names = ("arc2face_export.trt_build", "arc2face_export.quantize", "arc2face_export.calib")
    levels = [logging.getLogger(n).level for n in names]
    rc = main(["build-engines", "--out", str(d), "--precision", "int8", "--no-face"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{d / 'step_cfg.plan'}: is a folder" in err[0], err
    # its progress loggers log INFO while it runs, and are put back after (an API caller's settings)
    assert [logging.getLogger(n).level for n in names] == levels


def test_a_folder_where_the_timing_cache_goes_is_refused_with_the_early_checks(tmp_path, monkeypatch, capsys):
    """Full TensorRT keeps a timing cache beside the plans (TensorRT-RTX has none): a folder there was
    found only once the build started, after any export or quantisation."""
    from arc2face_export import build_cli, quantize
    from arc2face_export.cli import main

    def no_quantising(*a, **k):
        raise AssertionError("quantised before the timing cache path was checked")

    monkeypatch.setattr(quantize, "ensure_quant_graphs", no_quantising)
    monkeypatch.setattr(build_cli, "is_rtx", lambda trt: False)          # as with full TensorRT
    d = make_engines_dir(tmp_path / "e", "fp16")
    (d / "timing.cache").mkdir()
    rc = main(["build-engines", "--out", str(d), "--precision", "int8", "--no-face"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{d / 'timing.cache'}: is a folder" in err[0], err
