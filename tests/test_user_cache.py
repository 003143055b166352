"""The per-user cache: an OpenVINO entry superseded by a re-export is deleted, and `arc2face-rt cache`
lists, prunes and clears entries (OpenVINO blobs and verification stamps) without touching the rest."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from arc2face_rt import user_cache
from arc2face_rt.backends.ov_cache import RECORD, CompileCache, choose_cache_dir
from arc2face_rt.cli import main as rt_main
from arc2face_rt.integrity import verify_records
from arc2face_rt.manifest import sha256_file

CPU = {"model": "test CPU", "flags": [], "capabilities": []}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("ARC2FACE_OV_CACHE", raising=False)
    return tmp_path / "user"


def _entry(key: str, source, blob_bytes: int = 1000) -> CompileCache:
    c = CompileCache(choose_cache_dir(key), "2026.4", CPU, source=source)
    c.prepare("step_cfg", "fp32", "f32", "sha-" + key)
    (c.folder / f"{key}.blob").write_bytes(b"\0" * blob_bytes)
    return c


def _set_used(entry: CompileCache, days_ago: float) -> None:
    rec = json.loads((entry.folder / RECORD).read_text())
    rec["used"] = time.time() - days_ago * 86400
    (entry.folder / RECORD).write_text(json.dumps(rec))


def test_reexported_folder_releases_its_old_entry(cache, tmp_path):
    """An engines folder re-exported (new engines id) releases the entry of its old graphs: deleted when
    idle for an hour (at the next open of another entry), or by `cache prune` at once; an entry another
    folder still uses only loses the re-exported folder."""
    a, b = tmp_path / "engines-a", tmp_path / "engines-b"
    a.mkdir(), b.mkdir()
    old = _entry("old0000000000000", a)
    rec = json.loads((old.folder / RECORD).read_text())
    assert rec["folders"] == [str(a.resolve())] and time.time() - rec["used"] < 600
    shared = _entry("shared0000000000", b)
    assert "released" not in json.loads((old.folder / RECORD).read_text())    # another folder: nothing released
    CompileCache(shared.folder, "2026.4", CPU, source=a)             # folder a re-exported to b's graphs
    rec = json.loads((old.folder / RECORD).read_text())
    assert rec["folders"] == [] and "released" in rec                # used a minute ago: kept for now
    assert json.loads((shared.folder / RECORD).read_text())["folders"] == [str(b.resolve()), str(a.resolve())]
    assert [e.stale(30, time.time()) for e in user_cache.scan() if e.path == old.folder] == [
        "its engines folder was re-exported"]
    _set_used(old, 2 / 24)                                           # idle for two hours
    new = _entry("new0000000000000", a)                              # folder a re-exported again
    assert not old.folder.exists()                                   # the idle released entry went
    assert json.loads((shared.folder / RECORD).read_text())["folders"] == [str(b.resolve())]
    assert (shared.folder / "shared0000000000.blob").exists()        # folder b still uses it
    assert json.loads((new.folder / RECORD).read_text())["folders"] == [str(a.resolve())]
    faces = _entry("face-models", None)                              # no engines folder: never released
    _entry("newer00000000000", a)
    assert faces.folder.exists() and "released" in json.loads((new.folder / RECORD).read_text())


def test_two_processes_using_one_entry_keep_each_others_folders(cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first = CompileCache(choose_cache_dir("abc0000000000000"), "2026.4", CPU, source=a)
    second = CompileCache(first.folder, "2026.4", CPU, source=b)     # opened while the first still runs
    first.prepare("step_cfg", "fp32", "f32", "sha")                  # the first writes its stale copy
    rec = json.loads((first.folder / RECORD).read_text())
    assert rec["folders"] == [str(a.resolve()), str(b.resolve())] and "step_cfg:f32" in rec["compiled"]
    second.prepare("step", "fp32", "f32", "sha")
    assert set(json.loads((first.folder / RECORD).read_text())["compiled"]) == {"step_cfg:f32", "step:f32"}


def test_stamps_name_their_folder(cache, tmp_path):
    eng = tmp_path / "eng"
    eng.mkdir()
    (eng / "g.onnx").write_bytes(b"graph")
    verify_records(eng, {"g.onnx": {"sha256": sha256_file(eng / "g.onnx"), "bytes": 5}}, mode="stamp")
    [e] = user_cache.scan()
    assert e.kind == "stamps" and e.folders == [str(eng.resolve())] and e.detail == "1 file(s)"


def test_cache_command_lists_prunes_and_clears(cache, tmp_path, capsys):
    live, idle, gone = tmp_path / "live", tmp_path / "idle", tmp_path / "gone"
    live.mkdir(), idle.mkdir(), gone.mkdir()
    recent = _entry("recent0000000000", live, 3 << 20)
    old = _entry("old0000000000000", idle)
    _set_used(old, 45)
    orphan = _entry("orphan0000000000", gone)
    for eng in (live, gone):
        (eng / "g.onnx").write_bytes(b"graph")
        verify_records(eng, {"g.onnx": {"sha256": sha256_file(eng / "g.onnx"), "bytes": 5}}, mode="stamp")
    gone_stamp = next(e.path for e in user_cache.scan() if e.kind == "stamps" and e.folders == [str(gone.resolve())])
    (gone / "g.onnx").unlink(), gone.rmdir()

    assert rt_main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "recent0000000000" in out and "3.0 MiB" in out and f"{gone.resolve()} (gone)" in out
    assert out.strip().endswith("5 entries, 3.0 MiB")

    assert rt_main(["cache", "prune", "--dry-run"]) == 0
    assert "3 of 5 entries, would free" in capsys.readouterr().out
    assert old.folder.exists() and orphan.folder.exists() and gone_stamp.exists()

    assert rt_main(["cache", "prune"]) == 0
    err = capsys.readouterr().err
    assert "not used for 45 days" in err and "its engines folder is gone" in err
    assert recent.folder.exists() and not old.folder.exists() and not orphan.folder.exists()
    assert not gone_stamp.exists() and len(list((cache / "verified").glob("*.json"))) == 1
    assert not [p for p in (cache / "openvino").iterdir() if p.name.startswith(".removing")]

    assert rt_main(["cache", "prune", "--older-than", "0"]) == 0      # everything is older than 0 days
    assert user_cache.scan() == []
    assert rt_main(["cache", "clear"]) == 0
    assert "0 of 0 entries" in capsys.readouterr().out


def test_cache_clear_keeps_other_files_and_reports_failures(cache, tmp_path, monkeypatch, capsys):
    e = _entry("abc0000000000000", tmp_path)
    other = cache / "openvino" / "notes.txt"
    other.write_text("not an entry")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path / "x.blob"))

    monkeypatch.setattr(user_cache, "remove_entry", refuse)
    assert rt_main(["cache", "clear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not delete 1 cache entry" in err[0] and "permission denied" in err[0]
    assert str(e.folder / "x.blob") in err[0]
    assert "delete them by hand" in err[0] and "choose" not in err[0]      # no write advice for a deletion
    assert e.folder.exists()
    monkeypatch.undo()
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(cache))
    assert rt_main(["cache", "clear"]) == 0
    assert not e.folder.exists() and other.read_text() == "not an entry"


def test_cache_off_lists_only_stamps(cache, monkeypatch, capsys):
    _entry("abc0000000000000", None)
    monkeypatch.setenv("ARC2FACE_OV_CACHE", "0")
    assert user_cache.scan() == []
    with pytest.raises(SystemExit) as e:                               # a bad number of days: one line, exit 2
        rt_main(["cache", "prune", "--older-than", "-1"])
    assert e.value.code == 2 and "--older-than: -1 is outside" in capsys.readouterr().err


def test_options_an_action_does_not_use_are_refused(cache, capsys):
    """`clear --older-than 30` (a prune meant) would delete every entry: refused, nothing deleted."""
    e = _entry("abc0000000000000", None)
    for argv, words in ((["clear", "--older-than", "30"], "--older-than is for `cache prune`"),
                        (["--older-than", "30"], "--older-than is for `cache prune`"),
                        (["list", "--dry-run"], "--dry-run is for `cache prune` and `cache clear`")):
        assert rt_main(["cache", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert e.folder.exists()


def test_a_cache_folder_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    """ARC2FACE_CACHE_DIR naming a file listed "0 entries", as if nothing were cached."""
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(tmp_path / "f"))
    assert rt_main(["cache", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ARC2FACE_CACHE_DIR={tmp_path / 'f'}: is a file, not a folder" in err[0], err
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ARC2FACE_OV_CACHE", str(tmp_path / "f"))      # the OpenVINO blobs' own root
    assert rt_main(["cache", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ARC2FACE_OV_CACHE={tmp_path / 'f'}: is a file, not a folder" in err[0], err
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", " ")                      # blank: unset, so the default folder
    monkeypatch.delenv("ARC2FACE_OV_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "arc2face-rt").write_text("x")
    assert rt_main(["cache", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the cache folder {tmp_path / 'arc2face-rt'}: is a file" in err[0], err


def test_cache_touches_only_its_own_entries(cache, tmp_path, monkeypatch, capsys):
    """ARC2FACE_OV_CACHE may name a folder other programs use: only folders with a record of ours (and
    the leftovers of our own removals) are listed or deleted; a link is never followed."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("ARC2FACE_OV_CACHE", str(shared))
    ours = _entry("abc0000000000000", None)
    (shared / "Documents").mkdir()
    (shared / "Documents" / "thesis.txt").write_text("keep me")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / RECORD).write_text((ours.folder / RECORD).read_text())      # looks like ours, behind a link
    (shared / "link").symlink_to(target)
    assert [e.path for e in user_cache.scan()] == [ours.folder]
    assert rt_main(["cache", "clear"]) == 0
    assert not ours.folder.exists()
    assert (shared / "Documents" / "thesis.txt").read_text() == "keep me" and (target / RECORD).exists()
    assert (shared / "link").is_symlink()


