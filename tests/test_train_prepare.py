"""`arc2face-train prepare`: photos -> WebDataset shards, skips reported, resumable, a re-run a no-op."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from face_fixtures import astronaut, tiny_models_dir
from train_fixtures import astronaut_variants

wds = pytest.importorskip("webdataset")


class _NoFaceOnBlank:
    """The random SCRFD (which "finds" a face in anything) made honest for one case: a uniform
    image gets no face (all scores 0), so the no-face path of prepare is exercised."""

    def __init__(self, session):
        self.session = session
        self.input_names, self.output_names = session.input_names, session.output_names

    def run(self, feeds):
        out = self.session.run(feeds)
        blob = next(iter(feeds.values()))
        if np.ptp(blob[:, :, :100, :100]) == 0:          # the pasted photo's corner: uniform
            out = {k: (np.zeros_like(v) if v.shape[-1] == 1 else v) for k, v in out.items()}
        return out


def _analyzer():
    from arc2face_rt.face.detector import ScrfdDetector
    from arc2face_rt.face.identity import FaceAnalyzer
    from arc2face_rt.face.models import load_face_models

    det, rec = load_face_models(tiny_models_dir(), device="cpu")
    return FaceAnalyzer(ScrfdDetector(_NoFaceOnBlank(det.session)), rec)


def _bigger_faces():
    """_analyzer's models with --min-size 50: another setting."""
    from arc2face_rt.face.identity import FaceAnalyzer

    a = _analyzer()
    return FaceAnalyzer(a.detector, a.recognizer, min_size=50.0)


