"""The re-export advice in the errors of a damaged engines folder is a complete command that the
exporter's own parser takes (--model-dir, --force, and the options the manifest records)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from arc2face_rt.pipeline import GenerationOptions as G

ID = np.random.default_rng(0).standard_normal(512).astype(np.float32)


# ---- the re-export advice of a damaged engines folder ----------------------------------------------
def _engines_copy(src, dst, **manifest_changes):
    """Hard-linked copy of an engines folder with its own manifest (the shared export is never touched)."""
    import json
    import shutil

    shutil.copytree(src, dst, copy_function=os.link)
    m = json.loads((dst / "manifest.json").read_text())
    for k, v in manifest_changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    (dst / "manifest.json").unlink()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst, m


def _advised_command(message: str) -> list[str]:
    """The `arc2face-export onnx ...` command an error advises, parsed by the exporter's own parser
    (placeholders filled): a missing required option or a typo fails here."""
    import shlex

    from arc2face_export.cli import build_parser

    cmd = message.split("`")[1]
    assert cmd.startswith("arc2face-export onnx ")
    argv = [{"MODEL": "model", "LORA": "lcm.safetensors"}.get(a, a) for a in shlex.split(cmd)[1:]]
    return build_parser().parse_args(argv)


def _truncate(path):
    data = path.read_bytes()
    path.unlink()                                         # the copy's link, not the shared file
    path.write_bytes(data[:100])


def test_reexport_advice_is_a_complete_command(tiny_engines, tmp_path):
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    d, m = _engines_copy(tiny_engines, tmp_path / "plain dir")      # a space: the command is quoted
    _truncate(d / "vae_decoder.onnx")
    with pytest.raises(EngineMismatchError, match="truncated or replaced") as e:
        Arc2FacePipeline(d, backend="ort")
    args = _advised_command(str(e.value))
    assert args.model_dir == Path(m["source"]["model_dir"]) and args.out == d and args.force   # recorded, exists
    assert args.lora is None and args.precision == "fp32"


def test_reexport_advice_repeats_the_lora_precision_and_controlnet(tiny_engines, tmp_path):
    """A LoRA folder exported with `--stages projector step` (README) asked for CFG: the advice names the
    LoRA and its scale, the precision, and a model folder with controlnet/ when the folder had its graphs."""
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    src = __import__("json").loads((tiny_engines / "manifest.json").read_text())
    lora = {"file": "pytorch_lora_weights.safetensors", "sha256": "ab" * 32, "bytes": 10, "scale": 0.5}
    stages = {k: v for k, v in src["stages"].items() if k != "step_cfg"}
    d, _ = _engines_copy(tiny_engines, tmp_path / "lora", lora=lora, stages=stages, precision="fp16",
                         source={"model_dir": str(tmp_path / "gone")})
    with Arc2FacePipeline(d, backend="ort") as p:
        with pytest.raises(EngineMismatchError, match="no 'step_cfg' stage") as e:
            p.generate(ID, 1, G(steps=1, guidance=3.0))
    msg = str(e.value)
    args = _advised_command(msg)
    assert (args.model_dir, args.precision, args.lora, args.lora_scale, args.force) == \
        (Path("model"), "fp16", Path("lcm.safetensors"), 0.5, True)
    assert "pytorch_lora_weights.safetensors (sha256 abababababab" in msg and "controlnet" not in msg
    with pytest.raises(EngineMismatchError, match="has no ControlNet step graph") as e:
        Arc2FacePipeline(d, backend="ort").session("step_control")
    assert "controlnet/" in str(e.value) and _advised_command(str(e.value)).lora == Path("lcm.safetensors")
    stages["step_control"] = stages["step"]                 # a folder that had the ControlNet graphs
    d2, _ = _engines_copy(tiny_engines, tmp_path / "control", lora=lora, stages=stages,
                          source={"model_dir": str(tmp_path / "gone")})
    _truncate(d2 / "projector.onnx")
    with pytest.raises(EngineMismatchError, match="truncated") as e:
        Arc2FacePipeline(d2, backend="ort")
    assert "MODEL: the model folder with its controlnet/" in str(e.value)
    assert _advised_command(str(e.value)).lora_scale == 0.5


def test_reexport_advice_of_an_unreadable_manifest(tiny_engines, tmp_path):
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    d = tmp_path / "bad"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="unreadable manifest") as e:
        Arc2FacePipeline(d, backend="ort")
    assert "--precision and --lora options of its first export" in str(e.value)
    assert _advised_command(str(e.value)).model_dir == Path("model")
