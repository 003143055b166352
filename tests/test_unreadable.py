"""Inputs that exist but are the wrong kind of thing, or that this user may not read: the one-line error
names that cause (a folder where a file goes, a file where a folder goes, permission denied), not a
neighbouring one such as "not found", "no manifest.json" or "the download may be truncated".

Permission cases run the real command in a child process as an unprivileged user: root reads
everything, so as root the child runs as `nobody` (65534) through setpriv; they skip where that child
cannot start.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_bad_input import RT, engines_copy, snapshot

NOBODY = 65534


def _as_nobody() -> list[str]:
    """The prefix that runs a command without root's permission to read everything: none for another user;
    for root, util-linux's setpriv (it changes the user after resolving the program, which may lie under a
    folder only root can search, such as a pyenv Python in /root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot run a child as an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def sandbox():
    """A folder an unprivileged child can enter (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="arc2face-unreadable-"))
    d.chmod(0o755)
    (d / "w").mkdir()
    (d / "w").chmod(0o777)           # where an unprivileged child may write
    yield d
    for p in [d, *d.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


def _run(argv: list[str], sandbox: Path, unprivileged: bool = False) -> str:
    """Run arc2face-rt; check exit 2, no traceback, nothing changed in `sandbox`; return the error line."""
    before = snapshot(sandbox) if not unprivileged else None
    env = {**os.environ, "HOME": str(sandbox)}          # library telemetry writes under HOME; keep it out of /root
    r = subprocess.run((_as_nobody() if unprivileged else []) + RT + argv, capture_output=True, text=True,
                       timeout=300, env=env, cwd=sandbox)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("arc2face-rt: error:"), r.stderr
    if before is not None:
        assert snapshot(sandbox) == before, "the command changed files"
    return lines[-1]


def _need_unprivileged_child(sandbox: Path) -> None:
    r = subprocess.run(_as_nobody() + [sys.executable, "-c", "import arc2face_rt"], capture_output=True,
                       timeout=600, cwd=sandbox)
    if r.returncode != 0:
        pytest.skip(f"an unprivileged child cannot import arc2face_rt here: {r.stderr.decode()[-200:]}")


def _face_models(sandbox: Path) -> Path:
    from face_fixtures import tiny_models_dir

    d = sandbox / "models"
    shutil.copytree(tiny_models_dir(), d)
    for p in [d, *d.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


def _identity(sandbox: Path) -> Path:
    v = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    np.save(sandbox / "id.npy", v / np.linalg.norm(v))
    return sandbox / "id.npy"


def test_engines_given_as_a_file_or_under_a_file(tiny_engines, sandbox):
    (sandbox / "f").write_text("x")
    gen = ["generate", "--random-id", "--out", str(sandbox / "o"), "--engines"]
    line = _run(gen + [str(sandbox / "f")], sandbox)
    assert "is a file, not an engines folder" in line and "no such" not in line, line
    line = _run(gen + [str(sandbox / "f" / "sub")], sandbox)
    assert "part of this path is a file" in line and "no such" not in line, line


def test_a_face_model_given_as_a_folder(sandbox):
    models = _face_models(sandbox)
    Image.new("RGB", (64, 64)).save(sandbox / "p.png")
    line = _run(["score", "--identity", str(_identity(sandbox)), "--detector", str(models),
                 "--recognizer", str(models / "arcface.onnx"), "--device", "cpu", str(sandbox / "p.png")], sandbox)
    assert "is a folder, not the face detector" in line and "not found" not in line, line


def test_an_engines_folder_this_user_cannot_search(tiny_engines, sandbox):
    _need_unprivileged_child(sandbox)
    e = engines_copy(tiny_engines, sandbox / "engines")
    e.chmod(0o700)                       # the owner (root, or this user) only: `nobody` may not look inside
    if os.geteuid() != 0:
        e.chmod(0o600)
    line = _run(["generate", "--engines", str(e), "--random-id", "--out", str(sandbox / "w" / "o")], sandbox,
                unprivileged=True)
    assert "cannot read the engines folder: permission denied" in line and "no manifest" not in line, line
    assert not (sandbox / "w" / "o").exists()


def test_a_face_model_this_user_cannot_read(sandbox):
    _need_unprivileged_child(sandbox)
    models = _face_models(sandbox)
    (models / "scrfd_10g_bnkps.onnx").chmod(0o000 if os.geteuid() != 0 else 0o600)
    Image.new("RGB", (64, 64)).save(sandbox / "p.png")
    line = _run(["embed", "--image", str(sandbox / "p.png"), "--models", str(models), "--device", "cpu",
                 "--out", str(sandbox / "w" / "id.npy")], sandbox, unprivileged=True)
    assert "cannot read the face detector: permission denied" in line and "truncated" not in line, line
    assert not (sandbox / "w" / "id.npy").exists()
