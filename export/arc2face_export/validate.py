"""Validation of an exported stage: onnxruntime against torch on realistic example inputs, at the
stage spec's tolerance. A disagreement is a ValidationError (a bug in the export: report it); NaN/inf
that torch itself computes come from the weights, and are the user's to fix (MissingWeightsError)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arc2face_rt.errors import MissingWeightsError
from arc2face_rt.schedulers import make_schedule
from arc2face_rt.specs import StageSpec


class ValidationError(RuntimeError):
    """An exported graph disagrees with torch beyond its spec's tolerance."""


def example_inputs(spec: StageSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic random inputs for validation: a real DPM-Solver++ coefficient row, unit-scale tensors."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        if t.name == "coeffs":
            feeds[t.name] = make_schedule("dpmpp2m", 25).table()[12]
        elif t.name == "guidance":
            feeds[t.name] = np.array([3.0], np.float32)
        elif t.name == "control":         # an image in [0, 1], as the pipeline feeds it
            feeds[t.name] = rng.uniform(0, 1, t.concrete(batch)).astype(t.dtype)
        elif t.name == "control_scale":
            feeds[t.name] = np.array([0.8], np.float32)
        else:
            feeds[t.name] = rng.standard_normal(t.concrete(batch)).astype(t.dtype)
    return feeds


def validate_stage(module, spec: StageSpec, feeds: dict, path: Path, precision: str, reference) -> dict:
    from arc2face_rt.backends.ort import OrtSession

    got = OrtSession(path, device="cpu").run(feeds)
    with torch.no_grad():
        want = reference(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    want = want if isinstance(want, tuple) else (want,)
    _refuse_nonfinite(spec, [w.numpy() for w in want], "")       # the weights' fault, not the export's
    if module is not reference and not all(np.isfinite(got[t.name]).all() for t in spec.outputs):
        with torch.no_grad():
            own = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        _refuse_nonfinite(spec, [o.numpy() for o in (own if isinstance(own, tuple) else (own,))], precision)
    tol = spec.tolerance[precision]
    worst = 0.0
    for t, w in zip(spec.outputs, want):
        g, w = got[t.name], w.numpy()
        if g.shape != w.shape or g.dtype != np.dtype(t.dtype):
            raise ValidationError(f"{spec.name}.{t.name}: got {g.dtype}{g.shape}, want {t.dtype}{w.shape}")
        if t.dtype == "uint8":
            err = float(np.abs(g.astype(np.int16) - w.astype(np.int16)).max())
        else:
            err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
        if not np.isfinite(err) or err > tol:
            raise ValidationError(f"{spec.name}.{t.name}: error {err:.3g} exceeds tolerance {tol} "
                                  f"({precision}); the export is wrong, please report it")
        worst = max(worst, err)
    metric = "max_abs_grey_levels" if spec.outputs[0].dtype == "uint8" else "relative_l2"
    return {"metric": metric, "value": worst, "tolerance": tol, "batch": next(iter(feeds.values())).shape[0]}


def _refuse_nonfinite(spec: StageSpec, outputs: list, precision: str) -> None:
    """A torch reference output with NaN/inf means the weights (the model's, or a fused LoRA's) make
    them: a MissingWeightsError for the user, not a ValidationError (a bug in the export). `precision`:
    the torch module in the export's precision gave them (fp32 was finite: the weights overflow it)."""
    for t, w in zip(spec.outputs, outputs):
        bad = int(w.size - np.isfinite(w).sum())
        if bad:
            why = (f"torch in {precision} gives NaN/inf too (fp32 does not): the weights overflow {precision}; "
                   "export --precision fp32" if precision else
                   "torch itself gives NaN/inf: the model (or fused LoRA) weights produce non-finite values; "
                   "check or download the weights again, or pass another --lora")
            raise MissingWeightsError(f"export of stage {spec.name}: {bad} of {w.size} values of {t.name} are NaN/inf "
                                      f"for finite example inputs; {why}")
