"""LCM-LoRA: fused before export, recorded in the manifest, LCM defaults in `generate`, and parity with
diffusers' StableDiffusionPipeline + load_lora_weights (peft, not fused) + LCMScheduler."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arc2face_rt import manifest as mf
from arc2face_rt.images import read_params
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, image_noise, random_identity
from arc2face_ref.lora import LCM_LORA_RANK, LORA_FILE, lora_target_modules, random_lcm_lora
from arc2face_ref.pipeline import diffusers_scheduler
from arc2face_ref.projector import Arc2FaceProjector

pytest.importorskip("peft")

LORA_STAGES = ("projector", "step", "vae_decoder")      # LCM runs at guidance 1: the no-CFG step graph


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    from arc2face_ref.random_ckpt import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("lora") / "tiny", size="tiny", seed=0, face_models=False,
                                   lcm_lora=True)


@pytest.fixture(scope="module")
def lora_file(lora_model_dir):
    return lora_model_dir / "lcm-lora" / LORA_FILE


@pytest.fixture(scope="module")
def lora_engines(lora_model_dir, lora_file, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("lora-engines") / "fp32"
    # unvalidated to save CI time: the parity test below checks the fused graphs end to end against diffusers
    export_all(lora_model_dir, out, stages=LORA_STAGES, lora=lora_file, lora_scale=1.0, validate=False)
    return out


def test_random_adapter_has_the_released_key_format_and_size():
    """Kohya keys on the layers LCM-LoRA distillation adapts, rank 64: 67.25 M parameters on the SD1.5
    UNet (the released adapter's card says 67.5 M; counted on a meta-device UNet: no weights are made)."""
    from diffusers import UNet2DConditionModel
    from arc2face_ref.random_ckpt import CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS["full"]["unet"])
    mods = lora_target_modules(unet)
    n = sum(LCM_LORA_RANK * (m.in_features + m.out_features) if isinstance(m, torch.nn.Linear) else
            LCM_LORA_RANK * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
            for m in mods.values())
    assert 67.2e6 < n < 67.3e6, n
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in mods
    assert "down_blocks.0.resnets.0.time_emb_proj" in mods and "conv_in" not in mods


def test_random_adapter_loads_into_diffusers_on_every_target(tiny_models):
    state = random_lcm_lora(tiny_models.unet, seed=1)
    key = next(k for k in state if k.endswith(".lora_down.weight"))
    assert key.startswith("lora_unet_") and state[key].shape[0] == LCM_LORA_RANK
    from diffusers import StableDiffusionPipeline
    sd = StableDiffusionPipeline.lora_state_dict(dict(state))[0]     # diffusers' own reading of the format
    assert len(sd) == 2 * len(lora_target_modules(tiny_models.unet))


def test_manifest_records_the_lora_and_info_shows_it(lora_engines, lora_file, capsys):
    from arc2face_rt.cli import main

    m = mf.load_manifest(lora_engines)
    assert m["lora"] == {"file": LORA_FILE, "sha256": mf.sha256_file(lora_file), "bytes": lora_file.stat().st_size,
                         "scale": 1.0}
    assert main(["info", "--engines", str(lora_engines)]) == 0
    out = capsys.readouterr().out
    assert f"LoRA fused: {LORA_FILE} (sha256 {m['lora']['sha256']}" in out and "at scale 1" in out


