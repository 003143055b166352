"""OpenVINO int8: NNCF quantisation of the tiny step graphs, its gates, and `--cpu-precision int8`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from arc2face_export import ov_int8  # noqa: E402
from arc2face_rt.backends import openvino as ovb  # noqa: E402
from arc2face_rt.cli import main as rt_main  # noqa: E402
from arc2face_rt.errors import EngineMismatchError  # noqa: E402
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity  # noqa: E402

OPTS = GenerationOptions(steps=25, guidance=3.0, seed=11, batch_size=1)


@pytest.fixture(scope="module")
def q_engines(tiny_engines, tmp_path_factory):
    d = tmp_path_factory.mktemp("ovq") / "fp32"
    shutil.copytree(tiny_engines, d)
    ov_int8.ensure_ov_int8(d, identities=2, steps=25, per_run=2)
    return d


def test_quantised_step_graphs_pass_the_int8_gates(q_engines):
    """Per output on the calibration inputs, as the GPU int8 path: PSNR > 30 dB; the state x_out also
    rel L2 < 0.05 (m0, the x0 prediction under guidance 3, is reported: ~0.05 on the tiny model)."""
    m = json.loads((q_engines / "manifest.json").read_text())
    for stage in ("step_cfg", "step"):
        rec = m[ovb.INT8_KEY][stage]
        assert rec["file"] == f"{stage}.ov-int8.xml" and set(rec["files"]) == {rec["file"], f"{stage}.ov-int8.bin"}
        assert rec["calibration_samples"] == 4 and rec["fake_quantize_nodes"] > 0
        assert rec["source"]["sha256"] == {k: v["sha256"] for k, v in m["stages"][stage]["files"].items()}
        loss = rec["loss_vs_source"]
        assert all(v["psnr_db"] > 30 for v in loss.values()), loss
        assert loss["x_out"]["rel_l2"] < 0.05, loss


def test_scheduler_arithmetic_is_never_quantised(q_engines):
    model = ovb.core().read_model(str(q_engines / "step_cfg.ov-int8.xml"))
    sched, _ = ovb.scheduler_subgraph(model)
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            users = {t.get_node().get_friendly_name() for t in op.output(0).get_target_inputs()}
            assert not users & set(sched), users
    prec = ovb.OpenVinoSession(q_engines / "step_cfg.ov-int8.xml", "f32").runtime_precisions()
    assert {"u8", "i8"} & set(prec.values())                  # int8 kernels run on this CPU


def test_int8_images_stay_close_to_fp32(q_engines):
    with Arc2FacePipeline(q_engines, backend="ort", device="cpu") as p:
        ref = p.generate(random_identity(3), 2, OPTS)
    with Arc2FacePipeline(q_engines, backend="openvino", cpu_precision="int8") as p:
        got = p.generate(random_identity(3), 2, OPTS)
    assert got.params[0]["precision"] == "int8"
    mse = np.mean((ref.images.astype(np.float64) - got.images.astype(np.float64)) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) >= 30.0


def test_int8_from_an_older_export_is_refused(q_engines, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(q_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    m = json.loads((d / "manifest.json").read_text())
    m[ovb.INT8_KEY]["step_cfg"]["source"]["sha256"] = {"step_cfg.onnx": "0" * 64}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="older export.*openvino-int8"):
        Arc2FacePipeline(d, backend="openvino", cpu_precision="int8").session("step_cfg")
    assert not ov_int8.is_current(d, m, "step_cfg") and ov_int8.is_current(d, m, "step")


def test_int8_without_int8_graphs_names_the_command(tiny_engines, tmp_path, capsys):
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--random-id", "--backend", "openvino",
                  "--cpu-precision", "int8", "--out", str(tmp_path / "o")])
    assert rc == 2 and "arc2face-export openvino-int8 --engines" in capsys.readouterr().err
