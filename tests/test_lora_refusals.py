"""A LoRA the export cannot use is refused in one line, exit 2, before the model is loaded, without the
libraries' logging; a LoRA whose fused weights make NaN/inf is the user's error, not a "please report"
bug; --lora-scale without --lora is refused. The adapters are made from the random LCM-LoRA of the
session's tiny checkpoint (kohya keys, as the released file)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from arc2face_ref.lora import MAX_LORA_VALUE, random_lcm_lora

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    """The random LCM-LoRA for the tiny UNet, built on the meta device's shapes: no weights loaded."""
    from arc2face_ref.loading import unet_skeleton

    unet = unet_skeleton(tiny_model_dir).to_empty(device="cpu")
    return random_lcm_lora(unet, seed=1)


@pytest.fixture
def library_lines():
    """What diffusers, peft and transformers log outside the LoRA code's own capture (which swaps these
    loggers' handlers while it loads the adapter, so this handler sees only what leaks around it: at
    import, before or after the load). What leaks through the capture itself shows in capfd."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.name}: {record.getMessage()}"[:200])

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    yield lines
    for lg in loggers:
        lg.removeHandler(handler)


def _bad(state: dict, what: str, tmp_path) -> str:
    ren = "lora_unet_mid_block_resnets_0_conv1"
    changes = {
        "nan up": lambda k, v: torch.full_like(v, float("nan")) if "lora_up" in k else v,
        "inf down": lambda k, v: torch.full_like(v, float("inf")) if "lora_down" in k else v,
        "huge": lambda k, v: v * 1e30 if "lora_up" in k else v,
        "nan alpha": lambda k, v: torch.tensor(float("nan")) if k.endswith(".alpha") else v,
        "int32": lambda k, v: v.to(torch.int32),
        "rank 0": lambda k, v: v[:0].clone() if "lora_down" in k else v,
        "rank": lambda k, v: v[:8].clone() if "lora_down" in k else v,
        "in shape": lambda k, v: v[:, :3].clone() if "lora_down" in k else v,
        "alpha 0": lambda k, v: torch.tensor(0.0) if k.endswith(".alpha") else v,
        "up 0": lambda k, v: torch.zeros_like(v) if "lora_up" in k else v,
        "down 0": lambda k, v: torch.zeros_like(v) if "lora_down" in k else v,
    }
    from safetensors.torch import save_file

    f = tmp_path / "bad.safetensors"
    if what in changes:
        state = {k: changes[what](k, v) for k, v in state.items()}
    elif what == "no layer":
        state = {"lora_unet_nothing_here.lora_down.weight": torch.ones(4, 8),
                 "lora_unet_nothing_here.lora_up.weight": torch.ones(8, 4)}
    elif what == "one key off":
        state = {k.replace(ren, "lora_unet_mid_block_resnets_7_conv1"): v for k, v in state.items()}
    elif what == "no up":
        state = {k: v for k, v in state.items() if "lora_up" not in k}
    elif what == "extra key":
        state = {**state, "random_key": torch.ones(3)}
    elif what == "folder":
        f.mkdir()
        return str(f)
    elif what == "fifo":
        os.mkfifo(f)
        return str(f)
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    return str(f)


@pytest.mark.parametrize("what,words", [
    ("nan up", (".lora_up.weight holds", "NaN/inf value(s) of")),
    ("inf down", (".lora_down.weight holds", "NaN/inf value(s) of")),
    ("huge", f"beyond the {MAX_LORA_VALUE:g} (the fp16 range)"),
    ("nan alpha", ".alpha holds 1 NaN/inf value(s) of 1"),
    ("int32", "holds int32 numbers; a LoRA's tensors are floating point"),
    ("rank 0", "is empty"),
    ("rank", "79 tensor(s) of the wrong shape, e.g. down_blocks.0.resnets.0.conv1.lora_A: [8, 32, 3, 3] in the file, "
             "[64, 32, 3, 3] in this UNet"),
    ("in shape", "tensor(s) of the wrong shape"),
    ("no layer", "Target modules {'nothing.here'} not found"),
    ("one key off", "1 of its 79 layers name no layer of this UNet"),
    ("no up", "every lora_down needs its lora_up"),
    ("extra key", "holds 1 tensor(s) that are not a LoRA's (e.g. 'random_key') beside its LoRA tensors"),
    ("alpha 0", "every .alpha is 0"),
    ("up 0", "every lora_up tensor is 0"),
    ("down 0", "every lora_down tensor is 0"),
    ("folder", "is a folder, expected a LoRA .safetensors file"),
    ("fifo", "is not a regular file (a pipe, socket or device)"),
])
def test_bad_lora_is_one_line_before_the_model_loads(tiny_model_dir, adapter, tmp_path, capfd, monkeypatch,
                                                     library_lines, what, words):
    from arc2face_export import onnx_export
    from arc2face_export.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the LoRA was checked")

    monkeypatch.setattr(onnx_export, "load_models", no_loading)
    out = tmp_path / "engines"
    f = _bad(adapter, what, tmp_path)
    capfd.readouterr()
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(out), "--lora", f, "--stages", "step",
               "--no-validate"])
    err = capfd.readouterr().err.strip().splitlines()      # file-descriptor level: the libraries' handlers too
    assert rc == 2 and len(err) == 1 and not library_lines, (err[:5], library_lines[:5])
    assert err[0].startswith(f"arc2face-export: error: {f}: ") and all(w in err[0] for w in ((words,) if isinstance(words, str) else words)), err[0]
    assert not out.exists()


def test_lora_scale_without_lora_is_refused(tiny_model_dir, tmp_path, capfd):
    from arc2face_export.cli import main

    out = tmp_path / "engines"
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(out), "--lora-scale", "2",
               "--stages", "projector", "--no-validate"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["arc2face-export: error: --lora-scale 2.0 needs --lora FILE.safetensors (the scale of "
                               "which LoRA?); drop it, or pass the adapter"]
    assert not out.exists()


def test_a_good_lora_fuses_without_library_output(tiny_model_dir, adapter, tmp_path, capfd, library_lines):
    """diffusers said "No LoRA keys associated to CLIPTextModel ..." (and transformers its torchvision
    notice) on every good adapter; only our progress lines remain."""
    from safetensors.torch import save_file
    from arc2face_export.cli import main

    f = tmp_path / "good.safetensors"
    save_file(adapter, str(f))
    capfd.readouterr()
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--lora", str(f),
               "--stages", "projector", "--no-validate"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 0 and all(ln.startswith("arc2face-export: ") for ln in err), err
    assert not library_lines, library_lines[:5]
    assert "arc2face-export: LoRA fused: 79 UNet weight tensors changed" in err


def test_a_scale_too_small_to_change_a_weight_blames_the_scale(tiny_model_dir, adapter, tmp_path, capfd):
    """--lora-scale 1e-30 fuses a change below float32's resolution: the line blamed the adapter."""
    from safetensors.torch import save_file
    from arc2face_export.cli import main

    f = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(f))
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--lora", str(f),
               "--lora-scale", "1e-30", "--stages", "step", "--no-validate"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and "fused at --lora-scale 1e-30, it changed no UNet weight" in err[-1], err
    assert "pass a larger --lora-scale" in err[-1] and not (tmp_path / "e").exists()