def _diffusers_lcm(models, lora_file, ids, latents, noise, steps):
    """Oracle: StableDiffusionPipeline with the LoRA loaded by load_lora_weights (peft layers, not
    fused) and LCMScheduler; LCM's per-step noise is ours, handed out in order."""
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(models.unet.config)
    unet.load_state_dict(models.unet.state_dict())            # a copy: the session fixture stays as it is
    sd = StableDiffusionPipeline(vae=models.vae, text_encoder=models.encoder, tokenizer=None, unet=unet.eval(),
                                 scheduler=diffusers_scheduler("lcm", models.scheduler_config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.load_lora_weights(str(lora_file), adapter_name="lcm")
    draws = []

    def our_noise(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(1)
        return torch.from_numpy(noise[len(draws) - 1]).to(dtype=dtype)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(lcm_module, "randn_tensor", our_noise)
        cond = Arc2FaceProjector(models.encoder)(torch.from_numpy(ids))
        out = sd(prompt_embeds=cond, latents=torch.from_numpy(latents), num_inference_steps=steps,
                 guidance_scale=1.0, output_type="np").images
    assert len(draws) == steps - 1                     # LCM adds noise between steps, not after the last
    return np.round(out * 255).astype(np.uint8)


@pytest.mark.parametrize("steps", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_fused_export_matches_diffusers_with_the_lora_loaded(lora_engines, lora_file, tiny_models, tiny_engines,
                                                            steps):
    ident = random_identity(4)
    opts = GenerationOptions(steps=steps, guidance=1.0, scheduler="lcm", seed=3, batch_size=1)
    with Arc2FacePipeline(lora_engines, backend="ort", device="cpu") as pipe:
        got = pipe.generate(ident, 1, opts).images
        sched = pipe.schedule("lcm", steps)
    lat, noise = image_noise(3, 0, sched)
    want = _diffusers_lcm(tiny_models, lora_file, ident[None], lat[None], noise[:, None], steps)  # noise [N, 1, ...]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as base:   # the same UNet without the LoRA
        plain = base.generate(ident, 1, opts).images
    assert np.abs(plain.astype(int) - got.astype(int)).mean() > 2           # the adapter does change the images


def test_generate_defaults_to_lcm_on_a_lora_folder_and_flags_win(lora_engines, tmp_path, capsys):
    from arc2face_rt.cli import main

    assert main(["generate", "--engines", str(lora_engines), "--random-id", "-n", "1", "--out",
                 str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "LCM-LoRA defaults --scheduler lcm --steps 4 --guidance 1" in err
    p = read_params(next((tmp_path / "a").glob("*.png")))
    assert (p["scheduler"], p["steps"], p["guidance"]) == ("lcm", 4, 1.0)
    assert main(["generate", "--engines", str(lora_engines), "--random-id", "-n", "1", "--steps", "2",
                 "--scheduler", "ddim", "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "LCM-LoRA defaults --guidance 1; given: --scheduler ddim, --steps 2" in err
    p = read_params(next((tmp_path / "b").glob("*.png")))
    assert (p["scheduler"], p["steps"], p["guidance"]) == ("ddim", 2, 1.0)


def test_dataset_takes_the_folders_lcm_defaults_too(lora_engines, tmp_path, capsys):
    """`dataset` on an LCM-LoRA folder (which has no step_cfg graph) used Arc2Face's guidance 3 and stopped
    with "no 'step_cfg' stage"; it now samples as `generate` does there, flags winning."""
    from arc2face_rt.cli import main

    out = tmp_path / "ds"
    assert main(["dataset", "--engines", str(lora_engines), "--identities", "1", "--per-identity", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    assert "LCM-LoRA defaults --scheduler lcm --guidance 1; given: --steps 2" in capsys.readouterr().err
    p = read_params(next(out.rglob("*.png")))
    assert (p["scheduler"], p["steps"], p["guidance"]) == ("lcm", 2, 1.0)


def test_a_folder_without_lora_keeps_arc2face_defaults():
    from arc2face_rt.pipeline import folder_defaults

    assert folder_defaults({"stages": {}}) == {"scheduler": "dpmpp2m", "steps": 25, "guidance": 3.0}
    assert folder_defaults(None)["steps"] == 25


@pytest.mark.parametrize("what,words", [
    ("missing", "no such LoRA file"),
    ("not safetensors", "not a readable .safetensors LoRA"),
    ("not a lora", "not a LoRA adapter"),
    ("text encoder", "adapts the text encoder"),
    ("scale", "--lora-scale must be"),
])
def test_bad_lora_is_refused_in_one_line_before_writing(lora_model_dir, lora_file, tmp_path, capsys, what, words):
    from safetensors.torch import save_file
    from arc2face_export.cli import main

    f, scale = tmp_path / "x.safetensors", "1.0"
    if what == "not safetensors":
        f.write_bytes(b"not a safetensors file at all")
    elif what == "not a lora":
        save_file({"weight": torch.zeros(2)}, str(f))
    elif what == "text encoder":
        save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
                   "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(256, 4)}, str(f))
    elif what == "scale":
        f, scale = lora_file, "0"
    out = tmp_path / "engines"
    rc = main(["onnx", "--model-dir", str(lora_model_dir), "--out", str(out), "--lora", str(f),
               "--lora-scale", scale, "--stages", "projector", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and words in err[-1] and err[-1].startswith("arc2face-export: error:")
    assert not out.exists()


def test_lora_record_is_checked_by_the_manifest_schema(lora_engines, tmp_path):
    import shutil
    from arc2face_rt.errors import EngineMismatchError

    d = tmp_path / "e"
    shutil.copytree(lora_engines, d)
    m = json.loads((d / mf.MANIFEST).read_text())
    m["lora"]["scale"] = "strong"
    (d / mf.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="'lora' is not"):
        mf.load_manifest(d)


def test_build_engines_of_another_precision_keeps_the_lora_in_its_advice(lora_engines, tmp_path, capsys):
    """build-engines --precision fp16 on an fp32 LoRA folder advised `onnx --model-dir MODEL ... --force`,
    which writes the folder again without its LoRA."""
    import shutil

    from arc2face_export.cli import main as export_main

    d = tmp_path / "e"
    shutil.copytree(lora_engines, d)
    assert export_main(["build-engines", "--out", str(d), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "holds fp32 graphs, and this build needs fp16 ones" in err
    assert "--precision fp16 --lora LORA --lora-scale 1 --force" in err and LORA_FILE in err
    assert "then this build-engines command again" in err     # not a build at the folder's old precision


def test_openvino_int8_on_an_lcm_folder_quantises_its_step_graph_on_lcm_steps(lora_engines, tmp_path, capsys):
    """openvino-int8 on the folder the README recommends (no step_cfg) said "no stage 'step_cfg'"; it now
    quantises the step graph the folder has, calibrated on the folder's own 4 LCM steps, and int8 runs."""
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    import shutil

    from arc2face_export.cli import main as export_main
    from arc2face_rt.cli import main as rt_main

    d = tmp_path / "e"
    shutil.copytree(lora_engines, d)
    assert export_main(["openvino-int8", "--engines", str(d), "--identities", "1", "--per-run", "2"]) == 0
    err = capsys.readouterr().err
    assert "step: recording calibration inputs (1 identities x 2 of 4 lcm steps)" in err and "step_cfg" not in err
    assert set(mf.load_manifest(d)["openvino_int8"]) == {"step"}
    assert rt_main(["generate", "--engines", str(d), "--random-id", "-n", "1", "--backend", "openvino",
                    "--cpu-precision", "int8", "--out", str(tmp_path / "o")]) == 0
    p = read_params(next((tmp_path / "o").glob("*.png")))
    assert (p["scheduler"], p["steps"]) == ("lcm", 4) and p["precision"].startswith("int8")
