"""Calibration for the Q/DQ step graphs: what each quantised tensor holds over the pipeline's own denoising.

The statistics come from the step graph itself, widened to fp32 (`widen_fp16_to_fp32`: same ops, the
fp16 weights exactly, fp32 arithmetic), with every tensor the placement quantises added as a graph
output. The pipeline (ONNX Runtime, this folder's projector) runs K random identities through every
step of the schedule the engines will serve (default: the folder's sampler, 25 DPM-Solver++ steps, or 4
LCM steps with their noise on an LCM-LoRA folder; guidance 3 for step_cfg on every folder, 1 for step)
with that graph in place of the stage, so calibration sees early, noisy and
late, clean latents in the proportion generation does. Recorded step inputs (`--calib-data`) are
an alternative source.

Per sample and tensor `Stats` keeps max|x|, a percentile of |x| (over at most 2^18 evenly strided
elements: a full sort of every activation at every step would dominate calibration) and, for the
inputs of MatMuls (SmoothQuant), max|x| per channel of the last axis. Over samples each is reduced
by its maximum.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_files import save_model

log = logging.getLogger(__name__)

CALIB_METHODS = ("max", "percentile")
_PERCENTILE_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Calibration:
    """Where the calibration samples come from and how a tensor's range is read from them."""
    identities: int = 8           # K random identities ...
    steps: int = 25               # ... x every step of the served schedule
    scheduler: str = "dpmpp2m"    # ... of this sampler ("lcm" for an LCM-LoRA folder)
    guidance: float = 3.0         # step_cfg's guidance (step runs without CFG)
    seed: int = 0
    percentile: float = 99.99     # the percentile of |x| the "percentile" method reads
    data_sha256: str | None = None  # sha256 of the recorded step inputs (--calib-data); None: the pipeline

    def record(self) -> dict:
        return asdict(self)


class Stats:
    """Per-tensor ranges over calibration samples (see the module docstring)."""

    def __init__(self, tensors: Iterable[str], channel_tensors: Iterable[str], percentile: float = 99.99):
        self.percentile = percentile
        self.max = {t: 0.0 for t in tensors}
        self.pct = dict(self.max)
        self.chan: dict[str, np.ndarray] = {t: None for t in channel_tensors}
        self.samples = 0

    def update(self, values: dict[str, np.ndarray]) -> None:
        for t in self.max:
            a = np.abs(np.asarray(values[t], np.float32))
            self.max[t] = max(self.max[t], float(a.max()))
            flat = a.ravel()
            if flat.size > _PERCENTILE_ELEMENTS:
                flat = flat[:: flat.size // _PERCENTILE_ELEMENTS]
            self.pct[t] = max(self.pct[t], float(np.percentile(flat, self.percentile)))
            if t in self.chan:
                c = a.reshape(-1, a.shape[-1]).max(0)
                self.chan[t] = c if self.chan[t] is None else np.maximum(self.chan[t], c)
        self.samples += 1

    def amax(self, t: str, method: str = "max") -> float:
        return (self.pct if method == "percentile" else self.max)[t]

    def channel_amax(self, t: str) -> np.ndarray:
        return self.chan[t]


# ----------------------------------------------------------------------------- graphs

def widen_fp16_to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make an fp16-inside graph compute in fp32 (same ops, same I/O, in place), so ONNX Runtime runs
    it on any CPU; Q/DQ nodes stay (their fp16 scales become fp32: fake quantisation in fp32)."""
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        if node.op_type in ("Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform"):
            for attr in node.attribute:
                if attr.name == "dtype" and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.FLOAT
    del g.value_info[:]   # stale fp16 annotations
    return model


def observed_graph(src: Path, dst: Path, tensors: Iterable[str]) -> None:
    """`src` widened to fp32, with `tensors` added as outputs after the graph's own, written to `dst`."""
    model = widen_fp16_to_fp32(onnx.load(str(src)))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in have)
    save_model(model, dst)


class ObservingSession:
    """A step session (the pipeline's interface: input/output names, run(feeds) -> dict) over an
    observed graph: feeds each run's extra outputs to `stats` and keeps the first `keep` feeds."""

    def __init__(self, sess, stage_outputs: list[str], stats: Stats, keep: int = 0):
        self.sess, self.stats, self.keep = sess, stats, keep
        self.input_names, self.output_names = sess.input_names, list(stage_outputs)
        self.kept: list[dict] = []

    def run(self, feeds: dict) -> dict:
        if len(self.kept) < self.keep:
            self.kept.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self.sess.run(feeds)
        self.stats.update(out)
        return {k: out[k] for k in self.output_names}

    def close(self) -> None:
        self.sess.close()


