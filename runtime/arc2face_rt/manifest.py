"""engines/<name>/manifest.json: what was built, from what, with which libraries, and how well it validated.

Layout (format 1):
    {
      "format": "arc2face-rt-engines", "format_version": 1, "spec_revision": 1,
      "precision": "fp32" | "fp16", "opset": 18, "created": ISO-8601,
      "source": {"model_dir": str, "kind": "released" | "random-tiny" | "random-full"},
      "libraries": {"torch": ..., "diffusers": ..., "onnx": ..., "onnxruntime": ...},
      "stages": {name: {"file": "step_cfg.onnx", "files": {relpath: {"sha256": hex, "bytes": n}},
                        "inputs": [[name, dtype, shape], ...], "outputs": [...],
                        "validation": {"metric": str, "value": float, "tolerance": float}}},
      "plans": {name: {...}}   # written by `arc2face-export build-engines` (TensorRT)
    }
The runtime checks revision, precision and that every file exists with its recorded size; a full
sha256 check is `verify_files(..., hashes=True)` (slow for multi-GB graphs, so opt-in).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import atomic_write
from .errors import EngineMismatchError
from .specs import SPEC_REVISION

MANIFEST = "manifest.json"
FORMAT = "arc2face-rt-engines"
FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Replace `path` with `data` as JSON; readers never see half a file."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text), overwrite=True)


def load_manifest(engines_dir: str | Path) -> dict:
    """Read and sanity-check an engines folder's manifest; raise EngineMismatchError naming the fix."""
    engines_dir = Path(engines_dir)
    path = engines_dir / MANIFEST
    if not path.is_file():
        raise EngineMismatchError(
            f"{engines_dir}: no {MANIFEST}; write this folder with "
            f"`arc2face-export onnx --model-dir MODEL --out {engines_dir}`")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineMismatchError(f"{path}: unreadable manifest ({e}); re-export the folder") from e
    if m.get("format") != FORMAT:
        raise EngineMismatchError(f"{path}: not an arc2face-rt engines manifest")
    if m.get("spec_revision") != SPEC_REVISION:
        raise EngineMismatchError(
            f"{engines_dir}: written for spec revision {m.get('spec_revision')}, this arc2face-rt reads "
            f"revision {SPEC_REVISION}; re-export with `arc2face-export onnx --model-dir MODEL --out {engines_dir} --force`")
    return m


def record_files(rec: dict) -> dict:
    """{relative path: {"sha256", "bytes"}} of a stage record (several files) or a plan record (one)."""
    return rec["files"] if "files" in rec else {rec["file"]: rec}


def verify_files(engines_dir: str | Path, records: dict, hashes: bool = False) -> None:
    """Check that each recorded file exists with its size (and sha256 when `hashes`)."""
    engines_dir = Path(engines_dir)
    for rel, rec in records.items():
        p = engines_dir / rel
        if not p.is_file():
            raise EngineMismatchError(f"{p}: listed in the manifest but missing; re-export the folder")
        if p.stat().st_size != rec["bytes"]:
            raise EngineMismatchError(
                f"{p}: {p.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated or replaced); "
                "re-export the folder")
        if hashes and sha256_file(p) != rec["sha256"]:
            raise EngineMismatchError(f"{p}: sha256 differs from the manifest; re-export the folder")