def test_a_removal_that_fails_half_way_is_finished_by_the_next(cache, tmp_path, monkeypatch, capsys):
    import arc2face_rt.backends.ov_cache as ov_cache

    e = _entry("abc0000000000000", tmp_path)
    real = ov_cache.shutil.rmtree

    def fail(path, *a, **k):
        (Path(path) / RECORD).unlink()                    # part of it went, then a file refused
        raise PermissionError(1, "Operation not permitted", str(Path(path) / "abc0000000000000.blob"))

    monkeypatch.setattr(ov_cache.shutil, "rmtree", fail)
    assert rt_main(["cache", "clear"]) == 2
    left = [p for p in (cache / "openvino").iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".removing-abc0000000000000-")
    assert str(left[0] / "abc0000000000000.blob") in capsys.readouterr().err
    [entry] = user_cache.scan()                            # still listed, though its record is gone
    assert entry.leftover and entry.stale(30, time.time()) == "an earlier removal did not finish"
    monkeypatch.setattr(ov_cache.shutil, "rmtree", real)
    assert rt_main(["cache", "prune"]) == 0
    assert not list((cache / "openvino").iterdir()) and not e.folder.exists()


@pytest.mark.parametrize("field,value", [("used", float("nan")), ("used", float("inf")), ("used", 10**400),
                                         ("used", -1e18), ("used", "yesterday"), ("cpu", [1]), ("cpu", "x"),
                                         ("compiled", None), ("compiled", []), ("folders", "abc"),
                                         ("folders", {"a": 1}), ("openvino", 5)])
