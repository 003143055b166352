"""ONNX export: graphs match the stage specs, validate against torch, and the folder is handled safely."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from arc2face_rt import manifest as mf
from arc2face_rt.errors import EngineMismatchError, OutputExistsError
from arc2face_rt.specs import SPEC_REVISION, STAGES
from arc2face_export import onnx_export, onnx_files

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64"}


def _io(values):
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
        out.append((v.name, _ONNX_DTYPES[t.elem_type], shape))
    return out


def test_graphs_match_specs(tiny_engines):
    m = mf.load_manifest(tiny_engines)
    assert m["spec_revision"] == SPEC_REVISION and m["precision"] == "fp32"
    assert m["source"]["random_weights"] is True
    assert set(m["stages"]) == set(STAGES)
    for name, spec in STAGES.items():
        g = onnx.load(str(tiny_engines / spec.onnx_file), load_external_data=False).graph
        assert _io(g.input) == [(t.name, t.dtype, t.shape) for t in spec.inputs]
        assert _io(g.output) == [(t.name, t.dtype, t.shape) for t in spec.outputs]
        rec = m["stages"][name]
        assert rec["validation"]["value"] <= spec.tolerance["fp32"]
        for rel, frec in rec["files"].items():
            assert mf.sha256_file(tiny_engines / rel) == frec["sha256"]


def test_reexport_is_a_no_op_and_other_content_is_refused(tiny_model_dir, tiny_engines):
    before = (tiny_engines / "manifest.json").read_text()
    onnx_export.export_all(tiny_model_dir, tiny_engines, precision="fp32")
    assert (tiny_engines / "manifest.json").read_text() == before
    with pytest.raises(OutputExistsError, match="--force"):
        onnx_export.export_all(tiny_model_dir, tiny_engines, precision="fp16")


def test_a_no_op_export_checks_content_and_removes_a_dead_exports_temps(tiny_model_dir, tiny_engines, tmp_path):
    """A same-size change is not "up to date" (the content is hashed, through stamps), and a killed
    export's temporary folder goes even when there is nothing to export."""
    import shutil

    from arc2face_rt.errors import EngineMismatchError
    from conftest import killed_run_temp

    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d)
    stale = killed_run_temp(d, "export")
    onnx_export.export_all(tiny_model_dir, d, precision="fp32")
    assert not stale.exists()
    f = d / "vae_decoder.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match="content differs.*--force"):
        onnx_export.export_all(tiny_model_dir, d, precision="fp32")


def test_fp16_export_is_half_precision_and_validates(tiny_fp16_engines):
    out, m = tiny_fp16_engines
    for name in ("projector", "step_cfg"):
        g = onnx.load(str(out / f"{name}.onnx")).graph
        kinds = {i.data_type for i in g.initializer if len(i.dims) >= 2}
        assert kinds == {onnx.TensorProto.FLOAT16}, name       # weights really are fp16
        v = m["stages"][name]["validation"]
        assert 0 < v["value"] <= STAGES[name].tolerance["fp16"]  # fp16 differs from fp32, within bounds
    # fp32 at the boundary, whatever the precision inside
    assert _io(onnx.load(str(out / "step_cfg.onnx")).graph.input)[0] == ("x", "float32", ("B", 4, 64, 64))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_a_channels_last_trace_writes_the_nchw_graph(tiny_models, tmp_path, monkeypatch, precision):
    """The trace runs with channels-last weights (much faster fp16 convolutions on AVX2 CPUs); the graph
    must be the one an NCHW trace writes, node for node and weight for weight, and the module's weights
    must be back in NCHW order afterwards."""
    import hashlib

    import torch
    from arc2face_export import tracing
    from arc2face_rt.specs import VAE_DECODER

    module = onnx_export._modules_for(tiny_models, "vae_decoder", precision)
    feeds = onnx_export.example_inputs(VAE_DECODER, batch=1)

    def graph(path):
        g = onnx.load(str(path)).graph
        return ([(n.op_type, list(n.input), list(n.output), [str(a) for a in n.attribute]) for n in g.node],
                {i.name: hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() for i in g.initializer})

    assert tracing.TRACE_MEMORY_FORMAT == torch.channels_last
    (tmp_path / "cl").mkdir()
    tracing.export_graph(module, VAE_DECODER, feeds, tmp_path / "cl" / "vae_decoder.onnx")
    convs = [p for p in module.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)      # NCHW again
    monkeypatch.setattr(tracing, "TRACE_MEMORY_FORMAT", torch.contiguous_format)
    (tmp_path / "nchw").mkdir()
    tracing.export_graph(module, VAE_DECODER, feeds, tmp_path / "nchw" / "vae_decoder.onnx")
    got, want = graph(tmp_path / "cl" / "vae_decoder.onnx"), graph(tmp_path / "nchw" / "vae_decoder.onnx")
    assert len(got[0]) > 100 and any(n[0] == "Conv" for n in got[0])
    assert got == want


