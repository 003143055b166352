"""What `fit` trains: UNet + ID encoder behind the projector the exporter uses, LoRA, merged weights.

    cond  = Arc2FaceProjector(encoder)(id, prompt rows of the encoder's live token table)   [B, 77, 768]
    cond  = uncond (the encoder on [BOS]+[EOS]*76) where the sample's ID is dropped
    eps^  = unet(x_t, t, cond)                                                            [B, 4, h, w]
The projector is arc2face_ref.projector's, the one the ONNX projector is exported from, so what is
trained is exactly what the runtime runs.
"""
from __future__ import annotations

import torch
from torch import nn

from arc2face_rt.errors import InvalidInputError

from ..projector import Arc2FaceProjector, encode_unconditional, prompt_token_embeddings

# LoRA targets: the attention projections (diffusers' and peft's usual choice for SD1.5 and CLIP).
LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],
                "encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}


class Trainee(nn.Module):
    """One module for Accelerate/DDP: both trained models behind one forward."""

    def __init__(self, unet: nn.Module, encoder: nn.Module):
        super().__init__()
        self.unet, self.encoder = unet, encoder
        self.projector = Arc2FaceProjector(encoder)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, id_emb: torch.Tensor, drop: torch.Tensor):
        # noisy: [B, 4, h, w]; t: [B] int; id_emb: [B, 512]; drop: [B] bool -> eps^ [B, 4, h, w]
        cond = self.projector(id_emb, prompt_tokens=prompt_token_embeddings(self.encoder))
        if bool(drop.any()):
            uncond = encode_unconditional(self.encoder)[None].to(cond.dtype)
            cond = torch.where(drop[:, None, None], uncond, cond)
        return self.unet(noisy, t, cond).sample


def set_trainable(unet: nn.Module, encoder: nn.Module, train_unet: bool, train_encoder: bool,
                  lora_rank: int = 0, lora_alpha: float = 0.0) -> list[nn.Parameter]:
    """Mark what trains (whole models, or only LoRA adapters injected into them); return those parameters."""
    for model, on in ((unet, train_unet), (encoder, train_encoder)):
        model.requires_grad_(on and not lora_rank)
    # The token table stays frozen: the projector reads 7 of its 49408 rows (and the unconditional
    # prompt 2), so training it would cost optimizer state for 38 M parameters to move a handful of them.
    encoder.embeddings.token_embedding.requires_grad_(False)
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        trained = [(name, model) for name, model, on in (("unet", unet, train_unet), ("encoder", encoder, train_encoder))
                   if on]
        _check_lora_rank(trained, lora_rank)
        for name, model in trained:
            cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                             target_modules=LORA_TARGETS[name])
            inject_adapter_in_model(cfg, model)
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
    return [p for m in (unet, encoder) for p in m.parameters() if p.requires_grad]


def _check_lora_rank(trained: list[tuple[str, nn.Module]], rank: int) -> None:
    """Refuse a rank above every adapted layer's min(in, out): an adapter's update B @ A has at most that
    rank, so past the widest layer's a larger rank adds nothing anywhere but memory (100000 on the tiny
    model was killed for memory without a word). SD1.5's UNet: 1280; its text encoder: 768."""
    widths = [min(m.in_features, m.out_features) for name, model in trained for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in LORA_TARGETS[name])]
    if widths and rank > max(widths):
        raise InvalidInputError(f"--lora-rank {rank}: above every adapted layer's width (at most {max(widths)} "
                                f"features), where a larger rank adds nothing but memory; use at most {max(widths)}")


def trainable_state(unet: nn.Module, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name ("unet.…", "encoder.…"), for the training state."""
    return {f"{prefix}.{n}": p.detach().clone() for prefix, m in (("unet", unet), ("encoder", encoder))
            for n, p in m.named_parameters() if p.requires_grad}


def load_trainable_state(unet: nn.Module, encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {f"{prefix}.{n}": p for prefix, m in (("unet", unet), ("encoder", encoder))
              for n, p in m.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(f"training state holds {len(state)} tensors, the run trains {len(params)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with any LoRA adapter folded in (W + scale·B·A, peft's own delta), under the
    plain model's names: what the released layout stores. Without LoRA, the state dict as is."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = ()
    deltas = {name: m.get_delta_weight("default") for name, m in model.named_modules()
              if LoraLayer and isinstance(m, LoraLayer)}
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        if ".base_layer." in k:
            owner = k.split(".base_layer.")[0]
            if k.endswith(".base_layer.weight"):
                v = v + deltas[owner].to(v.dtype)
            k = k.replace(".base_layer.", ".")
        out[k] = v.detach().to("cpu", torch.float32).contiguous()
    return out
