"""The per-user cache: an OpenVINO entry superseded by a re-export is deleted, and `arc2face-rt cache`
lists, prunes and clears entries (OpenVINO blobs and verification stamps) without touching the rest."""
from __future__ import annotations

import json
import time

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
    a, b = tmp_path / "engines-a", tmp_path / "engines-b"
    a.mkdir(), b.mkdir()
    old = _entry("old0000000000000", a)
    rec = json.loads((old.folder / RECORD).read_text())
    assert rec["folders"] == [str(a.resolve())] and time.time() - rec["used"] < 60
    shared = _entry("shared0000000000", b)
    assert old.folder.exists()                                       # another folder: nothing released
    CompileCache(shared.folder, "2026.4", CPU, source=a)             # folder a re-exported to b's graphs
    assert not old.folder.exists()                                   # only folder a used it: deleted
    assert json.loads((shared.folder / RECORD).read_text())["folders"] == [str(b.resolve()), str(a.resolve())]
    new = _entry("new0000000000000", a)                              # folder a re-exported again
    assert json.loads((shared.folder / RECORD).read_text())["folders"] == [str(b.resolve())]
    assert (shared.folder / "shared0000000000.blob").exists()        # folder b still uses it
    assert json.loads((new.folder / RECORD).read_text())["folders"] == [str(a.resolve())]
    faces = _entry("face-models", None)                              # no engines folder: never released
    _entry("newer00000000000", a)
    assert faces.folder.exists() and not new.folder.exists()


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
    other = cache / "notes.txt"
    other.write_text("not an entry")

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(user_cache, "remove_entry", refuse)
    assert rt_main(["cache", "clear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not delete 1 cache entry" in err[0] and "Permission denied" in err[0]
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