def run_pipeline(engines_dir: Path, stage: str, session: ObservingSession, cal: Calibration,
                 device: str = "auto") -> None:
    """Drive `session` (in place of `stage`) through the pipeline: cal.identities identities x cal.steps."""
    from arc2face_rt.pipeline import Arc2FacePipeline, image_noise, random_identity

    guidance = cal.guidance if stage == "step_cfg" else 1.0
    with Arc2FacePipeline(engines_dir, backend="ort", device=device) as pipe:
        pipe._sessions[stage] = session
        sched = pipe.schedule(cal.scheduler, cal.steps)
        for i in range(cal.identities):
            log.info("calibration %s: identity %d/%d, %d %s steps at guidance %g", stage, i + 1, cal.identities,
                     cal.steps, cal.scheduler, guidance)
            cond = pipe.project(random_identity(cal.seed + 1000 + i)[None])
            x, noise = image_noise(cal.seed + i, 0, sched)       # noise: for the samplers that add it (LCM)
            pipe.denoise(cond, x[None], sched, guidance, noise=None if noise is None else noise[:, None])


class _RecordingSession:
    """Wraps a step session and keeps a copy of the feeds of the steps listed in `keep`."""

    def __init__(self, sess, keep: set[int], out: list, steps: int):
        self.sess, self.keep, self.out, self.steps, self.k = sess, keep, out, steps, 0
        self.input_names, self.output_names = sess.input_names, sess.output_names

    def run(self, feeds):
        if self.k % self.steps in self.keep:
            self.out.append({n: np.array(v, copy=True) for n, v in feeds.items()})
        self.k += 1
        return self.sess.run(feeds)

    def close(self):
        self.sess.close()


def pipeline_calibration_feeds(engines_dir: str | Path, stage: str, identities: int = 8, steps: int = 25,
                               per_run: int = 4, seed: int = 0, device: str = "auto",
                               scheduler: str = "dpmpp2m") -> list[dict]:
    """Step-graph inputs the pipeline itself produces, kept as arrays (the OpenVINO int8 path's NNCF
    takes samples, not ranges): `identities` random identities, `scheduler`'s schedule of `steps`
    steps, inputs kept at `per_run` evenly spaced steps of each run. Runs with ONNX Runtime on the
    folder's own graphs; guidance 3 for step_cfg, 1 for step."""
    from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

    guidance = 3.0 if stage == "step_cfg" else 1.0
    keep = {int(round(v)) for v in np.linspace(0, steps - 1, per_run)}
    feeds: list[dict] = []
    with Arc2FacePipeline(engines_dir, backend="ort", device=device) as pipe:
        pipe._sessions[stage] = _RecordingSession(pipe.session(stage), keep, feeds, steps)
        for i in range(identities):
            log.info("calibration: %s, identity %d/%d (%d steps)", stage, i + 1, identities, steps)
            pipe.generate(random_identity(seed + 1000 + i), 1,
                          GenerationOptions(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed + i,
                                            batch_size=1))
    return feeds


def output_drift(ref, test, feeds: Iterable[dict]) -> dict:
    """{output: {"rel_l2", "psnr_db"}} of session `test` against session `ref` over `feeds` (float32
    inputs, float64 sums; PSNR peak = the range of the reference output). Sessions offer input_names,
    output_names and run(feeds) -> {name: array}."""
    acc: dict[str, list] = {}
    for feed in feeds:
        f = {k: np.ascontiguousarray(v, np.float32) for k, v in feed.items() if k in test.input_names}
        r_out, t_out = ref.run(f), test.run(f)
        for n in test.output_names:
            r, q = r_out[n].astype(np.float64), t_out[n].astype(np.float64)
            a = acc.setdefault(n, [0.0, 0.0, np.inf, -np.inf, 0])
            a[0] += float(np.sum((q - r) ** 2))
            a[1] += float(np.sum(r ** 2))
            a[2], a[3] = min(a[2], float(r.min())), max(a[3], float(r.max()))
            a[4] += r.size
    out = {}
    for n, (se, sr, lo, hi, cnt) in acc.items():
        rmse = np.sqrt(se / max(cnt, 1))
        out[n] = {"rel_l2": float(np.sqrt(se / sr)) if sr > 0 else float("nan"),
                  "psnr_db": float(20 * np.log10((hi - lo) / rmse)) if rmse > 0 else float("inf")}
    return out
