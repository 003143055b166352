"""Full-size fidelity gates of the OpenVINO CPU precisions (slow tier: `pytest -m slow`).

The full-size random checkpoint (real SD1.5 UNet/VAE, CLIP-L, IResNet-100 face models) through the
whole pipeline, 25 DPM-Solver++ steps, guidance 3: OpenVINO bf16 and int8 against the fp32 pipeline on
ONNX Runtime must keep image PSNR >= 30 dB and ArcFace cosine >= 0.95. Random weights: this measures
computational drift, not face quality.

Set ARC2FACE_FULL_DIR to a folder holding `model/` (`arc2face-export random-checkpoint --size full`) and
`fp32/` (its `arc2face-export onnx` export) to reuse them; otherwise both are written into a temporary
folder first (about 6 minutes and 12 GiB of memory). int8 graphs are quantised into `fp32/` when missing.
About 25 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_dirs(tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    root = Path(os.environ["ARC2FACE_FULL_DIR"]) if os.environ.get("ARC2FACE_FULL_DIR") else None
    if root is None:
        from arc2face_export.onnx_export import export_all
        from arc2face_ref.random_ckpt import write_random_checkpoint

        root = tmp_path_factory.mktemp("full")
        write_random_checkpoint(root / "model", size="full", seed=0)
        export_all(root / "model", root / "fp32", precision="fp32")
    return root / "model", root / "fp32"


REPO = Path(__file__).resolve().parent.parent


def test_full_size_bf16_and_int8_pass_the_fidelity_gates(full_dirs, tmp_path):
    from arc2face_export.ov_int8 import ensure_ov_int8
    from arc2face_rt.backends.openvino import cpu_isa

    model, engines = full_dirs
    ensure_ov_int8(engines, stages=("step_cfg",), identities=2, per_run=4)
    precisions = "bf16,int8" if cpu_isa().bf16 else "int8"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-m", "benchmarks", "cpu-precision", "--size", "full", "--model-dir", str(model),
                    "--engines", str(engines), "--precisions", precisions, "--identities", "2",
                    "--out", str(tmp_path), "--name", "full.json"], cwd=REPO, env=env, check=False)
    res = json.loads((tmp_path / "full.json").read_text())
    for prec, r in res["precisions"].items():
        print(prec, r["median"])
        assert "arcface_cosine" in r["median"], "the full-size checkpoint has face models"
        assert r["median"]["image_psnr_db"] >= 30.0, (prec, r["median"])
        assert r["median"]["arcface_cosine"] >= 0.95, (prec, r["median"])
        assert r["gates_passed"]
