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

import numpy as np
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
    old = time.time() - 3600
    os.utime(other_host, (old, old))
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
    deadline = time.monotonic() + 600                   # as the other runs: CI shares two cores
    while time.monotonic() < deadline and not (out.is_dir() and any(q.suffix == ".png" for q in out.iterdir())):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    p.stderr.close()
    assert any(q.suffix == ".png" for q in out.iterdir())
    from arc2face_rt.images import read_params
    assert read_params(out / "arc2face_3_0000.png")["index"] == 0


@pytest.mark.parametrize("tool", ["arc2face_rt.entry", "arc2face_export.entry"])
def test_ctrl_c_while_still_importing(tool, tiny_engines, tmp_path):
    """Ctrl-C in the first moments (numpy, ONNX Runtime or torch still loading): one line, exit 130."""
    # `ready` as main() starts importing the CLI: a signal before main() has installed its handler
    # (Python's own start-up, the console script's first lines) is Python's, a traceback. (Printed
    # before main() was called, CI once saw the signal land in that window.)
    cli = tool.replace(".entry", ".cli")
    code = ("import sys\n"
            "class Ready:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {cli!r}:\n"
            "            print('ready', flush=True)\n"
            "sys.meta_path.insert(0, Ready())\n"
            f"from {tool} import main\n"
            "sys.exit(main())\n")
    args = (_generate_args(tiny_engines, tmp_path / "never") if tool == "arc2face_rt.entry"
            else ["random-checkpoint", "--out", str(tmp_path / "never")])
    for delay in (0.0, 0.05, 0.3):
        p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "ready\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].endswith("interrupted"), err
    assert not (tmp_path / "never").exists()


def test_a_ctrl_c_as_the_import_handler_is_put_back_is_one_line(monkeypatch, capsys):
    """A Ctrl-C landing as `interruptible` puts Python's handler back (the import just finished)
    raises there: still one line and exit 130, not a traceback."""
    from arc2face_rt import entry

    real_signal, calls = signal.signal, []

    def put_back_then_interrupted(sig, handler):
        calls.append(handler)
        previous = real_signal(sig, handler)
        if len(calls) == 2:                      # the second call restores the previous handler
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(entry.signal, "signal", put_back_then_interrupted)
    assert entry.interruptible("tool", lambda: (lambda: 0)) == 130
    assert capsys.readouterr().err == "tool: interrupted\n" and len(calls) == 2


@pytest.mark.parametrize("after", ["check", "error", "return"])
def test_a_ctrl_c_a_library_swallowed_still_stops_the_command(after, capsys):
    """Ctrl-C that lands in library code which catches it (a C extension's import, a bare except) still
    ends the command with one line and exit 130: at the next check, or whatever the command does next."""
    import os

    from arc2face_rt.exits import check_interrupt, run_cli

    reached = []

    def command():
        try:
            os.kill(os.getpid(), signal.SIGINT)          # the handler runs at the next bytecode
            time.sleep(0.1)
        except BaseException:                            # noqa: BLE001 - what such a library does
            if after == "error":
                raise ImportError("initialization failed")  # noqa: B904
        if after == "check":
            check_interrupt()
        reached.append(after)
        return 0

    assert run_cli(command, "tool") == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    assert reached == ([] if after in ("check", "error") else ["return"])
    assert run_cli(lambda: 0, "tool") == 0                # the next command starts afresh


def test_a_ctrl_c_inside_an_import_lands_after_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C while a module is being imported (torch's initialisation runs Python from C++, where an
    exception aborts the process) is raised once the import is over: the module finishes, the command
    stops there with one line and exit 130, and no timer outlives the command."""
    from arc2face_rt.exits import run_cli

    (tmp_path / "slow_extension_init.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\nfinished = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_extension_init", raising=False)
    reached = []

    def command():
        import slow_extension_init  # noqa: F401
        time.sleep(10)                                   # the stop lands here, right after the import
        reached.append("went on")
        return 0

    try:
        assert run_cli(command, "tool") == 130
        assert sys.modules["slow_extension_init"].finished       # the import ran to its end
    finally:
        sys.modules.pop("slow_extension_init", None)
    assert reached == [] and capsys.readouterr().err == "tool: interrupted\n"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_a_deferred_stop_raised_at_a_check_is_not_raised_again_in_its_cleanup(tmp_path, monkeypatch):
    """A stop deferred inside an import and then raised by check_interrupt cancels its timer: the
    cleanup that handles it (removing a temporary folder, logging the --resume line) runs to its end."""
    from arc2face_rt.exits import check_interrupt, run_cli

    (tmp_path / "slow_extension_init2.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cleaned = []

    def command():
        try:
            import slow_extension_init2  # noqa: F401
            check_interrupt()                                # a loop's check, right after the import
        except KeyboardInterrupt:
            t = time.time()
            while time.time() - t < 0.2:                     # ten timer periods
                pass
            cleaned.append(True)
            raise
        return 0

    try:
        assert run_cli(command, "tool") == 130
    finally:
        sys.modules.pop("slow_extension_init2", None)
    assert cleaned == [True]


def test_a_signal_the_process_ignores_stays_ignored(capsys):
    """`nohup` and `cmd &` in a script start a command with SIGINT/SIGHUP ignored: run_cli keeps it so."""
    import os

    from arc2face_rt.exits import run_cli

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def command():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            return 0

        assert run_cli(command, "tool") == 0 and capsys.readouterr().err == ""
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_stop_says_how_this_command_finishes(tmp_path):
    """A caller without --resume (the demo) gives its own advice; generate's stop line advises --resume
    once an image is kept (test_full_disk_keeps_finished_images), running the command again before."""
    from arc2face_rt.folder_run import FolderRun
    from arc2face_rt.pipeline import GenerationOptions

    class Pipe:
        def generate(self, *a, **k):
            raise KeyboardInterrupt

    for again, want in ((None, "none is kept; run the same command again"), ("run the demo again", None)):
        run = FolderRun(out=tmp_path / "out", count=2, again=again)
        lines = []
        with pytest.raises(KeyboardInterrupt):
            run.write(Pipe(), np.zeros(512, np.float32), GenerationOptions(steps=1), run.check(0), log=lines.append)
        assert lines[-1].endswith(want or again) and "--resume" not in lines[-1]
