"""Shared fixtures: one tiny random-weight checkpoint and its fp32 export per test session."""
from __future__ import annotations

import shutil
import subprocess

import pytest


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
