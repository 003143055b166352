"""`arc2face-rt dataset` refusing what it cannot do safely, each in one line (exit 2) with nothing
written or changed: another setup in a folder being resumed, a folder that is not a dataset, missing
face models, committed shards whose files are gone or truncated, a shard another resume committed
meanwhile, counts no machine holds, an unreachable Ray head."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from arc2face_rt.cli import main as rt_main
from arc2face_rt.pipeline import GenerationOptions
from dataset_runs import dataset_args, tree


def test_refusals_write_nothing(tiny_engines, wds_run, tmp_path, capsys):
    before = tree(wds_run, skip_run=False)
    # the same folder with other settings, or without --resume
    assert rt_main(dataset_args(tiny_engines, wds_run, "--format", "wds")) == 2
    assert "--resume" in capsys.readouterr().err
    assert rt_main(dataset_args(tiny_engines, wds_run, "--format", "wds", "--resume", "--steps", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other settings" in err and "steps" in err
    assert rt_main(dataset_args(tiny_engines, wds_run, "--format", "wds", "--resume", "--steps", "2",
                                "--guidance", "2")) == 2     # every difference is named, not only the first
    err = capsys.readouterr().err
    assert "spec.options.guidance: 3.0 there, 2.0 now; spec.options.steps: 1 there, 2 now" in err
    assert tree(wds_run, skip_run=False) == before
    # a folder that is not a dataset, a filter without models
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    assert rt_main(dataset_args(tiny_engines, other)) == 2
    assert "not empty" in capsys.readouterr().err
    # a claim another host was writing (a killed run, or one still running there) is named, with its writer
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    (claimed / ".dataset.json.arc2face-node7-4242-x1y2.tmp").write_text("{")
    assert rt_main(dataset_args(tiny_engines, claimed)) == 2
    err = capsys.readouterr().err
    assert "holds .dataset.json.arc2face-node7-4242-x1y2.tmp, unfinished output of a run (host node7, process " \
           "4242) still writing or stopped; if none runs, delete them" in err
    assert [p.name for p in claimed.iterdir()] == [".dataset.json.arc2face-node7-4242-x1y2.tmp"]
    assert rt_main(dataset_args(tiny_engines, tmp_path / "new", "--min-similarity", "0.3")) == 2
    assert "--models" in capsys.readouterr().err
    # --workers counts Ray actors: without --ray it would be ignored, so it is refused
    assert rt_main(dataset_args(tiny_engines, tmp_path / "new", "--workers", "2")) == 2
    assert "--workers 2 needs --ray" in capsys.readouterr().err
    # the filter's options without the filter were recorded in dataset.json though nothing was ever rejected
    assert rt_main(dataset_args(tiny_engines, tmp_path / "new", "--on-reject", "regenerate")) == 2
    assert "--on-reject regenerate needs --min-similarity" in capsys.readouterr().err
    assert rt_main(dataset_args(tiny_engines, tmp_path / "new", "--models", "m", "--min-similarity", "0.3",
                                "--max-tries", "3")) == 2
    assert "--max-tries 3 needs --on-reject regenerate" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claimed", "notes"]


def test_missing_face_models_refused_before_out_is_written(tiny_engines, tmp_path, capsys):
    """--models naming no models: one line, exit 2, and --out is not made (it used to get dataset.json,
    identities.npy and shards/, which then refused the corrected command)."""
    out = tmp_path / "out"
    assert rt_main(dataset_args(tiny_engines, out, "--models", str(tmp_path / "no-models"))) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scrfd_10g_bnkps.onnx" in err[0], err
    assert "pass --models DIR" in err[0] and "--detector" not in err[0], err       # dataset has no --detector


def test_resume_refuses_a_committed_shard_whose_files_are_gone(tiny_engines, wds_run, scored_run, tmp_path, capsys):
    """--resume checks each committed shard's files (folders: every image its manifest lists, and its size;
    wds: the tar's size): a deleted or truncated image or a missing or truncated tar is one line, exit 2, nothing changed, and
    doing what the line says makes the shard again, byte for byte."""
    import shutil

    from face_fixtures import tiny_models_dir

    folders, away = tmp_path / "folders", tmp_path / "away"
    shutil.copytree(scored_run, folders)
    away.mkdir()
    (folders / "id_000003" / "0001.png").unlink()
    args = dataset_args(tiny_engines, folders, "--models", str(tiny_models_dir()), "--resume")
    before = tree(folders, skip_run=False)
    assert rt_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert tree(folders, skip_run=False) == before
    assert len(err) == 1 and f"{folders / 'id_000003' / '0001.png'}: is missing" in err[0], err
    assert f"move {folders / 'shards' / 'shard-000001.json'} and {folders / 'id_000003'} away" in err[0], err
    for name in ("shards/shard-000001.json", "id_000003"):          # what the line says
        (folders / name).rename(away / name.replace("/", "-"))
    assert rt_main(args) == 0 and "1 already committed" in capsys.readouterr().err
    assert tree(folders) == tree(scored_run)
    png = folders / "id_000002" / "0000.png"                   # a truncated image, same shard
    png.write_bytes(png.read_bytes()[:100])
    before = tree(folders, skip_run=False)
    assert rt_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert tree(folders, skip_run=False) == before
    assert len(err) == 1 and f"{png}: has 100 bytes" in err[0] and "truncated" in err[0], err
    tars = tmp_path / "wds"
    shutil.copytree(wds_run, tars)
    tar = tars / "shard-000001.tar"
    for damage, words in ((lambda: os.truncate(tar, 1000), "has 1000 bytes"), (tar.unlink, "is missing")):
        damage()
        before = tree(tars, skip_run=False)
        assert rt_main(dataset_args(tiny_engines, tars, "--format", "wds", "--resume")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tar}: {words}" in err[0] and "shard-000001.json" in err[0], err
        assert tree(tars, skip_run=False) == before
    # identities.npy gone with shards committed: a run with other identities would have taken over its name
    (tars / "identities.npy").unlink()
    before = tree(tars, skip_run=False)
    assert rt_main(dataset_args(tiny_engines, tars, "--format", "wds", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tars / 'identities.npy'}: is missing, and shards are committed" in err[0], err
    assert tree(tars, skip_run=False) == before


def test_shard_check_without_recorded_sizes_checks_presence(tmp_path):
    """A shard manifest from before sizes were recorded: a truncated image passes (nothing to compare),
    a missing one is refused; with sizes, both are; a sizes list that does not fit is not a manifest."""
    from arc2face_rt.dataset.runner import _check_shard_files
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.errors import InvalidInputError

    spec = DatasetSpec(identities=1, per_identity=2, options=GenerationOptions())
    (tmp_path / "id_000000").mkdir()
    (tmp_path / "id_000000" / "0000.png").write_bytes(b"x" * 5)        # recorded as 10 bytes below
    (tmp_path / "id_000000" / "0001.png").write_bytes(b"x" * 10)
    p, files = tmp_path / "shard.json", ["id_000000/0000.png", "id_000000/0001.png"]
    _check_shard_files(tmp_path, spec, 0, p, {"files": files})
    with pytest.raises(InvalidInputError, match="0000.png: has 5 bytes"):
        _check_shard_files(tmp_path, spec, 0, p, {"files": files, "bytes": [10, 10]})
    with pytest.raises(InvalidInputError, match="not shard 0's manifest"):
        _check_shard_files(tmp_path, spec, 0, p, {"files": files, "bytes": [10]})
    (tmp_path / "id_000000" / "0001.png").unlink()
    with pytest.raises(InvalidInputError, match="0001.png: is missing"):
        _check_shard_files(tmp_path, spec, 0, p, {"files": files})


@pytest.mark.parametrize("same", [True, False])
def test_a_shard_another_resume_committed_meanwhile(tiny_engines, wds_run, tmp_path, capsys, monkeypatch, same):
    """Two --resume runs on one folder: the one whose manifest write finds the other's identical shard
    counts it as done (exit 0, same bytes); a different manifest there is refused, never overwritten."""
    import shutil

    from arc2face_rt.dataset import worker

    out = tmp_path / "wds"
    shutil.copytree(wds_run, out)
    theirs = out / "shards" / "shard-000001.json"
    m = json.loads(theirs.read_bytes())
    m["run"] = {"seconds": 1.0, "worker": "elsewhere:1"}
    if not same:
        m["counts"]["generated"] += 1
    theirs.unlink()
    real = worker.atomic_write

    def other_run_first(path, data, **kw):          # the other run commits just before this one
        if Path(path) == theirs:
            theirs.write_text(json.dumps(m))
        return real(path, data, **kw)

    monkeypatch.setattr(worker, "atomic_write", other_run_first)
    rc = rt_main(dataset_args(tiny_engines, out, "--format", "wds", "--resume"))
    err = capsys.readouterr().err
    assert json.loads(theirs.read_bytes()) == m                     # theirs, never overwritten
    if same:
        assert rc == 0 and tree(out) == tree(wds_run), err
    else:
        assert rc == 2 and "with other content" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("flag,value", [("--identities", "1000000000"), ("--per-identity", "1000000000000000")])
def test_counts_no_machine_holds_are_refused_while_parsing(tiny_engines, tmp_path, capsys, flag, value):
    """Before: out of memory after --out was made, advising --batch and --resume (neither helps)."""
    args = ["dataset", "--engines", str(tiny_engines), "--identities", "2", "--per-identity", "1", "--out",
            str(tmp_path / "o")]
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit):
        rt_main(args)
    assert f"{value} is outside 1.." in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_unreachable_ray_address_is_refused_before_out_is_made(tiny_engines, tmp_path, capsys):
    """Ray retried for minutes, printing a line per try, after --out was written."""
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:                     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert rt_main(dataset_args(tiny_engines, tmp_path / "o", "--ray", f"127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Ray head answers there" in err[0] and not (tmp_path / "o").exists()


def test_resume_refuses_other_face_models(tiny_engines, scored_run, tmp_path, capsys):
    """The similarities, and with --min-similarity the images kept, depend on the face models: a --resume
    with others was accepted, and scored the rest of the dataset with them. dataset.json records their
    files' sha256; the same models in another folder resume, and a dataset recorded before that resumes
    as it did."""
    import shutil

    from arc2face_ref.face_models import write_face_models
    from face_fixtures import tiny_models_dir

    out, other = tmp_path / "out", tmp_path / "other-models"
    shutil.copytree(scored_run, out)
    meta = json.loads((out / "dataset.json").read_text())
    assert set(meta["face_models"]) == {"detector", "recognizer"}
    (out / "shards" / "shard-000001.json").unlink()                 # work left for the resume
    write_face_models(other, seed=1, size="tiny")
    before = tree(out, skip_run=False)
    assert rt_main(dataset_args(tiny_engines, out, "--models", str(other), "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with other settings (face_models.detector: " in err[0], err
    assert tree(out, skip_run=False) == before
    del meta["face_models"]                                         # as an older arc2face-rt wrote it
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    before = tree(out, skip_run=False)
    assert rt_main(dataset_args(tiny_engines, out, "--models", str(tiny_models_dir()), "--resume")) == 0
    images = lambda d: {k: v for k, v in tree(d).items() if k != "dataset.json"}     # noqa: E731
    assert images(out) == images(scored_run) and "face_models" not in json.loads((out / "dataset.json").read_text())


def test_a_dataset_description_without_its_spec_is_named_damaged(tiny_engines, wds_run, tmp_path, capsys):
    """It was "made with other settings", followed by every setting of this run."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(wds_run, out)
    meta = json.loads((out / "dataset.json").read_text())
    del meta["spec"]
    (out / "dataset.json").write_text(json.dumps(meta))
    before = tree(out, skip_run=False)
    assert rt_main(dataset_args(tiny_engines, out, "--format", "wds", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json: is not a dataset description arc2face-rt wrote (it records no spec" \
        in err[0], err
    assert tree(out, skip_run=False) == before


def test_a_deeply_nested_record_is_refused_in_one_line(tmp_path):
    """json raises RecursionError (not ValueError) on deep nesting: `--resume` printed a traceback."""
    from arc2face_rt.dataset.runner import _read_json
    from arc2face_rt.errors import InvalidInputError

    (tmp_path / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidInputError, match="is not a dataset record arc2face-rt wrote"):
        _read_json(tmp_path / "dataset.json", "dataset record")
