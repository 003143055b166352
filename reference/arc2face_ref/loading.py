"""Load the released Arc2Face layout from a local folder (never from a hub).

    MODEL_DIR/arc2face/   config.json + diffusion_pytorch_model.safetensors   (UNet, SD1.5 architecture)
    MODEL_DIR/encoder/    config.json + pytorch_model.bin                     (CLIP-L text encoder)
    MODEL_DIR/vae/        config.json + diffusion_pytorch_model.safetensors   (SD1.5 VAE)
    MODEL_DIR/scheduler/  scheduler_config.json                               (SD1.5 scheduler)
    MODEL_DIR/controlnet/ config.json + diffusion_pytorch_model.safetensors   (optional: ControlNet pose)
Either weight format (.safetensors or .bin) is accepted in each folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from arc2face_rt.errors import MissingWeightsError
from arc2face_rt.fileio import loads_json

# folder -> (config file, accepted weight files)
LAYOUT = {
    "arc2face": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "encoder": ("config.json", ("pytorch_model.bin", "model.safetensors")),
    "vae": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "scheduler": ("scheduler_config.json", ()),
}
# Optional folders: read when present (then complete, like the others).
OPTIONAL_LAYOUT = {
    "controlnet": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
}

_FIX = ("download the released weights (README: 'Real weights') or write a random-weight model "
        "with `arc2face-export random-checkpoint --size tiny --out DIR`")


def model_files(model_dir: str | Path) -> list[Path]:
    """The files of a model folder that loading reads; raise MissingWeightsError naming every missing one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingWeightsError(f"{model_dir}: no such model folder; {_FIX}")
    found, missing = [], []
    present = {k: v for k, v in OPTIONAL_LAYOUT.items() if (model_dir / k).is_dir()}
    for sub, (config, weights) in {**LAYOUT, **present}.items():
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


def _first_line(e: BaseException) -> str:
    """A library's message on one line: its first line (torch's run to dozens), with the next when the
    first only introduces it ("...:"), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    line = " ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1]) or type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files raise library-specific errors
        # torch's weights-only refusal opens with advice to load untrusted code; its reason comes later
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        raise MissingWeightsError(f"{path}: unreadable or truncated ({type(e).__name__}: "
                                  f"{reason[1].strip() if reason else _first_line(e)}); download it again") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        what = type(state).__name__ if not isinstance(state, dict) else "a dict that is not {name: tensor}"
        raise MissingWeightsError(f"{path}: holds {what}, not a model's weights (a state dict); download it again")
    return state


def _build(config_path: Path, make):
    """The model `make()` builds from a config file; a config it cannot build from (a JSON list, a value of
    the wrong type or range) is the file's fault, not a bug."""
    try:
        return make()
    except Exception as e:  # the model classes raise whatever their arithmetic hits
        raise MissingWeightsError(f"{config_path}: the model cannot be built from this config ({type(e).__name__}: "
                                  f"{_first_line(e)}); download it again") from e


def _load_weights(model, state: dict, weights: Path, config_path: Path):
    """Load `state` into `model`: every tensor present, of the shape the config gives, and floating point
    where the model's is (load_state_dict would cast integers silently: weights of whole numbers)."""
    own = model.state_dict()
    ints = [k for k, v in state.items() if k in own and own[k].is_floating_point()
            and isinstance(v, torch.Tensor) and not v.is_floating_point()]
    if ints:
        raise MissingWeightsError(f"{weights}: {ints[0]} is {str(state[ints[0]].dtype).removeprefix('torch.')}"
                                  f"{f', and {len(ints) - 1} more tensors are not floating point' if len(ints) > 1 else ''}"
                                  "; model weights are floating point: download it again")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:               # size mismatches, listed one per line
        detail = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise MissingWeightsError(f"{weights}: does not match {config_path} ({detail[0] if detail else _first_line(e)}"
                                  f"{f', and {len(detail) - 1} more' if len(detail) > 1 else ''}); download both "
                                  "again") from e
    if missing or unexpected:
        raise MissingWeightsError(
            f"{weights}: does not match {config_path} (missing {len(missing)} tensors, e.g. "
            f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}); download both again")
    return model