def test_large_graphs_use_external_data(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "ext"
    m = onnx_export.export_all(tiny_model_dir, out, stages=("projector",))
    assert set(m["stages"]["projector"]["files"]) == {"projector.onnx", "projector.onnx.data"}
    assert (out / "projector.onnx").stat().st_size < 1 << 20 < (out / "projector.onnx.data").stat().st_size
    from arc2face_rt.backends.ort import OrtSession

    y = OrtSession(out / "projector.onnx", device="cpu").run({"id": np.ones((1, 512), np.float32)})["cond"]
    assert y.shape == (1, 77, 768) and np.isfinite(y).all()


def test_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"metric": "relative_l2", "value": 0.0, "tolerance": 1, "batch": 1}

    monkeypatch.setattr(onnx_export, "_validate", boom)
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_all(tiny_model_dir, out / "engines", stages=("projector", "step"))
    assert not out.exists()           # the folders the export made are gone with it


def test_validation_failure_is_reported(tiny_model_dir, tmp_path, monkeypatch):
    """A graph that computes something else (here: its outputs off by 1e-3, ten times the tolerance, where
    torch's fp32 is 1e-7 from float64) is an export bug, also after the float64 second opinion."""
    from arc2face_rt.backends.ort import OrtSession

    real = OrtSession.run

    def off(self, feeds, *a, **k):
        return {name: v * np.float32(1.001) for name, v in real(self, feeds, *a, **k).items()}

    monkeypatch.setattr(OrtSession, "run", off)
    with pytest.raises(onnx_export.ValidationError, match="exceeds tolerance"):
        onnx_export.export_all(tiny_model_dir, tmp_path / "v", stages=("step",))
    assert not (tmp_path / "v" / "manifest.json").exists()


def test_engines_from_another_revision_or_damaged_are_refused(tiny_engines, tmp_path):
    from arc2face_rt.pipeline import Arc2FacePipeline

    copy = tmp_path / "e"
    shutil.copytree(tiny_engines, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["spec_revision"] = SPEC_REVISION + 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="--force"):
        Arc2FacePipeline(copy, backend="ort")
    shutil.copy(tiny_engines / "manifest.json", copy / "manifest.json")
    p = copy / "vae_decoder.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(EngineMismatchError, match="truncated"):
        Arc2FacePipeline(copy, backend="ort")
    with pytest.raises(EngineMismatchError, match="no manifest.json"):
        Arc2FacePipeline(tmp_path, backend="ort")


def test_a_model_or_dataset_folder_given_as_engines_says_what_it_is(tiny_model_dir, tmp_path):
    """A model folder as --engines was told to run `onnx --model-dir MODEL --out` that very folder, which the
    export then refused (it holds other files); a dataset folder got the same advice."""
    from arc2face_rt.pipeline import Arc2FacePipeline

    with pytest.raises(EngineMismatchError, match=rf"{tiny_model_dir}: is a model folder .* `arc2face-export onnx "
                                                  rf"--model-dir {tiny_model_dir} --out ENGINES`"):
        Arc2FacePipeline(tiny_model_dir, backend="ort")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(EngineMismatchError, match="is a dataset that `arc2face-rt dataset` made"):
        Arc2FacePipeline(tmp_path, backend="ort")


