"""The two commands as a user runs them: exit codes, one-line errors, files written or left alone."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from arc2face_rt.cli import main as rt_main
from arc2face_rt.images import read_params
from arc2face_export.cli import main as export_main


def test_generate_writes_pngs_with_parameters(tiny_engines, tmp_path, capsys):
    emb = tmp_path / "id.npy"
    np.save(emb, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    out = tmp_path / "out"
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--embedding", str(emb), "-n", "3", "--batch", "2",
                  "--steps", "2", "--seed", "9", "--out", str(out)])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"arc2face_9_000{i}.png" for i in range(3)]
    p = read_params(files[2])
    assert p["seed"] == 9 and p["index"] == 2 and p["steps"] == 2 and p["scheduler"] == "dpmpp2m"
    assert p["guidance"] == 3.0 and len(p["engines"]) == 16 and p["random_weights"] is True
    err = capsys.readouterr().err
    assert "RANDOM-WEIGHT" in err and "wrote 3 image(s)" in err
    assert not list(out.glob(".*"))                       # no temporary files left behind

    # existing outputs are never overwritten
    before = files[0].read_bytes()
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--random-id", "-n", "1", "--steps", "1",
                  "--seed", "9", "--out", str(out)])
    assert rc == 2 and "exist" in capsys.readouterr().err
    assert files[0].read_bytes() == before


@pytest.mark.parametrize("setup,args,msg", [
    (lambda d: np.save(d / "e.npy", np.ones((3, 512), np.float32)), ["--embedding", "{d}/e.npy"], "shape"),
    (lambda d: np.save(d / "e.npy", np.full(512, np.nan, np.float32)), ["--embedding", "{d}/e.npy"], "NaN"),
    (lambda d: (d / "e.npy").write_text("hello"), ["--embedding", "{d}/e.npy"], "not a .npy"),
    (lambda d: None, ["--embedding", "{d}/missing.npy"], "no such file"),
    (lambda d: None, ["--random-id", "-n", "0"], "-n must be"),
    (lambda d: None, ["--random-id", "--steps", "0"], "--steps must be"),
    (lambda d: None, ["--random-id", "--control-scale", "2"], "--control-scale needs --control-image"),
    (lambda d: None, ["--random-id", "--max-pixels", "5"], "--max-pixels 5: limits the photos of --image"),
])
def test_generate_bad_input(tiny_engines, tmp_path, capsys, setup, args, msg):
    setup(tmp_path)
    out = tmp_path / "out"
    argv = ["generate", "--engines", str(tiny_engines), "--out", str(out)] + [a.format(d=tmp_path) for a in args]
    assert rt_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("arc2face-rt: error:") and msg in err[-1]
    assert not out.exists() or not list(out.iterdir())


def test_generate_without_engines_names_the_export_command(tmp_path, capsys):
    assert rt_main(["generate", "--engines", str(tmp_path), "--random-id", "--out", str(tmp_path / "o")]) == 2
    assert "arc2face-export onnx" in capsys.readouterr().err


def test_info(tiny_engines, capsys):
    assert rt_main(["info", "--engines", str(tiny_engines), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "step_cfg" in out and "sha256 verified" in out and "note:" not in out


def test_info_notes_what_a_folder_without_a_step_graph_serves(tmp_path):
    import json

    from arc2face_rt.cli import _missing_stage_notes

    m = {"stages": {"projector": {}, "step": {}, "vae_decoder": {}},
         "lora": {"file": "l.safetensors", "scale": 1.0, "bytes": 1, "sha256": "0" * 64}}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    notes = _missing_stage_notes(m, tmp_path)
    assert len(notes) == 1 and "takes guidance 1 or below only" in notes[0] and "--model-dir MODEL" in notes[0]
    assert "--lora LORA" in notes[0] and "l.safetensors" in notes[0]
    assert "cannot run" in _missing_stage_notes({"stages": {"step_cfg": {}, "step": {}}}, tmp_path)[0]
    # a ControlNet-only folder said both "takes guidance 1 or below only" and "takes guidance above 1 only"
    only_control = {"stages": {"projector": {}, "step_cfg_control": {}, "vae_decoder": {}}}
    notes = _missing_stage_notes(only_control, tmp_path)
    assert notes[0] == "no step graph without ControlNet: `generate` here needs --control-image"
    assert len(notes) == 2 and "`generate` with --control-image here takes guidance above 1 only" in notes[1]
    assert "cannot run" in _missing_stage_notes({"stages": {"projector": {}, "vae_decoder": {}}}, tmp_path)[0]
    full = {"stages": {s: {} for s in ("projector", "step_cfg", "step", "vae_decoder")}}
    assert _missing_stage_notes(full, tmp_path) == []


def test_export_cli_missing_weights(tmp_path, capsys):
    (tmp_path / "m" / "arc2face").mkdir(parents=True)
    assert export_main(["onnx", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "arc2face/diffusion_pytorch_model.safetensors" in err and "random-checkpoint" in err
    assert not (tmp_path / "e").exists()


def test_runtime_never_imports_the_pytorch_stack():
    code = ("import importlib, pkgutil, sys, arc2face_rt\n"
            "for m in pkgutil.walk_packages(arc2face_rt.__path__, 'arc2face_rt.'):\n"
            "    importlib.import_module(m.name)\n"
            "import arc2face_rt.cli\n"
            "arc2face_rt.cli.build_parser()\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_from_photos(tiny_engines, tmp_path, capsys):
    """photo -> (random-weight) SCRFD -> alignment -> ArcFace -> generate, all offline."""
    from PIL import Image
    from skimage import data

    from arc2face_ref.face_models import write_face_models

    write_face_models(tmp_path / "models", seed=0, size="tiny")
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--image", str(tmp_path / "astronaut.png"),
                  str(tmp_path / "broken.jpg"), "--models", str(tmp_path / "models"), "-n", "1", "--steps", "1",
                  "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "broken.jpg" in err                              # the bad photo is reported, not fatal
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", "99999"])
def test_a_bad_thread_count_variable_is_one_line(tiny_engines, tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("ARC2FACE_ORT_THREADS", value)
    rc = rt_main(["generate", "--engines", str(tiny_engines), "--random-id", "-n", "1", "--steps", "1",
                  "--backend", "ort", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"arc2face-rt: error: ARC2FACE_ORT_THREADS={value}:"), err
    assert not (tmp_path / "out").exists()
    if value == "99999":                # more threads than CPUs only contend: 256 on two cores took minutes
        assert f"this process may use {len(os.sched_getaffinity(0))} CPU(s)" in err[-1]


def test_repeated_list_flags_add_up_instead_of_replacing():
    """`--image A --image B` means both photos (as in embed), never only B: every list flag extends."""
    from arc2face_rt.cli import build_parser
    from arc2face_export.cli import build_parser as export_parser
    from arc2face_ref.train.cli import build_parser as train_parser

    a = build_parser().parse_args(["generate", "--engines", "e", "--out", "o", "--image", "a.png", "--image", "b.png",
                                   "--control-image", "p.png", "--control-image", "q.png"])
    assert [str(p) for p in a.image] == ["a.png", "b.png"] and [str(p) for p in a.control_image] == ["p.png", "q.png"]
    a = train_parser().parse_args(["prepare", "--images", "x", "--images", "y", "--models", "m", "--out", "o"])
    assert [str(p) for p in a.images] == ["x", "y"]
    a = export_parser().parse_args(["onnx", "--model-dir", "m", "--out", "o", "--stages", "projector", "--stages", "step"])
    assert a.stages == ["projector", "step"]
    a = export_parser().parse_args(["openvino-int8", "--engines", "e", "--stages", "step", "--stages", "step_cfg"])
    assert a.stages == ["step", "step_cfg"]
    assert export_parser().parse_args(["openvino-int8", "--engines", "e"]).stages is None   # the default: both


@pytest.mark.parametrize("value", ["-inf", "-1e3", "-nan", "-NaN"])
def test_a_negative_value_is_refused_by_the_flags_range_not_taken_for_an_option(value, capsys):
    from arc2face_rt.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--engines", "e", "--out", "o", "--random-id", "--control-scale", value])
    err = capsys.readouterr().err
    assert (f"{value} is outside 0..10" if value == "-1e3" else f"{value} is not a finite number in 0..10") in err


@pytest.mark.parametrize("value,words", [("inf", "inf is not a finite number >= 0"), ("-1", "-1 is outside >= 0")])
def test_a_range_without_an_upper_bound_reads_right(value, words, capsys):
    from arc2face_ref.train.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--model-dir", "m", "--data", "d", "--out", "o", "--max-grad-norm", value])
    assert words in capsys.readouterr().err


def test_flags_that_would_be_ignored_are_refused(tiny_engines, tiny_fp16_engines, tmp_path, capsys):
    """--backend ort --cpu-precision fp32 on an fp16 folder ran fp16 and recorded it (fp32 on an fp32 folder
    asks for what runs, and is accepted); --models without --image was ignored."""
    from arc2face_rt.cli import main

    argv = ["generate", "--random-id", "-n", "1", "--steps", "1", "--backend", "ort", "--device", "cpu",
            "--cpu-precision", "fp32"]
    assert main([*argv, "--engines", str(tiny_fp16_engines[0]), "--out", str(tmp_path / "a")]) == 2
    assert "--cpu-precision fp32 needs --backend openvino (the ort backend runs the folder's fp16 graphs)" in \
        capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*argv, "--engines", str(tiny_engines), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main([*argv, "--engines", str(tiny_engines), "--models", "m", "--out", str(tmp_path / "c")]) == 2
    assert "--models m: the face models make an identity from --image photos" in capsys.readouterr().err
