"""Content verification with stamps: the first run hashes, later runs only stat; any change of a
file (even one that keeps its size and mtime) or a file swapped in from another folder is hashed
again and refused."""
from __future__ import annotations

import os
import shutil

import pytest

from arc2face_rt.errors import EngineMismatchError
from arc2face_rt.integrity import StampStore, verify_records
from arc2face_rt.manifest import load_manifest, record_files
from arc2face_rt.pipeline import Arc2FacePipeline


def _all_files(d):
    m = load_manifest(d)
    return {rel: r for rec in m["stages"].values() for rel, r in record_files(rec).items()}


@pytest.fixture
def engines(tiny_engines, tmp_path, monkeypatch):
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d)
    return d


def test_first_run_hashes_later_runs_only_stat(engines):
    files = _all_files(engines)
    first = verify_records(engines, files)
    assert first.hashed == first.files == len(files)
    second = verify_records(engines, files)
    assert second.files == len(files) and second.hashed == 0
    assert verify_records(engines, files, mode="full").hashed == len(files)     # --verify always hashes


def test_same_size_same_mtime_corruption_is_caught(engines):
    files = _all_files(engines)
    verify_records(engines, files)
    p = engines / "step_cfg.onnx"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    with open(p, "r+b") as f:                 # in place: same inode, same size
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))   # and the old mtime: only ctime tells
    with pytest.raises(EngineMismatchError, match="step_cfg.onnx: content differs"):
        verify_records(engines, files)
    with pytest.raises(EngineMismatchError, match="content differs"):
        Arc2FacePipeline(engines, backend="ort", device="cpu")
    Arc2FacePipeline(engines, backend="ort", device="cpu", verify=False).close()   # --no-verify: sizes only


def test_file_swapped_from_another_folder_is_caught(engines, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(engines, other)
    verify_records(engines, _all_files(engines))
    # same name, same size, other content: the vae of one folder moved into the other
    data = bytearray((other / "vae_decoder.onnx").read_bytes())
    data[-100] ^= 0xFF
    (other / "vae_decoder.onnx").write_bytes(data)
    os.replace(other / "vae_decoder.onnx", engines / "vae_decoder.onnx")
    with pytest.raises(EngineMismatchError, match="vae_decoder.onnx: content differs"):
        verify_records(engines, _all_files(engines))


def test_unwritable_cache_only_costs_time(engines, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(blocker))
    files = _all_files(engines)
    assert verify_records(engines, files).hashed == len(files)
    assert verify_records(engines, files).hashed == len(files)      # nothing remembered, nothing broken


def test_damaged_stamp_file_is_ignored(engines):
    files = _all_files(engines)
    verify_records(engines, files)
    store = StampStore(engines)
    store.path.write_text("{broken")
    assert verify_records(engines, files).hashed == len(files)
    assert verify_records(engines, files).hashed == 0


def test_stamp_file_that_is_a_pipe_or_device_is_ignored(engines):
    """A FIFO (or /dev/zero) where the stamp file goes must neither block nor eat memory."""
    import subprocess
    import sys

    files = _all_files(engines)
    store = StampStore(engines)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(store.path)
    code = ("import sys; from arc2face_rt.integrity import verify_records\n"
            "from arc2face_rt.manifest import load_manifest, record_files\n"
            f"d = {str(engines)!r}\n"
            "f = {r: x for s in load_manifest(d)['stages'].values() for r, x in record_files(s).items()}\n"
            "print(verify_records(d, f).hashed)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == str(len(files)), r.stderr
    store.path.unlink()
    store.path.symlink_to("/dev/zero")
    assert verify_records(engines, files).hashed == len(files)