def test_weights_that_make_nan_are_the_users_error_not_a_bug(tiny_model_dir, adapter, tmp_path, capfd):
    """Finite adapter values within the bound, whose fused UNet overflows: validation says the weights
    make non-finite values (exit 2, naming the stage), not "the export is wrong, please report it"."""
    from safetensors.torch import save_file
    from arc2face_export.cli import main

    f = tmp_path / "big.safetensors"
    save_file({k: v * 3e4 if "lora_up" in k else v for k, v in adapter.items()}, str(f))
    out = tmp_path / "e"
    capfd.readouterr()
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(out), "--lora", str(f), "--stages", "step"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("arc2face-export: error: export of stage step: ")
    assert "the model (or fused LoRA) weights produce non-finite values" in err[-1]
    assert not out.exists()


def test_weights_that_overflow_fp16_say_so(tiny_model_dir, adapter, tmp_path, capfd):
    """fp32 torch is finite, the fp16 graph and fp16 torch are not: the weights overflow fp16 (the
    user's to fix with --precision fp32), not a broken export."""
    from safetensors.torch import save_file
    from arc2face_export.cli import main

    f = tmp_path / "loud.safetensors"
    save_file({k: v * 1e3 if "lora_up" in k else v for k, v in adapter.items()}, str(f))
    capfd.readouterr()
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--lora", str(f),
               "--stages", "step", "--precision", "fp16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("arc2face-export: error: export of stage step: ")
    assert "torch in fp16 gives NaN/inf (fp32 does not): the weights overflow fp16" in err[-1]


