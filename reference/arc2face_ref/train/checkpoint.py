"""Checkpoints of a run, each a complete model folder in the released layout plus the training state:

    RUN/checkpoint-N/arc2face/         config.json + diffusion_pytorch_model.safetensors   (the UNet)
    RUN/checkpoint-N/encoder/          config.json + pytorch_model.bin ("text_model." keys, as released)
    RUN/checkpoint-N/vae/, scheduler/  the base model's, unchanged (the VAE is never trained)
    RUN/checkpoint-N/*.onnx            the base model folder's face models, when it has them
    RUN/checkpoint-N/training_state/state.pt   step, optimizer, LR schedule, EMA, config, and the raw
                                       trained tensors when the folders above do not hold them (LoRA:
                                       they hold merged weights; EMA: they hold the EMA weights)
so `arc2face-export onnx --model-dir RUN/checkpoint-N` exports it and `--resume` continues from it.
A checkpoint is built in a temporary folder beside its final name and renamed into place when complete:
a killed run leaves the previous checkpoints intact and no half-written one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from arc2face_rt.atomic import is_temp_name, naming_output, set_usual_modes, temp_dir
from arc2face_rt.errors import InvalidInputError

from ..face_models import DETECTOR_FILE, RECOGNIZER_FILE
from .model import merged_state_dict

STATE = "training_state/state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run: str | Path) -> dict[int, Path]:
    """The complete checkpoints of a run by step."""
    run = Path(run)
    found = {}
    if run.is_dir():
        for p in run.iterdir():
            m = _NAME.match(p.name)
            if m and (p / STATE).is_file():
                found[int(m[1])] = p
    return dict(sorted(found.items()))


RUN_FILES = ("metrics.csv", "tensorboard", "validation")     # what fit writes besides its checkpoints


def check_resumable(run: str | Path) -> None:
    """Refuse a --resume into a folder holding what fit does not write there (a user's file, a file or
    folder named like a checkpoint that is not a complete one): resuming would replace it."""
    run = Path(run)
    if not run.is_dir():
        return
    for p in sorted(run.iterdir()):
        if p.name in RUN_FILES or is_temp_name(p.name):
            continue
        if _NAME.match(p.name):
            if not (p / STATE).is_file():
                raise InvalidInputError(f"--resume: {p} is not a complete checkpoint (no {STATE}): damaged or not "
                                        "fit's; move it away, then run again (fit resumes from the newest complete "
                                        "checkpoint, or starts the run afresh without one)")
            continue
        raise InvalidInputError(f"--resume: {run} holds {p.name}, which fit does not write; resuming could replace "
                                "what is there: move it away, or choose another --out for a new run")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)               # same file system: no second copy of an unchanged file
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(run: Path, step: int, unet, encoder, base_dir: Path, state: dict) -> Path:
    """Write RUN/checkpoint-STEP (see the module doc) from the modules as they are now; return it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    final = run / f"checkpoint-{step}"
    tmp = temp_dir(run, final.name)
    try:
        (tmp / "arc2face").mkdir()
        with naming_output(final / "arc2face", (SafetensorError,), staged=(tmp, final)):
            unet.save_config(str(tmp / "arc2face"))
            save_file(merged_state_dict(unet), str(tmp / "arc2face" / "diffusion_pytorch_model.safetensors"))
        (tmp / "encoder").mkdir()
        with naming_output(final / "encoder", (RuntimeError,), staged=(tmp, final)):
            encoder.config.to_json_file(str(tmp / "encoder" / "config.json"))
            torch.save({f"text_model.{k}": v for k, v in merged_state_dict(encoder).items()},
                       tmp / "encoder" / "pytorch_model.bin")
            (tmp / STATE).parent.mkdir()
            torch.save(state, tmp / STATE)
            (tmp / "training_state" / "config.json").write_text(json.dumps(state["config"], indent=1))
            set_usual_modes(tmp)        # before linking: the base model's files keep their own modes
            for sub in ("vae", "scheduler"):
                shutil.copytree(base_dir / sub, tmp / sub, copy_function=_link_or_copy)
            for name in (DETECTOR_FILE, RECOGNIZER_FILE):
                if (base_dir / name).is_file():
                    _link_or_copy(base_dir / name, tmp / name)
        if final.exists():              # an older run's checkpoint of this step: replaced only once complete
            aside = temp_dir(run, final.name)
            os.replace(final, aside / "old")
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    if keep > 0:
        for step, path in list(checkpoints(run).items())[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_state(path: Path) -> dict:
    """The training state of checkpoint `path`; InvalidInputError when it is damaged or not ours."""
    bad = f"--resume: {path / STATE} is damaged"
    fix = "restore it, move that checkpoint folder away to resume from the one before, or start a new --out"
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidInputError(f"--resume: {path / STATE} is missing; {fix}") from None
    except Exception as e:          # noqa: BLE001 - torch's unpickler raises many types for a damaged file
        raise InvalidInputError(f"{bad} ({' '.join(str(e).split())[:120]}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise InvalidInputError(f"{bad} (not a training state of arc2face-train); {fix}")
    return state
