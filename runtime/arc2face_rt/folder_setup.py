"""What an engines folder and this machine decide before a run: the folder's sampling defaults, the
backend `--backend auto` picks, and whether the folder's scheduler config can make the tables."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import EngineMismatchError, InvalidInputError
from .schedulers import make_schedule
from .specs import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, LCM_LORA_DEFAULTS

BACKENDS = ("auto", "ort", "trt", "openvino")
DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger("arc2face_rt")


def folder_defaults(manifest: dict | None) -> dict:
    """The sampling defaults of an engines folder: LCM (scheduler, steps, guidance) when an LCM-LoRA
    was fused into it (manifest "lora"), else Arc2Face's own."""
    if manifest and manifest.get("lora"):
        return dict(LCM_LORA_DEFAULTS)
    return {"scheduler": DEFAULT_SCHEDULER, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}


def sampling_options(engines, chosen: dict) -> tuple[dict, str | None]:
    """The scheduler, steps and guidance of a run on `engines`: what the user `chosen` (None: not given)
    over the folder's defaults (`folder_defaults`); and, for a folder with a LoRA fused, the line that
    says which defaults it took, else None. A manifest that does not load gives Arc2Face's defaults
    here; opening the folder reports it, with its fix."""
    from .manifest import load_manifest

    try:
        m = load_manifest(engines)
    except Exception:  # noqa: BLE001 - reported by the pipeline that opens the folder
        m = None
    defaults, lora = folder_defaults(m), (m or {}).get("lora")
    given = {k: v for k, v in chosen.items() if k in defaults and v is not None}
    note = None
    if lora:
        unset = [f"--{k} {defaults[k]:g}" if k != "scheduler" else f"--{k} {defaults[k]}" for k in defaults
                 if k not in given]
        note = (f"engines with LoRA {lora['file']} fused (scale {lora['scale']:g}): "
                + (f"LCM-LoRA defaults {' '.join(unset)}" if unset else "all sampling options given")
                + (f"; given: {', '.join(f'--{k} {v}' for k, v in given.items())}" if given else ""))
    return {**defaults, **given}, note


def check_backend_device(backend: str, device: str) -> None:
    """Refuse a --backend / --device pair no machine can honour."""
    if backend == "openvino" and device == "cuda":
        raise InvalidInputError("--backend openvino runs on the CPU; drop --device cuda or use --backend ort/trt")


def pick_backend(engines_dir: Path, manifest: dict, backend: str, device: str = "auto") -> str:
    """`backend` (TensorRT checked usable here), or for "auto": TensorRT when the folder has plans and TensorRT can run on this GPU
    (`backends.trt.unusable_reason`); else ONNX Runtime when it can use a GPU; else (no usable GPU)
    OpenVINO when installed; else ONNX Runtime on the CPU."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    check_backend_device(backend, device)
    if backend == "trt":                # no GPU or library decides the outcome: say so before the folder's state
        from .backends.trt.plan import require_usable

        require_usable()
    if backend != "auto":
        return backend
    if manifest.get("plans") and device != "cpu":
        from .backends.trt import unusable_reason

        reason = unusable_reason()
        if reason is None:
            return "trt"
        log.info("--backend auto: not TensorRT (%s)", reason)
    if device != "cuda" and not ort_gpu_usable(device):
        from .backends.openvino import openvino_installed

        if openvino_installed():
            return "openvino"
    return "ort"


def ort_gpu_usable(device: str) -> bool:
    """Whether ONNX Runtime has its CUDA provider and a CUDA device is present."""
    if device == "cpu":
        return False
    try:
        import onnxruntime
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False
    from .backends import cuda

    return cuda.device_count() > 0


def check_folder_scheduler(engines_dir: Path, manifest: dict, name: str = DEFAULT_SCHEDULER) -> None:
    """Raise EngineMismatchError when the folder's scheduler config cannot make `name`'s tables (a
    damaged or foreign config is the folder's fault, not the user's options)."""
    try:
        make_schedule(name, 1, manifest.get("scheduler_config"))
    except InvalidInputError as e:
        raise EngineMismatchError(f"{Path(engines_dir) / 'manifest.json'}: {e}; re-export from a model whose "
                                  "scheduler/scheduler_config.json is valid") from None