def _linked_copy(src, dst):
    """A copy whose files are hard links: renames in it never touch the shared fixture's files."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_force_replaces_the_old_export_and_keeps_the_caches(tiny_model_dir, tiny_engines, tmp_path):
    d = _linked_copy(tiny_engines, tmp_path / "e")
    (d / "projector.plan").write_bytes(b"a plan of the old graphs")
    (d / "step_cfg.ov-int8.xml").write_bytes(b"<net/>")          # OpenVINO int8 graphs are ours too
    (d / "step_cfg.ov-int8.bin").write_bytes(b"weights")
    (d / "timing.cache").write_bytes(b"cache")
    (d / ".gitkeep").touch()
    onnx_export.export_all(tiny_model_dir, d, force=True, stages=("projector",), validate=False)
    assert sorted(p.name for p in d.iterdir()) == [".gitkeep", "manifest.json", "projector.onnx", "timing.cache"]
    assert set(mf.load_manifest(d)["stages"]) == {"projector"}


def test_force_takes_a_folder_holding_our_temporary_files(tiny_model_dir, tiny_engines, tmp_path):
    """A killed openvino-int8's temporary folder is removed, a running one's is left alone; neither makes
    the folder "not an engines folder"."""
    from arc2face_rt.atomic import temp_dir
    from conftest import killed_run_temp

    d = _linked_copy(tiny_engines, tmp_path / "e")
    stale = killed_run_temp(d, "step_cfg.ov-int8.xml")
    running = temp_dir(d, "step.ov-int8.xml")
    onnx_export.export_all(tiny_model_dir, d, force=True, stages=("projector",), validate=False)
    assert sorted(p.name for p in d.iterdir()) == sorted([running.name, "manifest.json", "projector.onnx"])
    assert not stale.exists()


@pytest.mark.parametrize("side", ["old file cannot be moved aside", "new file cannot be moved in"])
def test_a_failed_swap_puts_the_old_export_back(tiny_model_dir, tiny_engines, tmp_path, monkeypatch, side):
    """E.g. `chattr +i` on one old file: the folder stays the working export it was, manifest included."""
    from test_bad_input import snapshot

    d = _linked_copy(tiny_engines, tmp_path / "e")
    before = snapshot(d)
    victim = d / "step.onnx"
    real_rename, real_replace, real_link = os.rename, os.replace, os.link
    failed, times = [], 1 if side.startswith("old") else 2       # moving in: the link, then its rename fallback

    def guarded(real):
        def move(src, dst, *a, **k):
            if Path(src if side.startswith("old") else dst) == victim and len(failed) < times:   # the rollback may
                failed.append(src)
                raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(os, "link", guarded(real_link))
    with pytest.raises(PermissionError):
        onnx_export.export_all(tiny_model_dir, d, force=True, validate=False)
    monkeypatch.undo()
    assert snapshot(d) == before                      # no backup or temporary folder left either
    assert set(mf.load_manifest(d)["stages"]) == set(STAGES)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_files_get_the_usual_modes(tiny_model_dir, tmp_path, monkeypatch, umask):
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 0)         # a *.onnx.data file too
    old = os.umask(umask)
    try:
        onnx_export.export_all(tiny_model_dir, tmp_path / "e", stages=("projector",), validate=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").iterdir()}
    assert set(modes) == {"manifest.json", "projector.onnx", "projector.onnx.data"}
    assert set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o777 & ~umask


def test_demo_reuses_its_folder_and_reports_failures_as_its_own(tiny_model_dir, tiny_engines, tmp_path,
                                                                 monkeypatch, capsys):
    from arc2face_export.cli import main
    from arc2face_rt.errors import InvalidInputError
    from arc2face_rt.pipeline import Arc2FacePipeline

    d = tmp_path / "demo"
    _linked_copy(tiny_model_dir, d / "model-tiny")            # what an earlier demo run wrote: reused
    _linked_copy(tiny_engines, d / "engines-tiny-fp32")
    argv = ["demo", "--out", str(d), "-n", "1", "--steps", "1"]
    assert main(argv) == 0
    assert (d / "images" / "run-001" / "arc2face_0_0000.png").is_file()

    def refused(*a, **k):
        raise InvalidInputError("something the runtime refused")

    monkeypatch.setattr(Arc2FacePipeline, "generate", refused)
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "arc2face-export: error: something the runtime refused"


def test_demo_checks_its_images_folder_before_exporting_and_replaces_its_own_export(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """`images` a file was refused only after the export; an export of another checkpoint in the demo's
    own engines folder was refused with advice to pass --force, which demo does not have."""
    from arc2face_export import onnx_export
    from arc2face_export.cli import main
    from arc2face_rt.errors import InvalidInputError

    calls = []
    monkeypatch.setattr(onnx_export, "export_all", lambda *a, **k: calls.append(k))
    d = tmp_path / "demo"
    _linked_copy(tiny_model_dir, d / "model-tiny")
    (d / "images").write_text("mine")
    assert main(["demo", "--out", str(d), "-n", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert calls == [] and len(err) == 1 and f"{d / 'images'}: is a file" in err[0], err
    (d / "images").unlink()

    def another_export(*a, force=False, **k):
        calls.append(force)
        if not force:
            raise onnx_export.ExportExistsError(f"{d / 'engines-tiny-fp32'}: holds another export; ... or pass --force")
        raise InvalidInputError("stopped here")
    monkeypatch.setattr(onnx_export, "export_all", another_export)
    assert main(["demo", "--out", str(d), "-n", "1", "--steps", "1"]) == 2
    assert calls == [False, True] and "exporting again" in capsys.readouterr().err


def test_demo_after_a_killed_export_removes_its_temporary_folder(tiny_model_dir, tiny_engines, tmp_path):
    """A demo SIGKILLed while exporting leaves `.export.arc2face-HOST-PID-*.tmp/` in its engines folder: the
    next demo run removes it and goes on (it used to refuse the folder as not an engines folder)."""
    from arc2face_export.cli import main
    from conftest import killed_run_temp

    d = tmp_path / "demo"
    _linked_copy(tiny_model_dir, d / "model-tiny")
    _linked_copy(tiny_engines, d / "engines-tiny-fp32")
    stale = killed_run_temp(d / "engines-tiny-fp32", "export")
    assert main(["demo", "--out", str(d), "-n", "1", "--steps", "1"]) == 0
    assert not stale.exists() and (d / "images" / "run-001" / "arc2face_0_0000.png").is_file()


def test_an_export_that_appeared_meanwhile_is_never_replaced(tmp_path):
    """Two exports into one new folder: the one that finishes second finds the other's files where it
    would move its own (it decided at its start that there was nothing to replace) and stops, putting
    its own files back; the other export stays as it was."""
    from arc2face_export.engines_folder import swap_in

    out, new = tmp_path / "e", tmp_path / "e" / ".new"
    new.mkdir(parents=True)
    for name in ("projector.onnx", "manifest.json"):
        (new / name).write_text(f"ours {name}")
    (out / "projector.onnx").write_text("theirs")                  # written after this export started
    with pytest.raises(OutputExistsError, match="another export meanwhile"):
        swap_in(out, new, [])
    assert (out / "projector.onnx").read_text() == "theirs" and not (out / "manifest.json").exists()
    assert sorted(p.name for p in new.iterdir()) == ["manifest.json", "projector.onnx"]
    assert not [p for p in out.iterdir() if p.name not in (".new", "projector.onnx")]   # no backup folder left
