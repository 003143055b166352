"""Seeded random-weight checkpoints in the released Arc2Face layout (see loading.py).

`full` uses the exact SD1.5 UNet/VAE and CLIP-L text architectures (for export and benchmarks);
`tiny` keeps every interface shape (768-wide text tokens, 64x64x4 latents, 512x512 images) with
few, narrow layers, for fast tests and the demo. Random weights give random-looking images.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from arc2face_rt.atomic import remove_stale_temps, temp_dir
from arc2face_rt.errors import InvalidInputError, OutputExistsError
from arc2face_rt.outputs import check_output_dir
from arc2face_rt.schedulers import SD15_SCHEDULER_CONFIG

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


def _perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """diffusers zero-initialises some output convs; randomise every parameter a little so no
    stage is trivially zero (a zero UNet would hide errors in the step graph)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def write_random_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0, force: bool = False,
                            face_models: bool = True) -> Path:
    """Write MODEL_DIR with seeded random weights. Refuses an existing folder unless `force`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in CONFIGS:
        raise InvalidInputError(f"size must be one of {sorted(CONFIGS)}")
    out = check_output_dir(out)
    if out.exists():
        remove_stale_temps(out.parent)                  # what a killed run left beside it
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: exists and is not empty; choose another --out or pass --force")
    cfg = CONFIGS[size]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, out.name)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for sub, cls, kwargs in (("arc2face", UNet2DConditionModel, cfg["unet"]),
                                 ("vae", AutoencoderKL, cfg["vae"])):
            model = cls(**kwargs)
            _perturb_(model, gen)
            (tmp / sub).mkdir()
            model.save_config(str(tmp / sub))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / sub / "diffusion_pytorch_model.safetensors"))
            del model
        enc_cfg = CLIPTextConfig(**cfg["encoder"])
        enc = CLIPTextModel(enc_cfg)
        (tmp / "encoder").mkdir()
        enc_cfg.to_json_file(str(tmp / "encoder" / "config.json"))
        # The release stores the encoder as pytorch_model.bin with a "text_model." key prefix.
        torch.save({f"text_model.{k}": v for k, v in enc.state_dict().items()},
                   tmp / "encoder" / "pytorch_model.bin")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
        if face_models:
            from .face_models import write_face_models
            write_face_models(tmp, seed=seed, size=size)
        (tmp / "RANDOM_WEIGHTS.txt").write_text(
            f"Random weights (size={size}, seed={seed}) written by arc2face-export random-checkpoint.\n"
            "Images generated from them are random-looking, not faces.\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
