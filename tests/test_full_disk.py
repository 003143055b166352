"""A full disk before anything is finished: the command ends in one line (exit 2) and leaves no folder
it made, and says that nothing is kept rather than pointing at a folder it removed."""
from __future__ import annotations

import errno
import os

from arc2face_rt.cli import main as rt_main


def _full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    from arc2face_rt import atomic

    (tmp_path / "there").mkdir()
    monkeypatch.setattr(atomic.os, "fsync", _full)
    try:
        atomic.atomic_write(tmp_path / "there" / "a" / "b" / "x.npy", b"data")
    except OSError as e:
        assert e.errno == errno.ENOSPC and str(tmp_path / "there" / "a" / "b" / "x.npy") in str(e)
    else:
        raise AssertionError("the write did not fail")
    assert os.listdir(tmp_path / "there") == []                 # a/ and a/b/ removed, there/ kept
    monkeypatch.undo()
    atomic.atomic_write(tmp_path / "there" / "a" / "x.npy", b"data")
    assert (tmp_path / "there" / "a" / "x.npy").read_bytes() == b"data"


def test_generate_on_a_full_disk_before_its_first_image_keeps_nothing_and_says_so(tiny_engines, tmp_path,
                                                                                    monkeypatch, capsys):
    import arc2face_rt.folder_run as folder_run

    monkeypatch.setattr(folder_run, "save_png", _full)
    out = tmp_path / "new" / "out"
    args = ["generate", "--engines", str(tiny_engines), "--random-id", "--seed", "3", "-n", "2", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    assert rt_main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("arc2face-rt: error:") and "no space left" in last, last
    assert last.endswith("before the first of 2 image(s) was finished; none is kept: run the same command again")
    assert os.listdir(tmp_path) == []


def test_a_library_error_on_a_full_disk_names_the_full_disk(tmp_path, monkeypatch):
    """torch.save on a full disk says "[enforce fail at inline_container.cc:672] . unexpected pos 2816 vs
    2710", OpenVINO "basic_ios::clear: iostream error": with under 1 MiB free the line says the disk is
    full; with room left, the library's words stand alone (the cause is something else)."""
    from collections import namedtuple

    import pytest

    from arc2face_rt import atomic
    from arc2face_rt.errors import OutputWriteError

    torch_said = "[enforce fail at inline_container.cc:672] . unexpected pos 2816 vs 2710"
    for free, start in ((4096, f"(no space left on device; the library said: {torch_said})"),
                        (1 << 30, f"({torch_said})")):
        usage = namedtuple("usage", "total used free")(1 << 31, 0, free)
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p, usage=usage: usage)
        with pytest.raises(OutputWriteError) as e:
            with atomic.naming_output(tmp_path / "run" / "x.bin", (RuntimeError,)):
                raise RuntimeError(torch_said)
        said = str(e.value)
        assert said.startswith(f"{tmp_path / 'run' / 'x.bin'}: could not be written {start}; free some"), said


def test_dataset_on_a_full_disk_as_it_starts_keeps_no_folder_and_no_dataset(tiny_engines, tmp_path, monkeypatch,
                                                                             capsys):
    """It left dataset.json in the folders it made, so the same command was then refused with "holds a
    dataset already; pass --resume" for a dataset that had no identities."""
    from dataset_runs import dataset_args

    import arc2face_rt.dataset.runner as runner

    monkeypatch.setattr(runner, "save_npy_atomic", _full)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "d", tmp_path / "empty"):
        assert rt_main(dataset_args(tiny_engines, out)) == 2
        assert "no space left" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_a_dataset_shard_on_a_full_disk_names_its_output(tmp_path, monkeypatch):
    """A write through a file object raises OSError without a file name: the line said only "no space
    left on the device", not where."""
    import builtins

    import pytest

    from arc2face_rt.dataset import writers
    from arc2face_rt.exits import user_error_message

    class _FullFile:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    tar = writers.TarShardWriter(tmp_path, 3)
    tar.file = _FullFile(tar.file)
    tar.tar.fileobj = tar.file
    with pytest.raises(OSError) as e:
        tar.add(0, 0, b"x" * 100_000, {})
    assert user_error_message(e.value).startswith(f"{tmp_path / 'shard-000003.tar'}: no space left")
    tar.abort()
    folder = writers.FolderShardWriter(tmp_path, 4)

    def full_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return _FullFile(f) if "w" in mode else f

    monkeypatch.setattr(writers, "open", full_open, raising=False)
    with pytest.raises(OSError) as e:
        folder.add(7, 2, b"png", {})
    assert user_error_message(e.value).startswith(f"{tmp_path / 'id_000007' / '0002.png'}: no space left")
    folder.abort()
