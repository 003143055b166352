"""Interrupted runs lose nothing: SIGINT/SIGKILL at several moments of `generate -n 14`, then
`--resume`, gives the same folder as an uninterrupted run, byte for byte; a full disk stops cleanly
and keeps every finished image; abandoned temporary files are removed by the next run."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arc2face_rt.atomic import is_stale_temp, remove_stale_temps, temp_prefix
from arc2face_rt.cli import main as rt_main

RT = [sys.executable, "-c", "import sys; from arc2face_rt.cli import main; sys.exit(main())"]
N, STEPS, BATCH = 14, 2, 3


def _generate_args(engines: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--engines", str(engines), "--random-id", "--seed", "3", "-n", str(N), "--steps", str(STEPS),
            "--batch", str(BATCH), "--device", "cpu", "--out", str(out), *extra]


def _folder(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference_run(tiny_engines, tmp_path_factory):
    """The uninterrupted run everything is compared with."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = subprocess.run(RT + _generate_args(tiny_engines, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return _folder(out)


def _interrupt(engines: Path, out: Path, sig: int, after_images: int) -> int:
    """Start a run and send `sig` once `after_images` PNGs exist; return its exit code."""
    p = subprocess.Popen(RT + _generate_args(engines, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if after_images == 0 and out.is_dir() or \
                out.is_dir() and sum(1 for q in out.iterdir() if q.suffix == ".png") >= after_images:
            break
        time.sleep(0.005)
    p.send_signal(sig)
    p.wait(timeout=120)
    p.stderr.close()
    return p.returncode


@pytest.mark.parametrize("sig,after", [(signal.SIGINT, 0), (signal.SIGINT, 7), (signal.SIGTERM, 4),
                                       (signal.SIGKILL, 1), (signal.SIGKILL, 11)])
def test_interrupt_then_resume_equals_uninterrupted(tiny_engines, reference_run, tmp_path, sig, after):
    out = tmp_path / "out"
    rc = _interrupt(tiny_engines, out, sig, after)
    pngs = [p for p in out.iterdir() if p.suffix == ".png"] if out.is_dir() else []
    finished = len(pngs) == N           # a poll starved past the end: the signal met Python's exit path
    assert rc in {signal.SIGINT: (130, 0), signal.SIGTERM: (143, 0), signal.SIGKILL: (-signal.SIGKILL, 0)}[sig] \
        or finished and rc == -sig
    if sig != signal.SIGKILL:               # a clean stop leaves no temporary file, and no folder it made empty
        assert all(p.suffix == ".png" for p in out.iterdir()) if out.is_dir() else rc != 0
    for p in pngs:                          # whatever was finished is a whole image, never half of one
        assert p.read_bytes() == reference_run[p.name]
    r = subprocess.run(RT + _generate_args(tiny_engines, out, "--resume"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    if pngs and rc != 0:
        assert f"{len(pngs)} already there" in r.stderr, r.stderr
    assert _folder(out) == reference_run     # same names, same bytes, no temporary files left


def test_full_disk_keeps_finished_images(tiny_engines, tmp_path, monkeypatch, capsys):
    import arc2face_rt.folder_run as images

    real_save, calls = images.save_png, []

    def save_until_full(path, image, params, overwrite=False):
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        calls.append(path)
        return real_save(path, image, params, overwrite=overwrite)

    monkeypatch.setattr(images, "save_png", save_until_full)
    out = tmp_path / "out"
    assert rt_main(_generate_args(tiny_engines, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("arc2face-rt: error:") and "no space left" in last and f"3 of {N}" in last
    assert "--resume" in last
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in calls)

    monkeypatch.setattr(images, "save_png", real_save)
    assert rt_main(_generate_args(tiny_engines, out, "--resume")) == 0
    assert len(list(out.iterdir())) == N


def test_resume_never_replaces_what_it_did_not_write(tiny_engines, reference_run, tmp_path, capsys):
    """A file at one of the run's names that is not a finished image of this run is somebody else's:
    --resume refuses before any work (ours are written whole or not at all)."""
    for name, content in (("cut-short", reference_run["arc2face_3_0004.png"][:500]),
                          ("notes", b"my notes, not an image"),
                          ("other-params", reference_run["arc2face_3_0000.png"])):
        out = tmp_path / name
        out.mkdir()
        (out / "arc2face_3_0004.png").write_bytes(content)
        args = _generate_args(tiny_engines, out, "--resume")
        if name == "other-params":
            args[args.index("--steps") + 1] = "3"
        assert rt_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "arc2face_3_0004.png" in err and ("not an image this run wrote" in err or
                                                 "other parameters" in err), err
        assert _folder(out) == {"arc2face_3_0004.png": content}


def test_a_concurrent_writer_of_the_same_image_is_not_an_error(tiny_engines, reference_run, tmp_path, monkeypatch):
    """Two runs writing the same images into one folder: what the other wrote meanwhile counts as done."""
    import arc2face_rt.folder_run as folder_run

    out = tmp_path / "out"
    real_save = folder_run.save_png

    def racing_save(path, image, params, overwrite=False):
        if path.name == "arc2face_3_0005.png":        # the other run gets there first
            (path.parent / path.name).write_bytes(reference_run[path.name])
        return real_save(path, image, params, overwrite=overwrite)

    monkeypatch.setattr(folder_run, "save_png", racing_save)
    assert rt_main(_generate_args(tiny_engines, out)) == 0
    assert _folder(out) == reference_run


def test_stale_temporary_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / (temp_prefix("a.png") + "x1.tmp")
    theirs = tmp_path / (temp_prefix("b.png").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "x2.tmp")
    other_host = tmp_path / ".c.png.arc2face-elsewhere-123-x3.tmp"
    foreign = tmp_path / ".d.png.tmp"                       # not ours: never touched
    for p in (mine, theirs, other_host, foreign):
        p.write_bytes(b"x")
    hour_ago, two_days_ago = time.time() - 3600, time.time() - 2 * 86400
    os.utime(other_host, (hour_ago, hour_ago))
    assert not is_stale_temp(other_host)        # a live shard of another host may sit unchanged that long
    os.utime(other_host, (two_days_ago, two_days_ago))
    assert not is_stale_temp(mine) and is_stale_temp(theirs) and is_stale_temp(other_host)
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, foreign.name])


@pytest.mark.parametrize("where", ["mkstemp returns", "cleanup starts"])
def test_a_stop_inside_a_write_leaves_no_temporary_file(tmp_path, monkeypatch, where):
    """SIGTERM landing the moment mkstemp has made the temporary file (before its name is bound), or
    as the cleanup starts, is raised once the write is over: the output is whole, no temporary file is
    left. (CI once found one after `generate` was stopped by SIGTERM.)"""
    import tempfile

    from arc2face_rt import atomic, exits

    monkeypatch.setattr(exits, "_seen", [])
    if where == "mkstemp returns":
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*a, **k):
            made = real_mkstemp(*a, **k)
            exits._on_signal(signal.SIGTERM, None)
            return made
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        real_unlink = Path.unlink

        def unlink(self, *a, **k):
            exits._on_signal(signal.SIGTERM, None)
            return real_unlink(self, *a, **k)
        monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(exits.Terminated):
        atomic.atomic_write(tmp_path / "a.png", b"image")
    monkeypatch.undo()
    assert _folder(tmp_path) == {"a.png": b"image"}


def test_a_write_in_the_cleanup_of_a_stop_is_not_stopped_again(tmp_path, monkeypatch):
    """A cleanup that handles a stop (saving verification stamps, a runtime cache) writes to its end:
    only a stop that arrives during the write is raised after it."""
    from arc2face_rt import atomic, exits

    monkeypatch.setattr(exits, "_seen", [signal.SIGTERM])        # the stop being handled
    atomic.atomic_write(tmp_path / "stamps.json", b"{}")
    assert _folder(tmp_path) == {"stamps.json": b"{}"}


def test_a_block_held_in_another_thread_leaves_the_main_threads_stop_alone(monkeypatch):
    """Signals reach the main thread only: a write in another thread must not hold the main thread's
    stop, nor raise it in its own thread when its block ends."""
    import threading

    from arc2face_rt import exits

    monkeypatch.setattr(exits, "_seen", [])
    inside, release, raised = threading.Event(), threading.Event(), []

    def worker():
        try:
            with exits.holding_stops():
                inside.set()
                release.wait(10)
        except BaseException as e:                    # whatever leaked out of the block
            raised.append(e)
    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    try:
        with pytest.raises(exits.Terminated):
            exits._on_signal(signal.SIGTERM, None)
    finally:
        release.set()
        t.join(10)
    assert raised == []


def test_huge_n_costs_nothing_up_front(tiny_engines, tmp_path):
    """-n 10**9 starts generating at once (no list of names is built); the first images appear."""
    out = tmp_path / "out"
    args = _generate_args(tiny_engines, out)
    args[args.index("-n") + 1] = str(10**9)
    p = subprocess.Popen(RT + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600                   # as the other runs: CI shares two cores
        while time.monotonic() < deadline and not (out.is_dir() and any(q.suffix == ".png" for q in out.iterdir())):
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=120) == 130
    finally:
        p.kill()                                            # a failed test leaves no endless run behind
        p.wait()
        p.stderr.close()
    assert any(q.suffix == ".png" for q in out.iterdir())
    from arc2face_rt.images import read_params
    assert read_params(out / "arc2face_3_0000.png")["index"] == 0



def test_an_output_name_the_file_system_takes_has_a_temporary_name_too(tmp_path):
    """The temporary file's name holds the output's and about 64 bytes more: a legal 250-byte name used to
    fail as "file name too long", naming the temporary file, after the work was done."""
    from arc2face_rt.atomic import atomic_write, is_temp_name

    name = "a" + "€" * 70 + "n" * 35 + ".npy"              # 250 bytes; byte 120 is inside a character
    assert len(name.encode()) == 250 and is_temp_name(temp_prefix(name) + "x1.tmp")
    assert temp_prefix(name).startswith(".a" + "€" * 39 + ".")     # whole characters only: still UTF-8
    atomic_write(tmp_path / name, b"data")
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"data"


def test_new_folders_are_undone_when_making_them_fails(tmp_path):
    """A parent made before mkdir failed deeper down (a name over NAME_MAX) was left behind."""
    from arc2face_rt.atomic import undo_new_folders

    with pytest.raises(OSError):
        with undo_new_folders(tmp_path / "a" / "b" / ("y" * 300)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_folder_where_a_file_is_overwritten_is_named(tmp_path):
    """os.replace onto a folder failed naming the temporary file (summary.json made a folder, say)."""
    from arc2face_rt.atomic import atomic_write
    from arc2face_rt.errors import OutputExistsError

    (tmp_path / "summary.json").mkdir()
    with pytest.raises(OutputExistsError, match=r"summary.json: is a folder where this file goes; move it away"):
        atomic_write(tmp_path / "summary.json", b"{}", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_run_refused_by_the_lock_never_removes_the_folder_another_run_made(tmp_path, monkeypatch):
    """The folders a run 'made' were those missing when it looked: another run that made --out just after
    (and locked it) had it removed when the first was refused, and went on writing into a new, unlocked
    folder. Only folders this process's own mkdir made count, and a refused run removes none."""
    import contextlib

    from arc2face_rt import atomic
    from arc2face_rt.errors import OutputExistsError

    out, other_run, real = tmp_path / "new" / "data", contextlib.ExitStack(), atomic.missing_folders

    def another_run_makes_it_meanwhile(path):
        found = real(path)
        out.mkdir(parents=True)
        other_run.enter_context(atomic.locked(out, "other run"))
        return found
    monkeypatch.setattr(atomic, "missing_folders", another_run_makes_it_meanwhile)
    with other_run, pytest.raises(OutputExistsError, match="another x is writing"):
        with atomic.locked_folder(out, "x"):
            pass
    assert out.is_dir()
    monkeypatch.setattr(atomic, "missing_folders", real)
    with pytest.raises(RuntimeError):                    # a run that fails removes what it made, lock held
        with atomic.locked_folder(tmp_path / "mine" / "data", "x"):
            raise RuntimeError("failed before its first file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