def _config_object(config_path: Path) -> dict:
    """A model's config.json as a JSON object, or MissingWeightsError naming the file. Plain JSON: no
    model library is imported for it, so a broken config is refused at once."""
    try:
        config = loads_json(config_path.read_text())
    except (ValueError, OSError) as e:
        raise MissingWeightsError(f"{config_path}: unreadable or invalid ({_first_line(e)}); download it again") from e
    if not isinstance(config, dict):
        raise MissingWeightsError(f"{config_path}: holds a JSON {type(config).__name__}, not a model config (an "
                                  "object); download it again")
    return config


# What the exported graphs fix (latents [B, 4, 64, 64], the ID encoder's output [B, 77, 768]) per part:
# (key, the default diffusers/transformers use where a config leaves it out, Arc2Face's value)
_FIXED = {
    "arc2face": (("in_channels", 4, 4), ("out_channels", 4, 4), ("cross_attention_dim", 1280, 768)),
    "vae": (("latent_channels", 4, 4),),
    "encoder": (("hidden_size", 512, 768),),
    "controlnet": (("in_channels", 4, 4), ("conditioning_channels", 3, 3), ("cross_attention_dim", 1280, 768)),
}
# numbers a config may hold that must be positive and finite: (part, key, default)
_POSITIVE = (("vae", "scaling_factor", 0.18215), ("encoder", "layer_norm_eps", 1e-5))


def check_parts(model_dir: Path, configs: dict[str, dict]) -> None:
    """Refuse parts each valid on its own that are not one Arc2Face model (a UNet for 8-channel
    latents, a text encoder of another width, a VAE scale of null or 0): they failed deep inside
    torch, or exported silently wrong. `configs`: folder name -> its config.json object."""
    for part, keys in _FIXED.items():
        for key, default, want in keys if part in configs else ():
            got = configs[part].get(key, default)
            if got != want or isinstance(got, bool):
                raise MissingWeightsError(
                    f"{model_dir / part / 'config.json'}: {key} is {got!r}, where Arc2Face (Stable Diffusion 1.5) "
                    f"has {want}, which the exported graphs fix (latents [B, 4, 64, 64], the ID encoder's output "
                    f"[B, 77, 768]): these are not the parts of one Arc2Face model; {_FIX}")
    for part, key, default in _POSITIVE:
        got = configs[part].get(key, default) if part in configs else default
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not 0 < got < float("inf"):
            raise MissingWeightsError(f"{model_dir / part / 'config.json'}: {key} is {got!r}, not a positive number "
                                      f"(Stable Diffusion 1.5 has {default}); download it again")


def _from_config(cls, folder: Path):
    """`cls` built from folder/config.json, with its initial (random) weights."""
    config_path = folder / "config.json"
    _config_object(config_path)
    try:
        config = cls.load_config(str(folder))
    except Exception as e:
        raise MissingWeightsError(f"{config_path}: unreadable or invalid ({_first_line(e)}); download it again") from e
    return _build(config_path, lambda: cls.from_config(config))


def _load_diffusers(cls, folder: Path, weights: Path, dtype):
    model = _load_weights(_from_config(cls, folder), _read_state_dict(weights), weights, folder / "config.json")
    return cast(model, dtype).eval()


