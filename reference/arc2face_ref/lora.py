"""LCM-LoRA: fuse a LoRA adapter into the UNet (diffusers + peft, as `load_lora_weights` reads it), and
write random adapters with the released SD1.5 LCM-LoRA's key names and ranks (for tests).

The official Arc2Face few-step recipe loads `latent-consistency/lcm-lora-sdv1-5`
(`pytorch_lora_weights.safetensors`) into the pipeline, fuses it (`fuse_lora(lora_scale=1.0)`) and
samples with `LCMScheduler`, 2-4 steps at guidance 1. Fused, the adapter costs nothing per step: the
exported UNet is an ordinary one with changed weights.

Key format written here: kohya style with diffusers module paths, one triple per adapted layer,
    lora_unet_<module path, dots as underscores>.lora_down.weight   [r, in(, kh, kw)]
    lora_unet_<...>.lora_up.weight                                    [out, r(, 1, 1)]
    lora_unet_<...>.alpha                                             scalar (scale alpha / r)
on the layers LCM-LoRA distillation adapts (diffusers' train_lcm_distill_lora_sd_wds.py targets):
attention q/k/v/out, proj_in/proj_out, feed-forward, resnet conv1/conv2/conv_shortcut/time_emb_proj,
down/upsampler convs, at rank 64: 67.25 M parameters on the SD1.5 UNet (the released adapter's model
card gives 67.5 M; its file is about 135 MB in fp16).
diffusers also reads its own format (`unet.<path>.lora.down.weight` / peft `lora_A`/`lora_B`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from arc2face_rt.errors import MissingWeightsError

LCM_LORA_RANK = 64
LCM_LORA_ALPHA = 8.0            # stored per layer; diffusers scales each layer by alpha / rank
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"     # the released adapter's file name


def lora_target_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{module path: Linear/Conv2d} of the UNet layers the LCM-LoRA adapts."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t)
                                                               for t in LCM_LORA_TARGETS)}


def random_lcm_lora(unet: nn.Module, seed: int = 0, rank: int = LCM_LORA_RANK,
                    alpha: float = LCM_LORA_ALPHA) -> dict[str, torch.Tensor]:
    """A seeded random adapter for `unet` in the kohya key format (see the module docstring). Its
    effect is small but clearly visible in the images (tests check both)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_target_modules(unet).items():
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, nn.Linear):
            down_shape, up_shape = (rank, m.in_features), (m.out_features, rank)
            fan_in = m.in_features
        else:
            kh, kw = m.kernel_size
            down_shape, up_shape = (rank, m.in_channels, kh, kw), (m.out_channels, rank, 1, 1)
            fan_in = m.in_channels * kh * kw
        out[key + ".lora_down.weight"] = torch.randn(down_shape, generator=gen) / fan_in ** 0.5
        out[key + ".lora_up.weight"] = torch.randn(up_shape, generator=gen) * (0.5 / rank ** 0.5)
        out[key + ".alpha"] = torch.tensor(float(alpha))
    return out


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA .safetensors file as a state dict; unreadable files are a MissingWeightsError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no such LoRA file; download the adapter (e.g. latent-consistency/"
                                  f"lcm-lora-sdv1-5, {LORA_FILE}) or write a random one with "
                                  "`arc2face-export random-checkpoint --lcm-lora`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MissingWeightsError(f"{path}: not a readable .safetensors LoRA ({e}); download it again") from None
    if not state or not all("lora" in k or k.endswith(".alpha") for k in state):
        raise MissingWeightsError(f"{path}: not a LoRA adapter (its tensors are not named *lora*); pass the "
                                  f"adapter's {LORA_FILE}")
    if any(k.startswith(("lora_te", "text_encoder.")) for k in state):
        raise MissingWeightsError(f"{path}: adapts the text encoder too; Arc2Face's projector is not a text "
                                  "prompt encoder, only UNet adapters (such as LCM-LoRA) are supported")
    return state


def fuse_lora_into(unet: nn.Module, encoder: nn.Module, lora: str | Path | dict, scale: float = 1.0) -> int:
    """Load `lora` into `unet` through diffusers' `load_lora_weights` (peft), fuse it at `scale` and drop
    the adapter layers: `unet` keeps the fused weights. Returns how many UNet tensors changed. An
    adapter whose keys match no UNet layer is refused (it would silently change nothing)."""
    from diffusers import StableDiffusionPipeline

    state = read_lora(lora) if not isinstance(lora, dict) else dict(lora)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pipe = StableDiffusionPipeline(vae=None, text_encoder=encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(state, adapter_name="lora")
    except (ValueError, KeyError, RuntimeError) as e:     # shape mismatches, unknown formats
        raise MissingWeightsError(f"{lora}: diffusers cannot load this LoRA into the Arc2Face UNet "
                                  f"({' '.join(str(e).split())[:300]}); pass an SD1.5 UNet adapter") from None
    pipe.fuse_lora(components=["unet"], lora_scale=scale)
    pipe.unload_lora_weights()
    after = unet.state_dict()
    if set(after) != set(before):
        raise RuntimeError("unloading the fused LoRA left adapter tensors in the UNet")   # a diffusers change
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    if changed == 0 and scale != 0:
        raise MissingWeightsError(f"{lora}: no UNet weight changed: its keys name no layer of this UNet")
    return changed