def _photos(tmp_path):
    from PIL import Image

    paths = astronaut_variants(tmp_path / "photos", n=5)
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / "photos" / "wall.png")   # no face
    (tmp_path / "photos" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return paths


def _tree(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_prepare_shards_skips_and_rerun(tmp_path):
    from arc2face_ref.train.crop import train_crop
    from arc2face_ref.train.prepare import SKIPPED_FILE, prepare

    good = _photos(tmp_path)
    data = tmp_path / "data"
    calls = []

    def factory():
        calls.append(1)
        return _analyzer()

    rep = prepare([tmp_path / "photos"], data, factory, shard_size=3)
    assert (rep.photos, rep.shards, rep.written, len(rep.skipped)) == (7, 3, 5, 2)
    reasons = dict(rep.skipped)
    assert "no face found" in reasons[str(tmp_path / "photos" / "wall.png")]
    assert str(tmp_path / "photos" / "corrupt.jpg") in reasons
    listed = (data / SKIPPED_FILE).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(reasons)

    # The shards read back with webdataset itself; ids are what the front end gives for each photo.
    ana = _analyzer()
    urls = sorted(str(p) for p in data.glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 5
    for s in samples:
        meta = s["json"]
        from arc2face_rt.face.image_io import load_image
        img = load_image(meta["source"])
        emb, face, _ = ana.embed_image(img)
        np.testing.assert_allclose(s["id.npy"], emb, atol=1e-6)
        assert s["jpg"].shape == (512, 512, 3)
        assert np.abs(s["jpg"].astype(float) - train_crop(img, face.kps)).mean() < 3   # JPEG q95
        assert meta["box"] == pytest.approx(face.box.tolist(), abs=0.01) and meta["det_score"] > 0.5
    assert sorted(str(p) for p in good) == sorted(s["json"]["source"] for s in samples)

    # A second run is a no-op: nothing opened, nothing rewritten.
    before = _tree(data)
    rep2 = prepare([tmp_path / "photos"], data, factory, shard_size=3)
    assert len(calls) == 1 and rep2.shards_done_before == 3 and rep2.written == 5
    assert _tree(data) == before

    # An interrupted run (shard 1 never committed) redoes only that shard.
    (data / "shard-00001.stats.json").unlink()
    rep3 = prepare([tmp_path / "photos"], data, factory, shard_size=3)
    assert len(calls) == 2 and rep3.shards_done_before == 2 and rep3.written == 5
    after = _tree(data)
    assert after["shard-00000.tar"] == before["shard-00000.tar"]
    assert after["shard-00001.tar"][1] == before["shard-00001.tar"][1]


def test_prepare_refuses_other_inputs(tmp_path):
    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.prepare import prepare

    paths = astronaut_variants(tmp_path / "photos", n=2)
    prepare([paths[0]], tmp_path / "data", _analyzer, shard_size=2)
    with pytest.raises(InvalidInputError, match=f"another list of photos \\(1 then, 2 now: '{paths[1]}' is new\\)"):
        prepare(paths, tmp_path / "data", _analyzer, shard_size=2)
    with pytest.raises(InvalidInputError, match=f"\\(1 then, 1 now: '{paths[0]}' is gone\\)"):
        prepare([paths[1]], tmp_path / "data", _analyzer, shard_size=2)
    with pytest.raises(InvalidInputError, match="--shard-size 2"):
        prepare([paths[0]], tmp_path / "data", _analyzer, shard_size=3)


def test_prepare_resumes_when_the_walk_adds_only_entries_that_are_no_photos(tmp_path):
    """A folder prepared by an older version, whose walk left out a symbolic link to a folder (this walk
    reports it as skipped): the same --images continue with the pinned list; a new photo is refused."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.prepare import PLAN_FILE, prepare

    photos = tmp_path / "photos"
    paths = astronaut_variants(photos, n=2)
    (tmp_path / "other").mkdir()
    paths[1].rename(tmp_path / "other" / paths[1].name)
    data = tmp_path / "data"
    prepare([photos], data, _analyzer, shard_size=2)
    pinned = (data / PLAN_FILE).read_bytes()
    (photos / "shared").symlink_to(tmp_path / "other")      # as if the older walk had not listed it
    said = []
    rep = prepare([photos], data, _analyzer, shard_size=2, say=said.append)
    assert rep.photos == 1 and rep.shards_done_before == 1 and (data / PLAN_FILE).read_bytes() == pinned
    assert any(f"'{photos / 'shared'}' is a symbolic link to a folder" in m for m in said), said
    (tmp_path / "other" / paths[1].name).rename(photos / "new.jpg")
    with pytest.raises(InvalidInputError, match="another list of photos .*new.jpg' is new"):
        prepare([photos], data, _analyzer, shard_size=2)


@pytest.mark.parametrize("name", ["shard-00000.tar", "shard-00000.stats.json", "skipped.txt", "keep.txt"])
def test_prepare_never_replaces_files_it_did_not_write(tmp_path, name):
    """An --out holding files of prepare's names but no prepare.json (another tool's, a user's): they
    were replaced without a word; now refused, and nothing is touched. So is any other file (shards were
    written among a user's files, into a model or engines folder)."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.prepare import prepare

    paths = astronaut_variants(tmp_path / "photos", n=1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_text("mine")
    with pytest.raises(InvalidInputError, match=f"holds {name}, which prepare did not write"):
        prepare(paths, tmp_path / "data", _analyzer, shard_size=2)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [name] and (tmp_path / "data" / name).read_text() == "mine"


def test_a_damaged_plan_is_named(tmp_path):
    """prepare.json of valid JSON but not a plan ("files": 5) was a TypeError traceback."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.prepare import prepare

    paths = astronaut_variants(tmp_path / "photos", n=1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepare.json").write_text('{"shard_size": 2, "files": 5}')
    with pytest.raises(InvalidInputError, match=r"prepare.json: damaged \(not a plan of prepare's\)"):
        prepare(paths, tmp_path / "data", _analyzer, shard_size=2)


def test_deeply_nested_json_in_a_data_folder_is_refused_in_one_line(tmp_path):
    """json raises RecursionError on deep nesting, which fit's and prepare's `except ValueError` let
    through as a traceback; every reader now gets a ValueError (fileio.loads_json)."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.prepare import prepare
    from arc2face_ref.train.shards import index_shards

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepare.json").write_text(deep)
    with pytest.raises(InvalidInputError, match=r"prepare.json: damaged \(nested too deeply\)"):
        index_shards(tmp_path / "data")
    with pytest.raises(InvalidInputError, match=r"prepare.json: unreadable \(nested too deeply\)"):
        prepare(astronaut_variants(tmp_path / "photos", n=1), tmp_path / "data", _analyzer, shard_size=2)


def test_reader_matches_webdataset(tmp_path):
    """fit's random-access reader gives the samples webdataset streams, in key order."""
    from arc2face_ref.train.shards import ShardDataset, index_shards, read_id
    from train_fixtures import prepared_data

    data = prepared_data(tmp_path, shard_size=3)
    refs = index_shards(data)
    streamed = list(wds.WebDataset(sorted(str(p) for p in data.glob("shard-*.tar")), shardshuffle=False)
                    .decode("rgb8"))
    assert [r.key for r in refs] == [s["__key__"] for s in streamed]
    ds = ShardDataset(refs, 512)
    for i, s in enumerate(streamed):
        img, emb = ds[i]
        np.testing.assert_array_equal(read_id(refs[i]), s["id.npy"])
        np.testing.assert_allclose(emb.numpy(), s["id.npy"])
        np.testing.assert_allclose((img.permute(1, 2, 0).numpy() + 1) * 127.5, s["jpg"], atol=1e-3)


def test_fit_reads_only_a_finished_prepare_with_every_shard_present(tmp_path):
    """A committed shard whose tar is gone, or a shard not committed yet: fit trained on the rest without
    a word (4 samples of 8); now one line names the file and how to redo it."""
    import shutil

    from arc2face_rt.errors import InvalidInputError
    from arc2face_ref.train.shards import index_shards
    from train_fixtures import prepared_data

    data = prepared_data(tmp_path / "d")
    assert len(index_shards(data)) == 8
    away = tmp_path / "away"
    away.mkdir()
    shutil.move(data / "shard-00001.tar", away)
    with pytest.raises(InvalidInputError, match=r"shard-00001.tar: missing, though shard-00001.stats.json records "
                                                r"4 sample\(s\); move shard-00001.stats.json away"):
        index_shards(data)
    shutil.move(data / "shard-00001.stats.json", away)
    with pytest.raises(InvalidInputError, match=r"prepare has committed 1 of its 2 shard\(s\) \(no "
                                                r"shard-00001.stats.json\); run the same .* again to finish it"):
        index_shards(data)
    for p in away.iterdir():
        shutil.move(p, data)
    assert len(index_shards(data)) == 8


def test_training_crop_is_ffhq_framing():
    from arc2face_rt.face.align import umeyama
    from arc2face_ref.train.crop import train_crop, train_template

    tpl = train_template(512)
    eye, mouth = (tpl[0] + tpl[1]) / 2, (tpl[3] + tpl[4]) / 2
    np.testing.assert_allclose(eye + 0.1 * (mouth - eye), [256, 256], atol=1e-9)      # FFHQ centre
    side = 2 * max(2.0 * np.linalg.norm(tpl[1] - tpl[0]), 1.8 * np.linalg.norm(mouth - eye))
    assert side == pytest.approx(512)
    img = astronaut()
    np.testing.assert_array_equal(train_crop(img, tpl), img)        # keypoints already in place: identity
    half = train_crop(img[::2, ::2].copy(), tpl / 2)                # same face at half size: same framing
    assert np.abs(half.astype(float) - img).mean() < 12
    assert np.allclose(umeyama(tpl, tpl), np.eye(3), atol=1e-9)


def test_cli_prepare(tmp_path, capsys):
    from arc2face_ref.train.cli import main

    _photos(tmp_path)
    rc = main(["prepare", "--images", str(tmp_path / "photos"), "--models", str(tiny_models_dir()),
               "--out", str(tmp_path / "data"), "--shard-size", "4", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    # the random detector "finds" a face on the grey wall too: only the corrupt file is skipped here
    assert rc == 0 and "6 sample(s) in 2 shard(s)" in err and "1 photo(s) skipped" in err
    assert json.loads((tmp_path / "data" / "shard-00001.stats.json").read_text())["photos"] == 3
    rc = main(["fit", "--model-dir", str(tmp_path / "nope"), "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "arc2face-train: error:" in err[0] and "no such model folder" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["images", "models"])
def test_cli_prepare_refused_writes_nothing(tmp_path, capsys, bad):
    """A refused prepare (no such photos, no face models) is one line and leaves --out as it was (absent);
    no progress bar is drawn before the error."""
    from arc2face_ref.train.cli import main

    _photos(tmp_path)
    images = tmp_path / ("nope" if bad == "images" else "photos")
    models = tmp_path / "no-models" if bad == "models" else tiny_models_dir()
    rc = main(["prepare", "--images", str(images), "--models", str(models), "--out", str(tmp_path / "data"),
               "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("arc2face-train: error:"), err
    assert not (tmp_path / "data").exists()


def test_prepare_continues_only_with_the_settings_it_started_with(tmp_path):
    """prepare.json pins what decides a sample besides its photo (the face models' sha256, --min-score,
    --min-size, the image limits): an interrupted run continued with another ArcFace or --min-size was
    accepted, and its shards mixed two identity spaces or two filters."""
    from arc2face_ref.train.prepare import prepare
    from arc2face_rt.errors import InvalidInputError
    paths, data = astronaut_variants(tmp_path / "photos", n=2), tmp_path / "data"
    prepare(paths, data, _analyzer, shard_size=1)
    settings = json.loads((data / "prepare.json").read_text())["settings"]
    assert set(settings["face_models"]) == {"recognizer"} and settings["min_size"] == 0.0    # the wrapped detector: no file
    for name in ("shard-00001.tar", "shard-00001.stats.json"):      # as a run stopped before its last shard
        (data / name).unlink()
    before = _tree(data)
    with pytest.raises(InvalidInputError, match=r"other settings \(min_size: 0.0 then, 50.0 now\)"):
        prepare(paths, data, _bigger_faces, shard_size=1)
    assert _tree(data) == before
    rep = prepare(paths, data, _analyzer, shard_size=1)                 # the same settings continue
    assert rep.shards_done_before == 1 and (data / "shard-00001.tar").is_file()


def test_a_folder_without_a_sample_starts_again_with_other_settings(tmp_path):
    """Where no photo gave a sample yet, other settings are no mix: the run starts again with them."""
    from PIL import Image

    from arc2face_ref.train.prepare import prepare

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / "photos" / "wall.png")   # no face
    data, said = tmp_path / "data", []
    assert prepare([tmp_path / "photos"], data, _analyzer, shard_size=1).written == 0
    prepare([tmp_path / "photos"], data, _bigger_faces, shard_size=1, say=said.append)
    assert any("holds no sample yet: starting again with these settings" in m for m in said), said
    assert json.loads((data / "prepare.json").read_text())["settings"]["min_size"] == 50.0


def test_prepare_on_a_full_disk_as_it_starts_leaves_no_folder(tmp_path, monkeypatch):
    """It left the empty folders it made for --out when writing its plan failed."""
    import errno

    from arc2face_ref.train import prepare as prep

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    paths = astronaut_variants(tmp_path / "photos", n=1)
    monkeypatch.setattr(prep, "atomic_write", full)
    with pytest.raises(OSError):
        prep.prepare(paths, tmp_path / "new" / "data", _analyzer, shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two runs into one new --out both ended well, the second's plan and shards written over the first's
    (or mixed with them): the folder is locked while a run reads and writes it."""
    import threading

    from arc2face_ref.train.prepare import prepare
    from arc2face_rt.errors import OutputExistsError

    mine, other = astronaut_variants(tmp_path / "mine", n=2), astronaut_variants(tmp_path / "other", n=1)
    data, opening, go, first = tmp_path / "new" / "data", threading.Event(), threading.Event(), {}

    def slow_models():                     # the first run holds the folder while its face models open
        opening.set()
        go.wait(60)
        return _analyzer()
    run = threading.Thread(target=lambda: first.update(report=prepare(mine, data, slow_models, shard_size=1)))
    run.start()
    try:
        assert opening.wait(60)
        with pytest.raises(OutputExistsError, match="another arc2face-train prepare is writing this folder"):
            prepare(other, data, _analyzer, shard_size=1)
    finally:
        go.set()
        run.join(120)
    assert first["report"].written == 2
    sources = []
    for shard in sorted(data.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            sources += [json.load(tar.extractfile(m))["source"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(sources) == 2 and all(s.startswith(str(tmp_path / "mine")) for s in sources), sources