def test_a_strong_lora_that_amplifies_rounding_is_not_called_a_bug(tiny_model_dir, adapter, tmp_path, capfd):
    """Up-projections x100: finite, but fp32 torch and fp32 ONNX Runtime differ beyond the 1e-4 tolerance
    because the weights amplify rounding (torch's own fp32 is as far from float64). The fp32 export is kept,
    with both distances from float64 recorded; in fp16 (x40) the graph and torch's fp16 both miss the fp16
    tolerance, and (x50) fp16 torch overflows where the graph only misses it: the user's to fix with
    --precision fp32, one line, exit 2, not "please report it"."""
    from safetensors.torch import save_file
    from arc2face_export.cli import main
    from arc2face_export.validate import FLOAT64_SLACK
    from arc2face_rt import manifest as mf

    for scale in (100, 50, 40):
        save_file({k: v * scale if "lora_up" in k else v for k, v in adapter.items()}, str(tmp_path / f"x{scale}.st"))
    capfd.readouterr()
    out = tmp_path / "fp32"
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(out), "--lora", str(tmp_path / "x100.st"),
               "--stages", "step_cfg"])
    err = capfd.readouterr().err
    assert rc == 0, err
    v = mf.load_manifest(out)["stages"]["step_cfg"]["validation"]
    assert v["value"] > v["tolerance"] == 1e-4
    f64 = v["float64"]
    assert 0 < f64["onnxruntime"] <= FLOAT64_SLACK * f64["torch"] and f64["torch"] > 1e-4
    assert "both within rounding of float64" in err
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "fp16"), "--lora",
               str(tmp_path / "x40.st"), "--stages", "step_cfg", "--precision", "fp16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("arc2face-export: error: export of stage step_cfg: fp16 loses too much "
                                          "of these weights"), err[-3:]
    assert "export --precision fp32" in err[-1] and not (tmp_path / "fp16").exists()
    # x50: the fp16 graph is finite (0.0203 from fp32, tolerance 0.02), fp16 torch overflows
    rc = main(["onnx", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "fp16"), "--lora",
               str(tmp_path / "x50.st"), "--stages", "step_cfg", "--precision", "fp16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and "torch in fp16 gives NaN/inf (fp32 does not): the weights overflow fp16" in err[-1], err[-3:]


def test_a_model_whose_weights_do_not_fit_its_config_is_blamed_not_the_adapter(tiny_model_dir, adapter, tmp_path):
    """A good adapter against a UNet config that no longer fits its weights: the model folder is named."""
    import shutil

    from safetensors.torch import save_file

    from arc2face_ref.lora import check_lora_fits
    from arc2face_rt.errors import MissingWeightsError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir / "arc2face", model / "arc2face")
    cfg = json.loads((model / "arc2face" / "config.json").read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    (model / "arc2face" / "config.json").write_text(json.dumps(cfg))
    save_file(adapter, str(tmp_path / "good.safetensors"))
    with pytest.raises(MissingWeightsError, match="does not match .*config.json.*download both again"):
        check_lora_fits(adapter, model, tmp_path / "good.safetensors")
    check_lora_fits(adapter, tiny_model_dir, tmp_path / "good.safetensors")      # the intact folder: fine


def test_peft_keys_without_the_unet_prefix_get_the_rename_as_their_fix(tiny_model_dir, tmp_path):
    from arc2face_ref.loading import unet_skeleton
    from arc2face_ref.lora import check_lora_fits
    from arc2face_rt.errors import MissingWeightsError

    name, lin = next((n, m) for n, m in unet_skeleton(tiny_model_dir).named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("down_blocks."))
    bare = {f"{name}.lora_A.weight": torch.randn(4, lin.in_features),
            f"{name}.lora_B.weight": torch.randn(lin.out_features, 4)}
    with pytest.raises(MissingWeightsError, match="without the 'unet.' prefix"):
        check_lora_fits(bare, tiny_model_dir, tmp_path / "peft.safetensors")
    check_lora_fits({f"unet.{k}": v for k, v in bare.items()}, tiny_model_dir, tmp_path / "peft.safetensors")
