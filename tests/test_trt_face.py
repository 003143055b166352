"""The face models as TensorRT stages: pinned copies in the engines folder, plans built on the CPU
with TensorRT-RTX, and the runtime's choice between plan and ONNX file."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from arc2face_rt import manifest as mf
from arc2face_rt.backends import cuda
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from arc2face_rt.face.models import face_plan, load_face_models
from arc2face_rt.face.recognizer import ArcFaceRecognizer
from trt_needed import tensorrt

trt_build, _ = tensorrt()
build_cli = pytest.importorskip("arc2face_export.build_cli")

from face_fixtures import tiny_models_dir  # noqa: E402

from arc2face_export.face_plans import add_face_stages  # noqa: E402

NO_GPU = cuda.device_count() == 0


def _dynamic_detector(src, dst):
    """The random detector with the released file's symbolic input height/width and output lengths."""
    m = onnx.load(str(src))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for i, out in enumerate(m.graph.output):
        out.type.tensor_type.shape.dim[0].dim_param = f"n{i}"
    onnx.save(m, str(dst))


@pytest.fixture(scope="module")
def face_engines(tiny_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("face")
    models = root / "models"
    models.mkdir()
    _dynamic_detector(tiny_models_dir() / "scrfd_10g_bnkps.onnx", models / "scrfd_10g_bnkps.onnx")
    shutil.copy(tiny_models_dir() / "arcface.onnx", models / "arcface.onnx")
    engines = root / "engines"
    shutil.copytree(tiny_engines, engines, ignore=shutil.ignore_patterns("*.plan"))
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", "--out", str(engines), "--face-models", str(models),
                              "--stages", "detector", "arcface", "--opt-level", "0", "--precision", "fp32"])
    assert args.func(args) == 0
    return models, engines


def test_face_stages_are_recorded_with_static_io(face_engines):
    models, engines = face_engines
    m = json.loads((engines / mf.MANIFEST).read_text())
    det, rec = m["face_stages"]["detector"], m["face_stages"]["arcface"]
    assert det["io"]["inputs"] == [["input.1", "float32", [1, 3, 640, 640]]]
    assert sorted(o[2] for o in det["io"]["outputs"]) == sorted(
        [[(640 // s) ** 2 * 2, c] for c in (1, 4, 10) for s in (8, 16, 32)])
    assert rec["io"]["inputs"] == [["input.1", "float32", ["B", 3, 112, 112]]]
    assert rec["io"]["outputs"] == [["embedding", "float32", ["B", 512]]]
    assert det["source_sha256"] == mf.sha256_file(models / "scrfd_10g_bnkps.onnx")
    want = ArcFaceRecognizer.from_file(models / "arcface.onnx", device="cpu").graph_normalises
    assert rec["graph_normalises"] is want
    for name in ("detector", "arcface"):
        plan = m["plans"][name]
        assert plan["io"] == m["face_stages"][name]["io"]
        assert (engines / plan["file"]).stat().st_size == plan["bytes"] > 0
        assert plan["build"]["precision"] == "fp32"


def test_face_graphs_in_the_engines_folder_get_the_usual_mode(face_engines):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    _, engines = face_engines
    for name in ("detector.onnx", "arcface.onnx"):
        assert stat.S_IMODE((engines / name).stat().st_mode) == 0o666 & ~umask, name


def test_pinned_detector_computes_what_the_released_graph_does(face_engines):
    """Oracle: onnxruntime on the source graph (dynamic H/W) and on the pinned copy."""
    models, engines = face_engines
    blob = np.random.default_rng(0).standard_normal((1, 3, 640, 640)).astype(np.float32)
    a = ort.InferenceSession(str(models / "scrfd_10g_bnkps.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(engines / "detector.onnx"), providers=["CPUExecutionProvider"])
    for x, y in zip(a.run(None, {"input.1": blob}), b.run(None, {"input.1": blob})):
        np.testing.assert_array_equal(x, y)


def test_unchanged_sources_are_kept_and_plans_not_rebuilt(face_engines, monkeypatch):
    models, engines = face_engines
    before = (engines / "detector.onnx").stat().st_mtime_ns
    assert add_face_stages(engines, models) == ["detector", "arcface"]
    assert (engines / "detector.onnx").stat().st_mtime_ns == before
    built = []
    monkeypatch.setattr(trt_build, "build_plan", lambda *a, **kw: built.append(a) or {})
    trt_build.build_engines(engines, stages=["detector", "arcface"], options=trt_build.BuildOptions(opt_level=0))
    assert built == []


def test_runtime_picks_plans_or_onnx(face_engines):
    models, engines = face_engines
    det, rec = load_face_models(models, device="cpu", engines=engines, backend="auto")
    if NO_GPU:   # auto without a GPU: OpenVINO (f32) when installed, else ONNX Runtime, on the released files
        from arc2face_rt.backends.openvino import openvino_installed
        want = "OpenVinoSession" if openvino_installed() else "OrtSession"
        assert type(det.session).__name__ == want and type(rec.session).__name__ == want
        with pytest.raises(BackendUnavailableError):
            load_face_models(models, device="cpu", engines=engines, backend="trt")
    assert face_plan(None, "ort", "detector") is None
    with pytest.raises(InvalidInputError, match="--engines"):
        face_plan(None, "trt", "detector")


def test_trt_without_a_face_plan_names_the_command(tiny_engines):
    with pytest.raises(EngineMismatchError, match="build-engines .*--face-models"):
        face_plan(tiny_engines, "trt", "arcface")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_face_plans_match_onnxruntime_on_gpu(face_engines):
    models, engines = face_engines
    crops = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), np.uint8)
    _, rec_trt = load_face_models(models, engines=engines, backend="trt", need_detector=False)
    _, rec_ort = load_face_models(models, device="cpu", need_detector=False)
    cos = np.sum(rec_trt.embed(crops) * rec_ort.embed(crops), axis=1)
    assert np.all(cos > 0.999)


def test_info_lists_and_verifies_face_stages(face_engines, capsys):
    from arc2face_rt.cli import main

    _, engines = face_engines
    assert main(["info", "--engines", str(engines), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "face stage detector" in out and "face stage arcface" in out and "plan arcface" in out


def test_a_face_model_of_another_layout_is_refused_by_name(tiny_engines, tmp_path):
    from onnx import TensorProto, helper

    from arc2face_rt.errors import ModelFormatError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 112])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), str(tmp_path / "arcface.onnx"))
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines, ignore=shutil.ignore_patterns("*.plan"))
    with pytest.raises(ModelFormatError, match=r"arcface\.onnx: input has 3 dims"):
        add_face_stages(engines, recognizer=tmp_path / "arcface.onnx")
    assert not (engines / "arcface.onnx").exists()