def test_damaged_records_are_made_anew_and_listed(cache, tmp_path, capsys, field, value):
    e = _entry("abc0000000000000", tmp_path)
    rec = json.loads((e.folder / RECORD).read_text())
    rec[field] = value
    (e.folder / RECORD).write_text(json.dumps(rec).replace("Infinity", "1e999"))   # a big number python reads as inf
    assert rt_main(["cache"]) == 0 and "1 entry" in capsys.readouterr().out
    assert rt_main(["cache", "prune", "--dry-run"]) == 0
    c = CompileCache(e.folder, "2026.4", CPU, source=tmp_path)                      # a run opens it
    c.prepare("step", "fp32", "f32", "sha")
    fixed = json.loads((e.folder / RECORD).read_text())
    assert isinstance(fixed["compiled"], dict) and isinstance(fixed["folders"], list)
    assert isinstance(fixed["cpu"], dict) and 0 < fixed["used"] <= time.time()
    if field in ("used",):
        assert (e.folder / "abc0000000000000.blob").exists()          # only the time was odd: blobs kept
    else:
        assert not (e.folder / "abc0000000000000.blob").exists()      # a damaged record: compiled again


@pytest.mark.parametrize("text", ['{"files": 5}', '{"files": true}', '{"files": {"/a/b": 1, "c/d": 2}}', "{{",
                                  '[1, 2]'])
