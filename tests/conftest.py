"""Shared fixtures: one tiny random-weight checkpoint and its fp32 export per test session."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (.ci/run): N workers share the cores, so each runs torch, ONNX Runtime and OpenVINO on
    # one thread instead of one per core (oversubscribed, their spinning threads made the 2-core run only
    # 18% faster than one worker; on one thread the pipeline parity test and test_resume took 182 s
    # instead of 161 s, and two workers run at once).
    # Set before any test module imports torch; child processes inherit it.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ARC2FACE_ORT_THREADS", "ARC2FACE_OV_THREADS"):
        os.environ.setdefault(_var, "1")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # pytest started with `cmd &` in a non-interactive script inherits SIGINT ignored, and so would every
    # command a test starts and run_cli in-process (it keeps an inherited SIG_IGN): the tests that stop one
    # with SIGINT would fail, and leave the command running. Python's handler goes back in, so a Ctrl-C
    # to the script's process group now stops this pytest too.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_cuda_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if _has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Verification stamps and other per-user caches go to a temporary folder, not ~/.cache
    (child processes inherit the variable)."""
    import os

    old = os.environ.get("ARC2FACE_CACHE_DIR")
    os.environ["ARC2FACE_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("ARC2FACE_CACHE_DIR", None)
    else:
        os.environ["ARC2FACE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from arc2face_ref.random_ckpt import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0,
                                   face_models=False)


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
    from arc2face_ref.loading import load_models

    return load_models(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_engines(tiny_model_dir, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("engines") / "fp32"
    export_all(tiny_model_dir, out, precision="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_fp16_engines(tiny_model_dir, tmp_path_factory):
    """The tiny model exported in fp16 with the ONNX Runtime CUDA graphs (`onnx --precision fp16 --ort-cuda`),
    with its manifest; shared, so read only (copy it with test_bad_input.engines_copy to change it)."""
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("engines") / "fp16"
    return out, export_all(tiny_model_dir, out, precision="fp16", ort_cuda=True)


@pytest.fixture(scope="session")
def wds_run(tiny_engines, tmp_path_factory):
    """The uninterrupted in-process `dataset --format wds` run (tests/test_dataset*.py) everything else is
    compared with; shared, so read only (copy it to change it)."""
    from arc2face_rt.cli import main as rt_main
    from dataset_runs import dataset_args

    out = tmp_path_factory.mktemp("wds") / "out"
    assert rt_main(dataset_args(tiny_engines, out, "--format", "wds")) == 0
    return out


@pytest.fixture(scope="session")
def scored_run(tiny_engines, tmp_path_factory):
    """`dataset --format folders` with the face models: every image's similarity recorded, nothing
    dropped; shared, so read only."""
    from arc2face_rt.cli import main as rt_main
    from dataset_runs import dataset_args
    from face_fixtures import tiny_models_dir

    out = tmp_path_factory.mktemp("scored") / "out"
    assert rt_main(dataset_args(tiny_engines, out, "--models", str(tiny_models_dir()))) == 0
    return out


def killed_run_temp(folder, name: str):
    """A tagged temporary folder for output `name` in `folder`, as a SIGKILLed process of ours leaves
    it (its process id is one that has exited), with a half-written file inside."""
    import sys
    from pathlib import Path

    from arc2face_rt.atomic import temp_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = temp_dir(folder, name)
    path = Path(str(live).replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    live.rename(path)
    (path / "half-written").write_bytes(b"x")
    return path
