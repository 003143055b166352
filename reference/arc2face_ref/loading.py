"""Load the released Arc2Face layout from a local folder (never from a hub).

    MODEL_DIR/arc2face/   config.json + diffusion_pytorch_model.safetensors   (UNet, SD1.5 architecture)
    MODEL_DIR/encoder/    config.json + pytorch_model.bin                     (CLIP-L text encoder)
    MODEL_DIR/vae/        config.json + diffusion_pytorch_model.safetensors   (SD1.5 VAE)
    MODEL_DIR/scheduler/  scheduler_config.json                               (SD1.5 scheduler)
Either weight format (.safetensors or .bin) is accepted in each folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from arc2face_rt.errors import MissingWeightsError

# folder -> (config file, accepted weight files)
LAYOUT = {
    "arc2face": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "encoder": ("config.json", ("pytorch_model.bin", "model.safetensors")),
    "vae": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "scheduler": ("scheduler_config.json", ()),
}

_FIX = ("download the released weights (README: 'Real weights') or write a random-weight model "
        "with `arc2face-export random-checkpoint --size tiny --out DIR`")


def model_files(model_dir: str | Path) -> list[Path]:
    """The files of a model folder that loading reads; raise MissingWeightsError naming every missing one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingWeightsError(f"{model_dir}: no such model folder; {_FIX}")
    found, missing = [], []
    for sub, (config, weights) in LAYOUT.items():
        cfg = model_dir / sub / config
        (found if cfg.is_file() else missing).append(cfg)
        if weights:
            have = [model_dir / sub / w for w in weights if (model_dir / sub / w).is_file()]
            if have:
                found.append(have[0])
            else:
                missing.append(model_dir / sub / weights[0])
    if missing:
        names = ", ".join(str(p.relative_to(model_dir)) for p in missing)
        raise MissingWeightsError(f"{model_dir}: missing {names}; {_FIX}")
    return found


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files raise library-specific errors
        raise MissingWeightsError(f"{path}: unreadable or truncated ({type(e).__name__}: {e}); "
                                  "download it again") from e


def _load_diffusers(cls, folder: Path, weights: Path, dtype):
    try:
        config = cls.load_config(str(folder))
    except Exception as e:
        raise MissingWeightsError(f"{folder / 'config.json'}: unreadable ({e}); download it again") from e
    model = cls.from_config(config)
    state = _read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingWeightsError(
            f"{weights}: does not match {folder / 'config.json'} (missing {len(missing)} tensors, e.g. "
            f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}); download both again")
    return model.to(dtype).eval()


def load_encoder(folder: Path, weights: Path, dtype=torch.float32):
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        config = CLIPTextConfig.from_json_file(str(folder / "config.json"))
    except Exception as e:
        raise MissingWeightsError(f"{folder / 'config.json'}: unreadable ({e}); download it again") from e
    config._attn_implementation = "eager"  # exact reference math; also what exports cleanly
    model = CLIPTextModel(config)
    state = _read_state_dict(weights)
    # The release was saved by transformers 4.x with a "text_model." prefix (CLIPTextModel wrapper).
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingWeightsError(
            f"{weights}: does not match {folder / 'config.json'} (missing {missing[:2]}, unexpected "
            f"{unexpected[:2]}); download both again")
    return model.to(dtype).eval()


@dataclass
class Arc2FaceModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    encoder: torch.nn.Module
    scheduler_config: dict
    model_dir: Path


def load_models(model_dir: str | Path, dtype=torch.float32) -> Arc2FaceModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_dir = Path(model_dir)
    files = {p.parent.name: p for p in model_files(model_dir) if p.name != "config.json"}
    sched_path = model_dir / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(sched_path.read_text())
    except ValueError as e:
        raise MissingWeightsError(f"{sched_path}: not valid JSON ({e}); download it again") from e
    return Arc2FaceModels(
        unet=_load_diffusers(UNet2DConditionModel, model_dir / "arc2face", files["arc2face"], dtype),
        vae=_load_diffusers(AutoencoderKL, model_dir / "vae", files["vae"], dtype),
        encoder=load_encoder(model_dir / "encoder", files["encoder"], dtype),
        scheduler_config=scheduler_config,
        model_dir=model_dir,
    )
