"""The console scripts keep the libraries' start-up noise off the terminal (`entry.quiet_libraries`).

Where HOME cannot be written (a container, a service account), importing onnxruntime 1.31 printed a
colour-coded warning about its telemetry device id, and importing openvino printed three `root:` lines
from openvino_telemetry. A run of `arc2face-rt generate` there now prints only its own lines.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from arc2face_rt import entry
from arc2face_rt.backends.openvino import openvino_installed

RT_SCRIPT = [sys.executable, "-c", "import sys; from arc2face_rt.entry import main; sys.exit(main())"]


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_generate_prints_no_library_noise_where_home_is_unwritable(backend, tiny_engines, tmp_path):
    if backend == "openvino" and not openvino_installed():
        pytest.skip("openvino is not installed")
    home = "/proc"         # a folder in which nothing can be made, even by root
    if not os.path.isdir(home):
        pytest.skip("no /proc here: no folder that even root cannot write in")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    r = subprocess.run(RT_SCRIPT + ["generate", "--engines", str(tiny_engines), "--random-id", "-n", "1",
                                    "--steps", "2", "--backend", backend, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env={**env, "HOME": home})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").is_dir() and len(list((tmp_path / "out").glob("*.png"))) == 1
    assert "telemetry" not in r.stderr.lower() and "\x1b[" not in r.stderr, r.stderr
    assert "client ID" not in r.stderr, r.stderr


def test_generate_with_stderr_closed_writes_its_images(tiny_engines, tmp_path):
    """`2>&-`: Python starts with sys.stderr None; the status lines went to stdout and tqdm then failed
    (exit 1) once the work had begun."""
    r = subprocess.run(RT_SCRIPT + ["generate", "--engines", str(tiny_engines), "--random-id", "-n", "1",
                                    "--steps", "2", "--out", str(tmp_path / "out")],
                       stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert r.returncode == 0 and r.stdout == ""
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_benchmarks_with_stderr_closed_keep_errors_off_stdout():
    """`python -m benchmarks ... 2>&-`: its error line went to stdout, into the output being captured."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "benchmarks", "digest", "no-such-rev"], cwd=repo,
                       stdout=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(2))
    assert r.returncode == 2 and r.stdout == ""


def test_quiet_libraries_keeps_a_users_choice_and_other_warnings(monkeypatch, caplog):
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    root = logging.getLogger()
    monkeypatch.setattr(root, "filters", list(root.filters))
    entry.quiet_libraries()
    entry.quiet_libraries()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    assert root.filters.count(entry._not_openvino_telemetry) == 1
    with caplog.at_level(logging.WARNING):
        root.handle(root.makeRecord("root", logging.WARNING, "/x/openvino_telemetry/main.py", 1, "dropped",
                                    None, None))
        root.handle(root.makeRecord("root", logging.WARNING, "/x/app.py", 1, "kept", None, None))
    assert [r.getMessage() for r in caplog.records] == ["kept"]


def test_onnx_runtime_logs_errors_only_with_verbose(tmp_path, capfd):
    """ONNX Runtime logs a failed run in colour on stderr (an out-of-memory, say) and then raises it,
    which the CLI prints as its one line: the log is only wanted with -v."""
    import numpy as np
    from onnx import TensorProto, helper, save

    from arc2face_rt.backends.ort import OrtSession, log

    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("s", TensorProto.INT64, [1], [3])])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "r.onnx")
    for level, logged in ((logging.WARNING, False), (logging.INFO, True)):
        old = log.level
        log.setLevel(level)
        try:
            sess = OrtSession(tmp_path / "r.onnx", device="cpu")
        finally:
            log.setLevel(old)
        capfd.readouterr()
        with pytest.raises(Exception, match="cannot be reshaped"):
            sess.run({"x": np.zeros(5, np.float32)})        # 5 values into shape [3]
        assert ("ExecuteKernel" in capfd.readouterr().err) is logged
