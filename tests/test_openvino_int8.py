"""OpenVINO int8: NNCF quantisation of the tiny step graphs, its gates, and `--cpu-precision int8`."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

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
    assert got.params[0]["precision"] == f"int8 ({'bf16' if ovb.cpu_isa().bf16 else 'fp32'} float)"
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


def _int8_copy(q_engines, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(q_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    return d, json.loads((d / "manifest.json").read_text())


def test_a_changed_int8_graph_is_not_current_and_the_runtime_names_its_own_fix(q_engines, tmp_path, capsys):
    """A flipped byte keeps the size: `is_current` hashes (through the stamps), so `openvino-int8` redoes the
    graph; the runtime's refusal (and `info --verify`'s) names that command, every flag inside the backticks."""
    from arc2face_export.cli import main as export_main
    from arc2face_rt.integrity import verify_records

    d, m = _int8_copy(q_engines, tmp_path)
    b = d / "step.ov-int8.bin"
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0x55
    b.write_bytes(bytes(data))
    assert not ov_int8.is_current(d, m, "step") and ov_int8.is_current(d, m, "step_cfg")
    with pytest.raises(EngineMismatchError) as e:
        Arc2FacePipeline(d, backend="openvino", cpu_precision="int8").session("step")
    assert str(e.value).startswith(f"{b}: content differs from the manifest") and str(e.value).endswith(
        f"corrupt or replaced; write the int8 step graphs again with `arc2face-export openvino-int8 --engines {d} "
        "--force`")
    capsys.readouterr()
    assert rt_main(["info", "--engines", str(d), "--verify"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"`arc2face-export openvino-int8 --engines {d} --force`")
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 0
    m2 = json.loads((d / "manifest.json").read_text())
    verify_records(d, m2[ovb.INT8_KEY]["step"]["files"], mode="full")
    assert m2[ovb.INT8_KEY]["step_cfg"] == m[ovb.INT8_KEY]["step_cfg"]


@pytest.mark.parametrize("source", ["x", None, {"sha256": 5}])
def test_a_damaged_int8_source_record_is_redone_not_a_traceback(q_engines, tmp_path, monkeypatch, capsys, source):
    """`openvino_int8.<stage>.source` that is not {file, sha256}: the runtime refuses it (one line, the fix in
    backticks) and `openvino-int8`, without --force, treats the graph as not current and sets out to write it
    again (up to its calibration, stopped here: the test above runs a whole redo)."""
    from arc2face_export.cli import main as export_main
    from arc2face_rt.errors import InvalidInputError

    d, m = _int8_copy(q_engines, tmp_path)
    if source is None:
        del m[ovb.INT8_KEY]["step"]["source"]
    else:
        m[ovb.INT8_KEY]["step"]["source"] = source
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError) as e:
        Arc2FacePipeline(d, backend="openvino", cpu_precision="int8").session("step")
    assert str(e.value).endswith(f"`arc2face-export openvino-int8 --engines {d} --force`")
    assert not ov_int8.is_current(d, m, "step") and ov_int8.is_current(d, m, "step_cfg")

    def calibration(engines_dir, stage, **kw):
        raise InvalidInputError(f"calibrating {stage}")

    monkeypatch.setattr(ov_int8, "pipeline_calibration_feeds", calibration)
    capsys.readouterr()
    assert export_main(["openvino-int8", "--engines", str(d), "--stages", "step_cfg", "step", *_AS_MADE]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "arc2face-export: error: calibrating step"


def test_an_int8_file_the_manifest_does_not_record_is_kept_and_named(tiny_engines, tmp_path, monkeypatch, capsys):
    from arc2face_export.cli import main as export_main

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    (d / "step.ov-int8.bin").write_bytes(b"someone else's weights")

    def calibration(*a, **kw):
        raise AssertionError("calibration started")

    monkeypatch.setattr(ov_int8, "pipeline_calibration_feeds", calibration)
    assert export_main(["openvino-int8", "--engines", str(d), "--stages", "step"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [(
        f"arc2face-export: error: {d / 'step.ov-int8.bin'}: exists and manifest.json does not record it as this "
        f"folder's OpenVINO int8 step graph, so it is not replaced; move it out of {d}, then run again")]
    assert (d / "step.ov-int8.bin").read_bytes() == b"someone else's weights"


def test_int8_without_int8_graphs_names_the_command(tiny_engines, tmp_path, capsys):
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--random-id", "--backend", "openvino",
                  "--cpu-precision", "int8", "--out", str(tmp_path / "o")])
    assert rc == 2 and "arc2face-export openvino-int8 --engines" in capsys.readouterr().err


_AS_MADE = ["--identities", "2", "--steps", "25", "--per-run", "2"]     # q_engines' calibration
_ONE_STEP = ["--stages", "step", "--identities", "1", "--steps", "2", "--per-run", "1"]


def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_a_full_disk_during_save_is_one_line_and_leaves_nothing(tiny_engines, tmp_path, monkeypatch, capsys):
    """OpenVINO reports a failed write (full disk, `ulimit -f`) as RuntimeError("basic_ios::clear: iostream
    error"): exit 2, one line naming the output and the fix, no half-written file, the manifest as it was.
    The model is saved into a tagged temporary folder of this process, which a later run can recognise."""
    import nncf
    import openvino
    from arc2face_export.cli import main as export_main
    from arc2face_rt.atomic import is_stale_temp, is_temp_name

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    before, manifest = _entries(d), (d / "manifest.json").read_bytes()
    saved_to = []

    def full_disk(model, path, **kw):
        saved_to.append(Path(path))
        Path(path).write_bytes(b"<?xml")                # what a write cut short leaves
        raise RuntimeError("basic_ios::clear: iostream error")     # what OpenVINO 2026.4 raises (prlimit --fsize)

    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **kw: model)     # the quantisation is not the point
    monkeypatch.setattr(openvino, "save_model", full_disk)
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"arc2face-export: error: {d / 'step.ov-int8.xml'}: could not be written (basic_ios::clear: iostream error); "
        "free some space or raise the file-size limit (ulimit -f)")
    assert _entries(d) == before and (d / "manifest.json").read_bytes() == manifest
    work = saved_to[0].parent
    assert work.parent == d and is_temp_name(work.name) and f"-{os.getpid()}-" in work.name
    assert not is_stale_temp(work)                      # ours while we run; a dead process's once killed


def test_another_save_failure_is_not_called_a_full_disk(tiny_engines, tmp_path, monkeypatch):
    """Only OpenVINO's stream errors are the disk's; any other RuntimeError of save_model stays a bug."""
    import nncf
    import openvino
    from arc2face_export.cli import main as export_main

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))

    def broken(model, path, **kw):
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: unsupported element type")

    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **kw: model)
    monkeypatch.setattr(openvino, "save_model", broken)
    with pytest.raises(RuntimeError, match="unsupported element type"):
        export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP])


def test_the_next_run_removes_a_killed_runs_temporary_files(q_engines, tmp_path):
    from arc2face_rt.atomic import temp_dir
    from conftest import killed_run_temp

    d = tmp_path / "e"
    shutil.copytree(q_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    stale = killed_run_temp(d, "step_cfg.ov-int8.xml")
    running = temp_dir(d, "step.ov-int8.xml")          # another openvino-int8 still at work: left alone
    before = json.loads((d / "manifest.json").read_text())[ovb.INT8_KEY]
    ov_int8.ensure_ov_int8(d, identities=2, steps=25, per_run=2)      # both graphs current (as made): nothing to do
    assert not stale.exists() and running.is_dir()
    assert json.loads((d / "manifest.json").read_text())[ovb.INT8_KEY] == before


def test_a_read_only_engines_folder_is_refused_before_any_work(tiny_engines, tmp_path, monkeypatch, capsys):
    """As root, access() says yes on a read-only mount's folder; check_output_dir's probe (mkdtemp) fails
    with EROFS there: simulated here. Refused before calibration, naming the folder, the files and the fix."""
    import tempfile

    from arc2face_export.cli import main as export_main

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    real_mkdtemp = tempfile.mkdtemp

    def read_only(*a, dir=None, **kw):
        if dir is not None and Path(dir) == d:
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / "probe"))
        return real_mkdtemp(*a, dir=dir, **kw)

    def calibrated(*a, **kw):
        raise AssertionError("calibration started on a folder it cannot write")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(ov_int8, "pipeline_calibration_feeds", calibrated)
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [(
        f"arc2face-export: error: --engines {d}: is not writable (read-only file system); openvino-int8 writes "
        "step.ov-int8.xml/.bin and manifest.json there: copy the folder somewhere writable and pass that as --engines")]


def test_a_stop_while_the_loss_is_measured_leaves_no_unrecorded_graph(tiny_engines, tmp_path, monkeypatch, capsys):
    """The int8 graph moves into the folder only once it is measured and recorded: a stop during the loss
    measurement (a minute at full size) used to leave files of ours that no record names, and every
    later run refused them."""
    import nncf
    from arc2face_export import ov_int8
    from arc2face_export.cli import main as export_main

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    before, manifest = _entries(d), (d / "manifest.json").read_bytes()
    real = ov_int8.quantization_loss

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **kw: model)     # the quantisation is not the point
    monkeypatch.setattr(ov_int8, "quantization_loss", stopped)
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 130
    assert _entries(d) == before and (d / "manifest.json").read_bytes() == manifest
    monkeypatch.setattr(ov_int8, "quantization_loss", real)
    capsys.readouterr()
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 0, capsys.readouterr().err
    assert "step" in json.loads((d / "manifest.json").read_text())["openvino_int8"]


@pytest.mark.parametrize("kill_at", ["manifest", "move"])
def test_a_stop_as_the_graph_lands_leaves_only_recorded_files(tiny_engines, tmp_path, monkeypatch, capsys, kill_at):
    """A stop at the manifest write or at the move of the files leaves only files the manifest names: the
    next run makes the graph again instead of refusing an unrecorded file."""
    import nncf
    from arc2face_export.cli import main as export_main
    from arc2face_rt import manifest as mf

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    real_write, real_replace = mf.write_json_atomic, os.replace

    def write(path, data, *a, **k):
        if kill_at == "manifest" and "openvino_int8" in data:
            raise KeyboardInterrupt
        return real_write(path, data, *a, **k)

    def replace(src, dst, *a, **k):
        if kill_at == "move" and ".ov-int8." in os.path.basename(dst):
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **kw: model)     # the quantisation is not the point
    monkeypatch.setattr(mf, "write_json_atomic", write)
    monkeypatch.setattr(os, "replace", replace)
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 130
    monkeypatch.setattr(mf, "write_json_atomic", real_write)
    monkeypatch.setattr(os, "replace", real_replace)
    capsys.readouterr()
    assert export_main(["openvino-int8", "--engines", str(d), *_ONE_STEP]) == 0, capsys.readouterr().err
    m = json.loads((d / "manifest.json").read_text())
    assert ov_int8.is_current(d, m, "step")


def test_int8_with_a_control_image_is_refused_before_the_missing_controlnet_graph(q_engines):
    """On a folder without ControlNet graphs, int8 with a control image advised re-exporting with them,
    after which the same command was refused for int8: the precision conflict is named first."""
    from arc2face_rt.errors import InvalidInputError

    with Arc2FacePipeline(q_engines, backend="openvino", cpu_precision="int8") as pipe:
        with pytest.raises(InvalidInputError, match="no int8 ControlNet step graph"):
            pipe.prepare(OPTS, control=True)


def test_other_calibration_settings_quantise_again(q_engines):
    """The record keeps how the graph was calibrated: openvino-int8 with other --identities, --steps or
    --per-run called the graph current and ignored them. A record from before counts as the defaults'."""
    m = json.loads((q_engines / "manifest.json").read_text())
    assert m[ovb.INT8_KEY]["step"]["calibration"] == {"source": "pipeline", "identities": 2, "steps": 25, "per_run": 2,
                                                      "scheduler": "dpmpp2m"}
    same = ov_int8.calibration_record(m, identities=2, steps=25, per_run=2)
    assert ov_int8.is_current(q_engines, m, "step", same)
    for other in ({"identities": 3}, {"steps": 20}, {"per_run": 4}):
        assert not ov_int8.is_current(q_engines, m, "step", ov_int8.calibration_record(
            m, **{"identities": 2, "steps": 25, "per_run": 2, **other}))
    del m[ovb.INT8_KEY]["step"]["calibration"]                       # as an older version recorded it
    assert ov_int8.is_current(q_engines, m, "step", ov_int8.calibration_record(m))
    assert not ov_int8.is_current(q_engines, m, "step", same)


def test_calibration_feeds_given_through_the_api_are_told_apart_by_content():
    """Two lists of feeds of the same length are two calibrations (the count alone called them one)."""
    m = {"stages": {}}
    a = [{"x": np.zeros((1, 4, 64, 64), np.float32)}]
    b = [{"x": np.ones((1, 4, 64, 64), np.float32)}]
    assert ov_int8.calibration_record(m, feeds=a) == ov_int8.calibration_record(m, feeds=[dict(a[0])])
    assert ov_int8.calibration_record(m, feeds=a) != ov_int8.calibration_record(m, feeds=b)


def test_the_saved_int8_ir_does_not_depend_on_what_the_process_did_before(tiny_engines, tmp_path):
    """OpenVINO names the nodes it makes from a counter global to the process: the IR of an int8 run
    continued after a stop (one graph quantised in that process) differed from an uninterrupted run's
    (two) in those names alone, and so did its engine id. stable_names numbers them in graph order."""
    import openvino as ov

    def ir(model, name):
        ov.save_model(model, str(tmp_path / name), compress_to_fp16=False)
        return (tmp_path / name).read_bytes()

    first = ov_int8.core().read_model(str(tiny_engines / "step.onnx"))
    ov_int8.core().read_model(str(tiny_engines / "step_cfg.onnx"))          # what a process may do in between
    later = ov_int8.core().read_model(str(tiny_engines / "step.onnx"))
    assert ir(first, "a.xml") != ir(later, "b.xml")                        # the counter moved on
    assert ov_int8.stable_names(first) == ov_int8.stable_names(later) > 0
    assert ir(first, "a.xml") == ir(later, "b.xml")
