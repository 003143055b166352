"""Ctrl-C and other stops at awkward moments end in one line and the right exit code: while the CLI is
still importing (numpy, ONNX Runtime, torch), as `interruptible` installs or puts back its handler,
when a library swallowed the KeyboardInterrupt, inside an import, or inside the cleanup of a stop.
(Split from test_resume.py, which keeps the interrupted-and-resumed runs.)"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_resume import _generate_args

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


@pytest.mark.parametrize("library", ["turns it into an error", "swallows it"])
def test_a_ctrl_c_while_the_parser_is_built_stops_before_the_command(library, tmp_path):
    """Ctrl-C while arc2face-export builds its parser (build-engines' flags import numpy, Pillow and
    OpenCV), which the library being imported turns into an ImportError or swallows: one line, exit
    130, and the command never starts. (CI saw numpy's ImportError swallowed there, then torch fail
    to import the half-loaded numpy: a traceback.)"""
    handle = ("                raise ImportError('numpy failed to initialise') from None\n"
              if library == "turns it into an error" else "                pass\n")
    code = ("import os, signal, sys, time\n"
            "class Interrupting:\n"
            "    done = False\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy' and 'arc2face_export.build_cli' in sys.modules and not self.done:\n"
            "            self.done = True\n"
            "            print('interrupting', flush=True)\n"
            "            try:\n"
            "                os.kill(os.getpid(), signal.SIGINT)\n"
            "                time.sleep(0.5)\n"
            "            except KeyboardInterrupt:\n"
            + handle +
            "sys.meta_path.insert(0, Interrupting())\n"
            "from arc2face_export.entry import main\n"
            "sys.exit(main())\n")
    out = tmp_path / "never"
    p = subprocess.run([sys.executable, "-c", code, "random-checkpoint", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.stdout == "interrupting\n"
    assert (p.returncode, p.stderr) == (130, "arc2face-export: interrupted\n")
    assert not out.exists()


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
    monkeypatch.setattr(entry, "quiet_libraries", lambda: None)  # the worker's environment stays as it was
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


@pytest.mark.parametrize("at", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_while_run_cli_installs_its_handlers_stops_before_the_command(at, monkeypatch, capsys):
    """A Ctrl-C that lands between run_cli's handlers going in (after SIGINT's, after SIGTERM's) stops
    the command before it starts, in one line, and every handler is put back (for an API caller)."""
    from arc2face_rt import exits

    before = {sig: signal.getsignal(sig) for sig in exits.STOP_SIGNALS}
    real = signal.signal

    def install(sig, handler):
        previous = real(sig, handler)
        if sig is getattr(signal, at) and handler is exits._on_signal:
            signal.raise_signal(signal.SIGINT)        # Python runs the handler at the next bytecode
        return previous
    monkeypatch.setattr(signal, "signal", install)
    ran = []
    assert exits.run_cli(lambda: ran.append(1) or 0, "tool") == 130
    monkeypatch.undo()
    assert ran == [] and capsys.readouterr().err == "tool: interrupted\n"
    assert {sig: signal.getsignal(sig) for sig in exits.STOP_SIGNALS} == before
    assert exits.run_cli(lambda: 0, "tool") == 0          # the next command starts afresh


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