def test_odd_stamp_files_are_listed_and_cleared(cache, text, capsys):
    (cache / "verified").mkdir(parents=True)
    odd = cache / "verified" / ("0" * 24 + ".json")
    odd.write_text(text)
    other = cache / "verified" / "notes.json"
    other.write_text("{}")
    assert rt_main(["cache"]) == 0 and "1 entry" in capsys.readouterr().out
    assert rt_main(["cache", "clear"]) == 0
    assert not odd.exists() and other.exists()


def test_the_per_user_root_lists_blob_folders_without_a_record(cache, capsys):
    """Only arc2face-rt writes the per-user root, so a folder there whose record was never written (a
    failed write, or OpenVINO re-creating a folder `clear` removed under a running process) is listed
    and cleared too."""
    stray = cache / "openvino" / "0123456789abcdef"
    stray.mkdir(parents=True)
    (stray / "1.blob").write_bytes(b"\0" * 10)
    [e] = user_cache.scan()
    assert e.path == stray and e.detail.startswith("no record")
    assert rt_main(["cache", "clear"]) == 0 and not stray.exists()


def test_folders_not_named_as_ours_are_never_entries(cache, tmp_path, monkeypatch, capsys):
    """ARC2FACE_CACHE_DIR may name a folder whose openvino/ is someone else's (a checkout): only folders
    with our record, or with the names we give entries, count; in a shared ARC2FACE_OV_CACHE a
    `.removing-NAME-PID` folder is ours only when NAME is one of ours."""
    import os

    src = cache / "openvino" / "src"
    src.mkdir(parents=True)
    (src / "main.cpp").write_text("keep me")
    shared = tmp_path / "shared"
    (shared / ".removing-photos-2024").mkdir(parents=True)
    assert user_cache.scan() == []
    assert rt_main(["cache", "clear"]) == 0 and (src / "main.cpp").exists()
    monkeypatch.setenv("ARC2FACE_OV_CACHE", str(shared))
    assert user_cache.scan() == []
    assert rt_main(["cache", "prune"]) == 0 and (shared / ".removing-photos-2024").is_dir()
    fifo = cache / "openvino" / "0123456789abcdef"                    # a FIFO as a record: not read, no hang
    monkeypatch.delenv("ARC2FACE_OV_CACHE")
    fifo.mkdir()
    os.mkfifo(fifo / RECORD)
    [e] = user_cache.scan()
    assert e.path == fifo and e.detail.startswith("no record")


def test_blank_folder_variables_mean_unset(tmp_path, monkeypatch):
    """`ARC2FACE_CACHE_DIR=" "` made a folder named " " in the working directory, and
    `ARC2FACE_MODELS=" "` looked for the face models there: blank is unset, as empty is."""
    from arc2face_rt.backends.ov_cache import cache_root, root_is_ours
    from arc2face_rt.errors import MissingWeightsError
    from arc2face_rt.face.models import resolve_model
    from arc2face_rt.integrity import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name in ("ARC2FACE_CACHE_DIR", "ARC2FACE_OV_CACHE", "ARC2FACE_MODELS"):
        monkeypatch.setenv(name, "  ")
    assert cache_dir() == tmp_path / "xdg" / "arc2face-rt"
    assert cache_root() == tmp_path / "xdg" / "arc2face-rt" / "openvino" and root_is_ours()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match=r"^models: no "):
        resolve_model("detector", None, None)
