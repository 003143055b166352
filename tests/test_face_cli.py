"""`embed` / `score` subcommands and identity_from_images, end to end on the random tiny face models."""
import argparse
import shutil

import numpy as np
import pytest
from PIL import Image

from arc2face_rt.errors import InvalidInputError, MissingWeightsError, NoFaceError, OutputExistsError
from arc2face_rt.face.cli import add_embed_parser, add_score_parser
from arc2face_rt.npyio import save_npy_atomic
from arc2face_rt.face.models import FaceWarning, identity_from_images, resolve_model
from arc2face_rt.pipeline import load_identity
from face_fixtures import astronaut, tiny_models_dir


def cli(*argv):
    parser = argparse.ArgumentParser(prog="arc2face-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_embed_parser(sub)
    add_score_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    img = astronaut()
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(img[:, ::-1].copy()).save(d / "b.jpg", quality=95)
    (d / "broken.jpg").write_text("not an image")
    return d


def test_embed_folder_skips_bad_file(photos, tmp_path, capsys):
    out = tmp_path / "id.npy"
    assert cli("embed", "--image", photos, "--out", out, "--models", tiny_models_dir(), "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "not an image" in err
    assert "from 2 of 3 image(s)" in err and "1 skipped" in err
    ident = np.load(out)
    assert ident.shape == (512,) and ident.dtype == np.float32
    assert abs(np.linalg.norm(ident) - 1) < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temp file left behind
    # same photos through the function `generate --image` calls
    got = identity_from_images([photos / "a.png", photos / "b.jpg"], tiny_models_dir(), device="cpu")
    np.testing.assert_allclose(got, ident, atol=1e-6)


def test_embed_never_overwrites(photos, tmp_path):
    out = tmp_path / "id.npy"
    out.write_bytes(b"precious")
    args = ["embed", "--image", photos / "a.png", "--out", out, "--models", tiny_models_dir(), "--device", "cpu"]
    with pytest.raises(OutputExistsError, match="--force"):
        cli(*args)
    assert out.read_bytes() == b"precious"
    with pytest.raises(OutputExistsError, match="not an identity file"):     # --force replaces only identities
        cli(*args, "--force")
    assert out.read_bytes() == b"precious"
    save_npy_atomic(out, np.ones(512, np.float32), force=True)
    assert cli(*args, "--force") == 0 and np.load(out).shape == (512,) and np.load(out)[0] != 1
    with pytest.raises(InvalidInputError, match=r"\.npy"):
        cli("embed", "--image", photos / "a.png", "--out", tmp_path / "id.txt", "--models", tiny_models_dir())


def test_embed_nothing_usable(photos, tmp_path):
    out = tmp_path / "id.npy"
    # an unreadable file is reported as unreadable, not as "no face"
    with pytest.raises(InvalidInputError, match="none of the 1 image.*broken.jpg: not an image") as e:
        cli("embed", "--image", photos / "broken.jpg", "--out", out, "--models", tiny_models_dir(), "--device", "cpu")
    assert not isinstance(e.value, NoFaceError) and "usable face" not in str(e.value)
    with pytest.raises(NoFaceError):   # the random detector's face is ~224 px wide in a 512 px photo
        cli("embed", "--image", photos / "a.png", "--out", out, "--models", tiny_models_dir(), "--device", "cpu",
            "--min-size", 400)
    assert not out.exists()


def test_score(photos, tmp_path, capsys):
    out = tmp_path / "id.npy"
    cli("embed", "--image", photos / "a.png", "--out", out, "--models", tiny_models_dir(), "--device", "cpu")
    capsys.readouterr()
    rc = cli("score", "--identity", out, photos, "--models", tiny_models_dir(), "--device", "cpu")
    lines = dict(reversed(line.split("\t")) for line in capsys.readouterr().out.splitlines())
    assert rc == 1                                           # broken.jpg could not be scored
    assert float(lines[str(photos / "a.png")]) == pytest.approx(1.0, abs=1e-4)
    assert -1 <= float(lines[str(photos / "b.jpg")]) < 1
    assert lines[str(photos / "broken.jpg")] == "nan"
    assert cli("score", "--identity", out, photos / "a.png", "--models", tiny_models_dir(), "--device", "cpu") == 0
    odd = tmp_path / "odd\nname\t\\t.png"                    # one row each, whatever the name holds
    odd.write_bytes((photos / "a.png").read_bytes())
    capsys.readouterr()
    assert cli("score", "--identity", out, odd, "--models", tiny_models_dir(), "--device", "cpu") == 0
    assert capsys.readouterr().out.splitlines() == [f"1.0000\t{tmp_path}/odd\\nname\\t\\\\t.png"]


def test_score_aligned_crops(tmp_path, capsys):
    from arc2face_rt.face import ArcFaceRecognizer
    crop = astronaut()[100:212, 180:292].copy()
    Image.fromarray(crop).save(tmp_path / "crop.png")
    rec = ArcFaceRecognizer.from_file(tiny_models_dir() / "arcface.onnx", device="cpu")
    save_npy_atomic(tmp_path / "id.npy", rec.embed(crop)[0])
    assert cli("score", "--aligned", "--identity", tmp_path / "id.npy", tmp_path / "crop.png",
               "--recognizer", tiny_models_dir() / "arcface.onnx", "--device", "cpu") == 0
    assert float(capsys.readouterr().out.split("\t")[0]) == pytest.approx(1.0, abs=1e-5)
    Image.fromarray(astronaut()).save(tmp_path / "full.png")
    assert cli("score", "--aligned", "--identity", tmp_path / "id.npy", tmp_path / "full.png",
               "--recognizer", tiny_models_dir() / "arcface.onnx", "--device", "cpu") == 1
    assert "not an aligned 112x112" in capsys.readouterr().err


def test_identity_from_images_warns_and_raises(photos):
    with pytest.warns(FaceWarning, match="broken.jpg"):
        identity_from_images(photos, tiny_models_dir(), device="cpu")
    logged = []
    identity_from_images([photos], tiny_models_dir(), device="cpu", method="median", log=logged.append)
    assert len(logged) == 1 and "broken.jpg" in logged[0]
    with pytest.raises(InvalidInputError, match="broken.jpg: not an image"):
        identity_from_images(photos / "broken.jpg", tiny_models_dir(), device="cpu", log=logged.append)
    with pytest.raises(NoFaceError, match="usable face"):    # the random detector's face is ~224 px wide
        identity_from_images(photos / "a.png", tiny_models_dir(), device="cpu", min_size=400, log=logged.append)


def test_face_option_parsing(photos, tmp_path):
    with pytest.raises(SystemExit):
        cli("embed", "--image", photos, "--out", tmp_path / "x.npy", "--face", "biggest")
    out = tmp_path / "x.npy"
    assert cli("embed", "--image", photos / "a.png", "--out", out, "--models", tiny_models_dir(), "--device", "cpu",
               "--face", "0", "--max-pixels", "1e6", "--min-score", "0.5", "--combine", "median") == 0


def test_model_resolution(tmp_path):
    src = tiny_models_dir()
    (tmp_path / "antelopev2").mkdir()
    shutil.copy(src / "scrfd_10g_bnkps.onnx", tmp_path / "antelopev2" / "det_10g.onnx")
    assert resolve_model("detector", None, tmp_path) == tmp_path / "antelopev2" / "det_10g.onnx"
    assert resolve_model("detector", "/x/y.onnx", tmp_path).as_posix() == "/x/y.onnx"
    with pytest.raises(MissingWeightsError, match="no arcface.onnx"):
        resolve_model("recognizer", None, tmp_path)
    (tmp_path / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="glintr100.onnx but no arcface.onnx"):
        resolve_model("recognizer", None, tmp_path)
    shutil.copy(src / "arcface.onnx", tmp_path / "arcface.onnx")
    assert resolve_model("recognizer", None, tmp_path) == tmp_path / "arcface.onnx"


def test_load_identity_checks(tmp_path):
    np.save(tmp_path / "ok.npy", np.full((1, 512), 3.0, np.float32))
    assert abs(np.linalg.norm(load_identity(tmp_path / "ok.npy")) - 1) < 1e-6
    np.save(tmp_path / "bad.npy", np.zeros(128, np.float32))
    with pytest.raises(InvalidInputError, match=r"expected \(512,\)"):
        load_identity(tmp_path / "bad.npy")
    with pytest.raises(InvalidInputError, match="no such file"):
        load_identity(tmp_path / "none.npy")


def test_several_faces_and_skips_are_reported():
    from pathlib import Path

    from arc2face_rt.face.models import describe_report
    from arc2face_rt.face.identity import EmbedReport, FileResult
    report = EmbedReport([FileResult(Path("group.jpg"), embedding=np.ones(512, np.float32), n_faces=3),
                          FileResult(Path("solo.jpg"), embedding=np.ones(512, np.float32), n_faces=1),
                          FileResult(Path("cat.jpg"), error="cat.jpg: no face found", error_type="NoFaceError")])
    lines = []
    describe_report(report, "largest", lines.append)
    assert lines == ["group.jpg: 3 faces found, used the largest (--face INDEX picks another)",
                     "skipped: cat.jpg: no face found"]
    lines.clear()
    describe_report(report, 2, lines.append)
    assert "used face 2" in lines[0]


def test_missing_models_error_names_only_the_commands_flags(photos, tmp_path, capsys, monkeypatch):
    """`generate --image` has --models but no --detector/--recognizer: its error must not suggest
    them (`dataset` is checked in test_dataset_refusals.py); `embed` has them, so its error does."""
    from arc2face_rt.cli import main as rt_main

    monkeypatch.delenv("ARC2FACE_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)                          # no ./models here
    gen = ["generate", "--engines", str(tmp_path / "engines"), "--backend", "ort", "--device", "cpu",
           "--image", str(photos / "a.png"), "--out", str(tmp_path / "out")]
    for extra, where in ((["--models", str(tmp_path / "none")], "--models DIR"),
                         ([], "--models DIR or set $ARC2FACE_MODELS")):
        assert rt_main(gen + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no scrfd_10g_bnkps.onnx" in err[0] and where in err[0], err
        assert "--detector" not in err[0] and "--recognizer" not in err[0], err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingWeightsError, match="pass --detector FILE or --models DIR"):
        cli("embed", "--image", photos / "a.png", "--out", tmp_path / "id.npy", "--models", tmp_path / "none")
    with pytest.raises(MissingWeightsError, match="pass --recognizer FILE or --models DIR"):
        cli("embed", "--image", photos / "a.png", "--out", tmp_path / "id.npy", "--models", tmp_path / "none",
            "--detector", tiny_models_dir() / "scrfd_10g_bnkps.onnx", "--device", "cpu")


def test_files_stat_refuses_are_found_before_the_face_models_load(tmp_path, monkeypatch):
    """Empty files and pipes are refused from stat(): with nothing else, no model loads."""
    import os

    import arc2face_rt.face.cli as face_cli

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.png")
    bad = [tmp_path / n for n in ("empty.png", "empty.jpg", "fifo.png")]
    monkeypatch.setattr(face_cli, "load_face_models", lambda *a, **k: pytest.fail("face models loaded"))
    with pytest.raises(InvalidInputError, match="none of the 3 image"):
        cli("embed", "--image", *bad, "--out", tmp_path / "id.npy", "--models", tiny_models_dir())
    save_npy_atomic(tmp_path / "id.npy", np.ones(512, np.float32))
    assert cli("score", "--identity", tmp_path / "id.npy", *bad, "--models", tiny_models_dir()) == 1


def test_score_refuses_an_empty_identity_path():
    with pytest.raises(SystemExit):
        cli("score", "--identity", "", "x.png")


@pytest.mark.parametrize("flags, words", [
    (["--backend", "openvino", "--device", "cuda"], "--backend openvino runs on the CPU"),
    (["--backend", "ort", "--engines", "nowhere"], "--engines nowhere: its face models' TensorRT plans are for"),
    (["--backend", "openvino", "--engines", "nowhere"], "--backend openvino runs the ONNX files"),
    # flags that were read and then ignored, exit 0 (the detector file need not even exist)
    (["--aligned", "--face", "3", "--min-score", "0.99", "--detector", "/nonexistent.onnx"],
     r"--detector, --face, --min-score: detection settings, and --aligned inputs are not detected"),
    (["--aligned", "--min-size", "500"], "--min-size: detection settings"),
    (["--no-verify"], "without --engines there are none"),
])
def test_model_flags_that_cannot_be_honoured_are_refused(photos, tmp_path, flags, words):
    """embed and score ran these (the first on the CPU, the others ignoring --engines), where generate refuses."""
    save_npy_atomic(tmp_path / "id.npy", np.ones(512, np.float32))
    for argv in (["embed", "--image", photos / "a.png", "--out", tmp_path / "e.npy"],
                 ["score", "--identity", tmp_path / "id.npy", photos / "a.png"]):
        with pytest.raises(InvalidInputError, match=words):
            cli(*argv, "--models", tiny_models_dir(), *flags)
    assert not (tmp_path / "e.npy").exists()
