"""Seeded random-weight checkpoints in the released Arc2Face layout (see loading.py).

`full` uses the exact SD1.5 UNet/VAE and CLIP-L text architectures (for export and benchmarks);
`tiny` keeps every interface shape (768-wide text tokens, 64x64x4 latents, 512x512 images) with
few, narrow layers, for fast tests and the demo. Random weights give random-looking images.

Optional parts of the release: `controlnet=True` writes controlnet/ (the pose ControlNet: for `full`
the released config's architecture, the SD1.5 ControlNet, i.e. the UNet's encoder with a 3-channel
conditioning embedding; for `tiny` the tiny UNet's), `lcm_lora=True` writes
lcm-lora/pytorch_lora_weights.safetensors, a random adapter with the SD1.5 LCM-LoRA's key names and
ranks for this UNet (arc2face_ref.lora).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from arc2face_rt.atomic import (atomic_write, naming_output, remove_stale_temps, set_usual_modes, temp_dir,
                               undo_new_folders)
from arc2face_rt.errors import InvalidInputError, OutputExistsError
from arc2face_rt.outputs import check_output_dir
from arc2face_rt.schedulers import SD15_SCHEDULER_CONFIG

from .face_models import DETECTOR_FILE, RECOGNIZER_FILE

_UNET_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
_VAE_BLOCKS = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)

CONFIGS = {
    # SD1.5 (runwayml/stable-diffusion-v1-5) UNet, VAE; CLIP ViT-L/14 text model.
    "full": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32, **_UNET_BLOCKS),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
                 **_VAE_BLOCKS),
        encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    ),
    "tiny": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), cross_attention_dim=768, attention_head_dim=8,
                  norm_num_groups=32,
                  # attention only at 32x32 (SD1.5 also attends at 64x64): keeps the demo fast on a CPU
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=1,
                 block_out_channels=(8, 8, 16, 16), norm_num_groups=8, scaling_factor=0.18215,
                 **_VAE_BLOCKS),
        encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    ),
}


# ControlNet conditioning embedding (512x512 image -> 64x64 features, three stride-2 convs):
# the released/SD1.5 channels, and narrow ones for the tiny model.
CONTROLNET_EMBEDDING = {"full": (16, 32, 96, 256), "tiny": (8, 16, 32, 64)}
LCM_LORA_DIR = "lcm-lora"


def _perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """diffusers zero-initialises some output convs; randomise every parameter a little so no
    stage is trivially zero (a zero UNet would hide errors in the step graph)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _unzero_controlnet_(net: torch.nn.Module, gen: torch.Generator) -> None:
    """A ControlNet starts with zero convolutions (conditioning output, residual projections), and the
    default initialisation shrinks the image's signal through the eight SiLU convolutions of its
    conditioning embedding to nothing. A trained one carries the image through. Give the embedding
    He-scaled weights and the zero convolutions 1/sqrt(fan_in) ones, so that the random ControlNet's
    residuals depend clearly on the condition image (a faint one would hide preprocessing errors)."""
    emb = net.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [emb.conv_in, *emb.blocks]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2 / conv.weight[0].numel()) ** 0.5)
        for conv in [emb.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / conv.weight[0].numel() ** 0.5)