def unet_skeleton(model_dir: str | Path) -> torch.nn.Module:
    """The Arc2Face UNet built from MODEL_DIR/arc2face/config.json on torch's meta device: every layer
    with its shape, no weight read and no memory used (an adapter is checked against it in a fraction
    of a second, before the model is loaded)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return _from_config(UNet2DConditionModel, Path(model_dir) / "arc2face")


def unet_weights_mismatch(model_dir: str | Path) -> str | None:
    """Why MODEL_DIR's UNet weights do not fit its config, read from the safetensors header alone (no
    weight loaded), or None when they fit or the weights are not a safetensors file (checked at load)."""
    folder = Path(model_dir) / "arc2face"
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        want = {k: tuple(v.shape) for k, v in unet_skeleton(model_dir).state_dict().items()}
    except MissingWeightsError as e:
        return str(e)
    except Exception as e:      # an unreadable header: the load says so in full
        return f"{weights}: unreadable ({_first_line(e)}); download it again"
    bad = [k for k in want if have.get(k) != want[k]]
    if not bad:
        return None
    return (f"{weights}: does not match {folder / 'config.json'} ({bad[0]}: {list(have.get(bad[0], []))} in the file, "
            f"{list(want[bad[0]])} by the config, and {len(bad) - 1} more); download both again")


def cast(model, dtype):
    """`model.to(dtype)` for a diffusers model, without the warning diffusers' `to` (0.42) prints on every
    dtype cast even when none of the model's modules must stay fp32 (it printed two lines before every
    `fit`); a model that keeps modules in fp32 goes through diffusers' own `to`."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(dtype)
    return torch.nn.Module.to(model, dtype)


def load_encoder(folder: Path, weights: Path, dtype=torch.float32):
    from transformers import CLIPTextConfig, CLIPTextModel

    config_path = folder / "config.json"
    try:
        config = CLIPTextConfig.from_json_file(str(config_path))
    except Exception as e:
        raise MissingWeightsError(f"{config_path}: unreadable or invalid ({_first_line(e)}); download it again") from e
    config._attn_implementation = "eager"  # exact reference math; also what exports cleanly
    model = _build(config_path, lambda: CLIPTextModel(config))
    state = _read_state_dict(weights)
    # The release was saved by transformers 4.x with a "text_model." prefix (CLIPTextModel wrapper).
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    return _load_weights(model, state, weights, config_path).to(dtype).eval()


def read_scheduler_config(path: Path) -> dict:
    """scheduler_config.json, checked by building every sampler the runtime offers from it (an export
    whose config the runtime cannot use would be refused by every run)."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_rt.schedulers import SCHEDULERS, make_schedule

    try:
        config = loads_json(path.read_text())
    except ValueError as e:
        raise MissingWeightsError(f"{path}: not valid JSON ({e}); download it again") from e
    if not isinstance(config, dict):
        raise MissingWeightsError(f"{path}: holds {type(config).__name__}, not a scheduler config object; download it "
                                  "again (Arc2Face ships Stable Diffusion 1.5's scheduler_config.json)")
    for name in SCHEDULERS:
        try:
            make_schedule(name, 1, config)
        except (InvalidInputError, ValueError, TypeError, ArithmeticError) as e:   # numpy on odd values
            raise MissingWeightsError(f"{path}: unusable ({e}); download it again (Arc2Face ships Stable "
                                      "Diffusion 1.5's scheduler_config.json)") from None
    return config


@dataclass
class Arc2FaceModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    encoder: torch.nn.Module
    scheduler_config: dict
    model_dir: Path
    controlnet: torch.nn.Module | None = None     # ControlNet (pose), when the folder has controlnet/


def load_models(model_dir: str | Path, dtype=torch.float32) -> Arc2FaceModels:
    """Every model of MODEL_DIR. The files and configs are checked before the model libraries are
    imported (seconds), so a missing file or a broken config is refused at once."""
    model_dir = Path(model_dir)
    found = model_files(model_dir)
    files = {p.parent.name: p for p in found if p.name != "config.json"}
    scheduler_config = read_scheduler_config(model_dir / "scheduler" / "scheduler_config.json")
    check_parts(model_dir, {p.parent.name: _config_object(p) for p in found if p.name == "config.json"})
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    return Arc2FaceModels(
        unet=_load_diffusers(UNet2DConditionModel, model_dir / "arc2face", files["arc2face"], dtype),
        vae=_load_diffusers(AutoencoderKL, model_dir / "vae", files["vae"], dtype),
        encoder=load_encoder(model_dir / "encoder", files["encoder"], dtype),
        scheduler_config=scheduler_config,
        model_dir=model_dir,
        controlnet=(_load_diffusers(ControlNetModel, model_dir / "controlnet", files["controlnet"], dtype)
                    if "controlnet" in files else None),
    )
