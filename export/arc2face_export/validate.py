"""Validation of an exported stage: onnxruntime against torch on realistic example inputs, at the
stage spec's tolerance. A disagreement is a ValidationError (a bug in the export: report it); NaN/inf
that torch itself computes come from the weights, and are the user's to fix (MissingWeightsError).

Weights can also amplify rounding without overflowing: a very strong LoRA (its up-projections x100 on
the tiny model) makes fp32 torch and fp32 ONNX Runtime differ by 3.2e-3 in step_cfg against a 1e-4
tolerance, with neither wrong (torch is 2.9e-3 from float64 there, ONNX Runtime 1.9e-3). So a disagreement is judged once more before it is called a bug (`_arbitrate`): in fp32,
against torch in float64, where ONNX Runtime passes if it is no further from float64 than torch's own
fp32 is (times FLOAT64_SLACK); in fp16, against torch's own fp16, where torch missing the tolerance too,
or the graph no further from fp32 than FLOAT64_SLACK times torch's fp16, means the weights do not survive
fp16 (the user's to fix: export fp32)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arc2face_rt.errors import MissingWeightsError
from arc2face_rt.schedulers import make_schedule
from arc2face_rt.specs import StageSpec


# ONNX Runtime may be this many times further from the higher precision than torch is in the same
# precision: its kernels sum in other orders and fuse differently, and are not wrong for it
FLOAT64_SLACK = 4.0


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
    worst, judged = 0.0, None
    want = [w.numpy() for w in want]
    for i, (t, w) in enumerate(zip(spec.outputs, want)):
        g = got[t.name]
        if g.shape != w.shape or g.dtype != np.dtype(t.dtype):
            raise ValidationError(f"{spec.name}.{t.name}: got {g.dtype}{g.shape}, want {t.dtype}{w.shape}")
        if t.dtype == "uint8":
            err = float(np.abs(g.astype(np.int16) - w.astype(np.int16)).max())
        else:
            err = _rel(g, w)
        if not np.isfinite(err) or err > tol:
            judged = judged or (_arbitrate(module, reference, spec, feeds, got, want, precision, tol)
                                if np.isfinite(err) and t.dtype != "uint8" else None)
            if judged is None:
                raise ValidationError(f"{spec.name}.{t.name}: error {err:.3g} exceeds tolerance {tol} "
                                      f"({precision}); the export is wrong, please report it")
        worst = max(worst, err)
    metric = "max_abs_grey_levels" if spec.outputs[0].dtype == "uint8" else "relative_l2"
    rec = {"metric": metric, "value": worst, "tolerance": tol, "batch": next(iter(feeds.values())).shape[0]}
    if judged:
        rec["float64"] = judged
    return rec


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _arbitrate(module, reference, spec: StageSpec, feeds: dict, got: dict, want: list, precision: str,
               tol: float) -> dict | None:
    """A second judgement of a graph that missed the tolerance (module docstring). Returns the fp32
    verdict that lets it pass ({"onnxruntime": .., "torch": ..}: each one's distance from float64, worst
    output), raises MissingWeightsError where fp16 is the weights' problem, and returns None (a bug)
    otherwise. FLOAT64_SLACK: how many times further than torch ONNX Runtime may be in each test."""
    names = [t.name for t in spec.outputs]
    floats = [i for i, t in enumerate(spec.outputs) if t.dtype != "uint8"]
    inputs = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
    if precision == "fp16" and module is not reference:
        with torch.no_grad():
            own = module(*inputs)
        own = [o.float().numpy() for o in (own if isinstance(own, tuple) else (own,))]
        _refuse_nonfinite(spec, own, precision)       # torch's fp16 overflows where the graph's did not
        ours = max(_rel(got[names[i]], want[i]) for i in floats)
        theirs = max(_rel(own[i], want[i]) for i in floats)
        if theirs > tol or ours <= FLOAT64_SLACK * theirs:
            raise MissingWeightsError(
                f"export of stage {spec.name}: fp16 loses too much of these weights: the graph is {ours:.3g} away "
                f"from fp32 and torch's own fp16 {theirs:.3g} (tolerance {tol}); a fused LoRA at this scale, or "
                "weights beyond fp16's precision: export --precision fp32, or lower --lora-scale")
        return None
    if precision != "fp32":
        return None
    reference.double()                       # fp32 -> float64 -> fp32 is exact: restored below
    try:
        with torch.no_grad():
            exact = reference(*(x.double() if x.is_floating_point() else x for x in inputs))
    finally:
        reference.float()
    exact = [e.numpy() for e in (exact if isinstance(exact, tuple) else (exact,))]
    ours = max(_rel(got[names[i]], exact[i]) for i in floats)
    theirs = max(_rel(want[i], exact[i]) for i in floats)
    if ours > max(tol, FLOAT64_SLACK * theirs):
        return None
    return {"onnxruntime": ours, "torch": theirs}


def _refuse_nonfinite(spec: StageSpec, outputs: list, precision: str) -> None:
    """A torch reference output with NaN/inf means the weights (the model's, or a fused LoRA's) make
    them: a MissingWeightsError for the user, not a ValidationError (a bug in the export). `precision`:
    the torch module in the export's precision gave them (fp32 was finite: the weights overflow it)."""
    for t, w in zip(spec.outputs, outputs):
        bad = int(w.size - np.isfinite(w).sum())
        if bad:
            why = (f"torch in {precision} gives NaN/inf (fp32 does not): the weights overflow {precision}; "
                   "export --precision fp32" if precision else
                   "torch itself gives NaN/inf: the model (or fused LoRA) weights produce non-finite values; "
                   "check or download the weights again, or pass another --lora")
            raise MissingWeightsError(f"export of stage {spec.name}: {bad} of {w.size} values of {t.name} are NaN/inf "
                                      f"for finite example inputs; {why}")