# Everything a random checkpoint of either size holds. `force` replaces a folder only when it is
# empty or holds MARKER and nothing but these: never files this tool did not write.
MARKER = "RANDOM_WEIGHTS.txt"
_OWN_FOLDERS = {"arc2face", "vae", "encoder", "scheduler", "controlnet", LCM_LORA_DIR}
_OWN_FILES = {MARKER, DETECTOR_FILE, RECOGNIZER_FILE, "arc2face/config.json",
              "arc2face/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "encoder/config.json", "encoder/pytorch_model.bin",
              "scheduler/scheduler_config.json", "controlnet/config.json",
              "controlnet/diffusion_pytorch_model.safetensors", f"{LCM_LORA_DIR}/pytorch_lora_weights.safetensors"}


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not a random checkpoint this tool wrote (None when it is one)."""
    if not (folder / MARKER).is_file():
        return f"it has no {MARKER}"
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            ours = _OWN_FOLDERS if p.is_dir() and not p.is_symlink() else _OWN_FILES
            if p.is_symlink() or rel not in ours:
                return f"it holds {rel}, which this tool does not write"
    return None


def _check_target(out: str | Path, force: bool) -> Path:
    """The absolute folder to write, after refusing everything `out` may not be (see write_random_checkpoint)."""
    if not str(out).strip():
        raise InvalidInputError("--out must not be empty; name the folder to write, e.g. --out model")
    given = out
    check_output_dir(out)
    out = Path(out).resolve()                   # `.`, `sub/..` and symbolic links name the real folder
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        where = "the current folder" if out == cwd else "a folder that contains the current folder"
        raise InvalidInputError(f"--out {given}: is {where} ({out}); a checkpoint needs a folder of its own: "
                                "name a new one, e.g. --out model")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"{out}: exists and is not empty; choose another --out, or pass --force to "
                                    "replace a random checkpoint written by this tool")
        why = _not_ours(out)
        if why:
            raise OutputExistsError(f"{out}: is not a random checkpoint written by arc2face-export ({why}); "
                                    "--force replaces only those: choose another --out")
    return out


def write_random_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0, force: bool = False,
                            face_models: bool = True, controlnet: bool = False, lcm_lora: bool = False,
                            say=lambda msg: None) -> Path:
    """Write MODEL_DIR with seeded random weights; return its absolute path.

    An existing folder must be empty, or with `force` a random checkpoint this tool wrote (it holds
    RANDOM_WEIGHTS.txt and only the files listed in _OWN_FILES); anything else is refused, and so is
    the current folder or one that contains it. Everything is written into a temporary folder beside
    `out` and renamed into place at the end: a failure leaves `out` as it was. The checks come before
    the model libraries are imported: a refusal takes a moment, not their import's seconds. `say` hears
    one line once they have passed."""
    if size not in CONFIGS:
        raise InvalidInputError(f"size must be one of {sorted(CONFIGS)}")
    if not 0 <= seed < 2**63:
        raise InvalidInputError(f"--seed must be in 0..2**63-1 (got {seed})")
    out = _check_target(out, force)
    say(f"writing a random-weight {size} checkpoint (seed {seed}) to {out}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    if out.parent.is_dir():
        remove_stale_temps(out.parent)          # what a killed run left beside it
    cfg = CONFIGS[size]
    with undo_new_folders(out.parent):
        tmp = temp_dir(out.parent, out.name)

        def writing(rel: str, library_errors: tuple = ()):
            return naming_output(out / rel, library_errors, staged=(tmp, out))

        try:
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)

            def save_diffusers(sub, model):
                (tmp / sub).mkdir()
                with writing(f"{sub}/config.json"):
                    model.save_config(str(tmp / sub))
                with writing(f"{sub}/diffusion_pytorch_model.safetensors", (SafetensorError,)):
                    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(tmp / sub / "diffusion_pytorch_model.safetensors"))

            unet = UNet2DConditionModel(**cfg["unet"])
            _perturb_(unet, gen)
            save_diffusers("arc2face", unet)
            vae = AutoencoderKL(**cfg["vae"])
            _perturb_(vae, gen)
            save_diffusers("vae", vae)
            del vae
            enc_cfg = CLIPTextConfig(**cfg["encoder"])
            enc = CLIPTextModel(enc_cfg)
            (tmp / "encoder").mkdir()
            with writing("encoder/config.json"):
                enc_cfg.to_json_file(str(tmp / "encoder" / "config.json"))
            # The release stores the encoder as pytorch_model.bin with a "text_model." key prefix.
            with writing("encoder/pytorch_model.bin", (RuntimeError,)):   # torch.save's type for it
                torch.save({f"text_model.{k}": v for k, v in enc.state_dict().items()},
                           tmp / "encoder" / "pytorch_model.bin")
            (tmp / "scheduler").mkdir()
            with writing("scheduler/scheduler_config.json"):
                atomic_write(tmp / "scheduler" / "scheduler_config.json",
                             json.dumps(SD15_SCHEDULER_CONFIG, indent=2).encode())
            if face_models:
                from .face_models import write_face_models
                with writing("."):
                    write_face_models(tmp, seed=seed, size=size)
            # the optional parts last: the base weights do not depend on them
            if controlnet:
                from diffusers import ControlNetModel
                net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING[size],
                                                load_weights_from_unet=False)
                _perturb_(net, gen)
                _unzero_controlnet_(net, gen)
                save_diffusers("controlnet", net)
                del net
            if lcm_lora:
                from .lora import LORA_FILE, random_lcm_lora
                (tmp / LCM_LORA_DIR).mkdir()
                with writing(f"{LCM_LORA_DIR}/{LORA_FILE}", (SafetensorError,)):
                    save_file(random_lcm_lora(unet, seed=seed), str(tmp / LCM_LORA_DIR / LORA_FILE))
            del unet
            with writing(MARKER):
                atomic_write(tmp / MARKER, (
                    f"Random weights (size={size}, seed={seed}) written by arc2face-export random-checkpoint.\n"
                    "Images generated from them are random-looking, not faces.\n").encode())
            set_usual_modes(tmp)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an old checkpoint there is first moved aside and
    deleted only once the new one is in place (put back if the rename fails)."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)                    # a missing or empty folder is replaced at once
        return
    aside = temp_dir(out.parent, out.name)
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)    # what is left is a stale temporary folder: removed next run
