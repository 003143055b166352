"""Explicit int8 / FP8 (Q/DQ) step graphs for strongly typed TensorRT engines (`build-engines --precision
int8|fp8`).

Our own ONNX pass (`qdq`) over the folder's **fp16** step graph reproduces the placement of NVIDIA's
Stable Diffusion recipe (TensorRT Model Optimizer PTQ); `calib` measures the ranges on the pipeline's
own trajectories. Why not nvidia-modelopt itself: see engines/README.md ("int8 and FP8 step graphs").
Template: load -> check -> place -> calibrate -> quantise -> save -> record (RECIPE_REVISION).

Files: `<stage>.int8.onnx` / `<stage>.fp8.onnx` (+ `.onnx.data` when large) next to the source graph,
recorded in manifest["quantized"][stage] (int8) / manifest["quantized_fp8"][stage] (fp8) with the
source graph's sha256, the recipe, the calibration size, the layers kept in fp16 and the loss against
the source (both run in fp32 by ONNX Runtime on the first calibration inputs: `fake_quant` twins).
Only those two names are replaced, and only when the manifest records them (`_check_ours`): a file there
that it does not record is someone else's, and is refused, kept.
"""
from __future__ import annotations

import logging
import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import remove_stale_temps, temp_dir, usual_mode
from arc2face_rt.errors import Arc2FaceError, InvalidInputError
from arc2face_rt.integrity import verify_records
from arc2face_rt.specs import STAGES

from . import calib, qdq
from .engines_folder import check_recorded

log = logging.getLogger(__name__)

QUANT_STAGES = ("step_cfg", "step")
RECIPE_REVISION = 2                        # bump when the placement or the numbers change
# 2: residual-add Q/DQ became a recipe option, off by default
SECTIONS = mf.QUANT_SECTIONS              # manifest section per precision
LOSS_FEEDS = 3


@dataclass(frozen=True)
class QuantRecipe:
    """How a step graph is quantised. Defaults follow NVIDIA's SD recipe: int8 with SmoothQuant
    (alpha 0.8) and percentile calibration; FP8 with max calibration and no SmoothQuant (ModelOpt's
    FP8 config: E4M3 has the range int8 lacks). Residual adds get no Q/DQ by default: quantising the
    residual stream per tensor cost 6.8 dB of end-to-end int8 image PSNR on the full-size model (26.8
    instead of 33.6 dB against fp16, below the 30 dB gate; engines/README.md), for a conv + add fusion.
    `level` picks the layers as ModelOpt's diffusers `quant-level` does (qdq.QUANT_LEVELS): 3 quantises
    every conv and Linear outside the fp16 list, 2.5 leaves the attention output projections in fp16, 2
    all attention projections, 1 every Linear (convs only): lower levels trade speed for accuracy."""
    precision: str = "int8"                 # int8 | fp8
    method: str | None = None               # max | percentile; None: percentile (int8), max (fp8)
    smoothquant_alpha: float | None = None  # None: 0.8 for int8, off for fp8; 0: off
    residual_qdq: bool = False              # Q/DQ on residual adds fed by a quantised conv (TensorRT fuses them)
    level: float = 3.0                      # ModelOpt quant level: 1 convs, 2 +FFN, 2.5 +q/k/v, 3 +all Linear

    def resolved(self) -> "QuantRecipe":
        if self.precision not in qdq.QUANT_PRECISIONS:
            raise InvalidInputError(f"precision {self.precision!r}: quantised graphs are {', '.join(qdq.QUANT_PRECISIONS)}")
        method = self.method or ("percentile" if self.precision == "int8" else "max")
        if method not in calib.CALIB_METHODS:
            raise InvalidInputError(f"calibration method {method!r}: choose {', '.join(calib.CALIB_METHODS)}")
        alpha = self.smoothquant_alpha if self.smoothquant_alpha is not None else (0.8 if self.precision == "int8" else 0.0)
        if not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"SmoothQuant alpha {alpha} is outside 0..1 (0 turns it off)")
        level = float(self.level)
        if level not in qdq.QUANT_LEVELS:
            raise InvalidInputError(f"quant level {self.level}: choose {', '.join(f'{v:g}' for v in qdq.QUANT_LEVELS)}")
        return QuantRecipe(self.precision, method, alpha, bool(self.residual_qdq), level)


def quant_onnx_file(stage: str, precision: str) -> str:
    return f"{stage}.{precision}.onnx"


# ----------------------------------------------------------------------------- recorded calibration inputs

def feeds_from_npz(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an .npz holding one array per input name, leading axis = sample.

    Per-sample arrays keep the graph's shapes: x/m_prev/noise [B,4,64,64], cond [B,77,768],
    coeffs [8], guidance [1]; so the npz holds x [S,B,4,64,64], coeffs [S,8], guidance [S,1], ...
    """
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive of named arrays")
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "not an .npz archive" if "pickle" in str(e) else e     # numpy's advice to unpickle it: never
        raise InvalidInputError(f"{path}: cannot read calibration data ({why}); pass an .npz written by the "
                                "pipeline") from e
    if not arrays or any(a.ndim == 0 for a in arrays.values()):
        raise InvalidInputError(f"{path}: holds no per-sample arrays (leading axis = sample); pass an .npz written "
                                "by the pipeline")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise InvalidInputError(f"{path}: arrays have different sample counts {sorted(n)}")
    return [{k: a[i] for k, a in arrays.items()} for i in range(n.pop())]


FP16_MAX = 65504.0        # the step graphs quantised are fp16: larger inputs are inf inside them


def check_feeds(feeds: list[dict], stage: str, source) -> None:
    """Every input of step stage `stage`, in every sample: a float array of its spec's shape, one batch
    (at least 1) for all the batched inputs of a sample, finite values in fp16's range (NaN or 1e30 gave
    NaN scales, a quantised graph recorded as current that TensorRT then refused)."""
    fix = "pass an .npz written by the pipeline"
    for i, feed in enumerate(feeds):
        batch = None
        for t in STAGES[stage].inputs:
            a = feed.get(t.name)
            if batch is None and a is not None and a.ndim and "B" in t.shape:
                batch = a.shape[0]
            if a is None or a.dtype.kind != "f" or a.shape != t.concrete(batch or 0) or batch == 0:
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise InvalidInputError(f"{source}: sample {i} input '{t.name}' is {got}; the {stage} graph takes float "
                                        f"{list(t.shape)}" + (f" with B = {batch}, as the sample's other inputs"
                                                              if batch else " with B >= 1") + f": {fix}")
            if not np.isfinite(a).all() or float(np.abs(a).max(initial=0)) > FP16_MAX:
                raise InvalidInputError(f"{source}: sample {i} input '{t.name}' holds NaN, infinite or values beyond "
                                        f"fp16's range ({FP16_MAX:g}), which no step makes: {fix}")
    for name in ("x", "cond"):      # the latents and the identity: constant in every sample, no step's inputs
        if feeds and all(np.ptp(f[name]) == 0 and f[name].flat[0] == feeds[0][name].flat[0] for f in feeds):
            raise InvalidInputError(f"{source}: input '{name}' holds the one value {float(feeds[0][name].flat[0]):g} "
                                    "in every sample, which no step makes (the ranges measured on it would quantise "
                                    f"nothing, and the loss against fp16 is NaN): {fix}")


def load_calibration(path: str | Path, stages: Iterable[str]) -> list[dict]:
    """The calibration feeds of `path`, checked against every step stage in `stages` (before any is quantised)."""
    feeds = feeds_from_npz(path)
    for s in stages:
        if s in QUANT_STAGES:
            check_feeds(feeds, s, path)
    return feeds


# ----------------------------------------------------------------------------- calibration

def calibrate(src: Path, engines_dir: Path, stage: str, placement: qdq.Placement, cal: calib.Calibration,
              feeds: list[dict] | None, work: Path, device: str = "auto") -> tuple[calib.Stats, list[dict]]:
    """Stats over the placement's tensors of graph `src`, from `feeds` or from the pipeline of
    `engines_dir`; and the first LOSS_FEEDS step inputs seen."""
    from arc2face_rt.backends.ort import OrtSession

    observed = work / "observed.onnx"
    calib.observed_graph(src, observed, placement.observed())
    stats = calib.Stats(placement.observed(), placement.matmul_inputs, cal.percentile)
    outputs = [t.name for t in STAGES[stage].outputs]
    sess = calib.ObservingSession(OrtSession(observed, device=device), outputs, stats, keep=LOSS_FEEDS)
    try:
        if feeds is None:
            calib.run_pipeline(engines_dir, stage, sess, cal, device)
        else:
            for i, f in enumerate(feeds):
                log.info("calibration %s: sample %d/%d", stage, i + 1, len(feeds))
                sess.run({k: np.ascontiguousarray(v, np.float32) for k, v in f.items() if k in sess.input_names})
    finally:
        sess.close()
    if stats.samples == 0:
        raise InvalidInputError("calibration got no samples; pass step-graph inputs recorded by the pipeline")
    return stats, sess.kept


def fake_quant(src: Path, dst: Path) -> None:
    """An fp32 twin of a Q/DQ graph for ONNX Runtime on any CPU: the same Q/DQ (same scales, same
    int8/fp8 rounding), fp32 arithmetic elsewhere."""
    calib.save_model(calib.widen_fp16_to_fp32(onnx.load(str(src))), dst)


class FakeQuantSession:
    """A `fake_quant` twin (or any fp32 graph) in ONNX Runtime on the CPU with the pipeline's session
    interface. Graph optimisation stays at the basic level: the extended level fuses DQ -> Conv -> Q
    into QLinearConv, which has no FP8 kernel."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self._sess.run(self.output_names, feeds)))

    def close(self) -> None:
        self._sess = None


def output_loss(ref_onnx: Path, test_onnx: Path, feeds: list[dict]) -> dict:
    """{output: {"rel_l2", "psnr_db"}} of fp32 graph `test_onnx` against `ref_onnx` over `feeds`."""
    ref, tst = FakeQuantSession(ref_onnx), FakeQuantSession(test_onnx)
    try:
        return calib.output_drift(ref, tst, feeds)
    finally:
        ref.close()
        tst.close()


# ----------------------------------------------------------------------------- the stage

def quantize_stage(engines_dir: str | Path, stage: str, recipes: Iterable[QuantRecipe],
                   cal: calib.Calibration = calib.Calibration(), feeds: list[dict] | None = None,
                   device: str = "auto") -> dict:
    """Write `<stage>.<precision>.onnx` for each recipe (one calibration shared by all), record each in
    the manifest; return {precision: record}."""
    engines_dir = Path(engines_dir)
    recipes = [r.resolved() for r in recipes]
    m = mf.load_manifest(engines_dir)
    stage_rec = m.get("stages", {}).get(stage)
    if not stage_rec:
        raise InvalidInputError(f"{engines_dir}: no stage '{stage}' in the manifest; export it first")
    mf.verify_files(engines_dir, stage_rec["files"])
    src = engines_dir / stage_rec["file"]
    base = onnx.load(str(src), load_external_data=False)
    qdq.name_nodes(base)
    placements = {}
    for r in recipes:
        p = qdq.plan_placement(base, r.level)
        placements[r.precision] = p if r.residual_qdq else replace(p, residuals={})
    # Levels nest, so the highest level's placement observes every recipe's activations; plus every
    # residual some recipe quantises.
    top = placements[max(recipes, key=lambda r: r.level).precision]
    placement = replace(top, residuals={a: t for q in placements.values() for a, t in q.residuals.items()})
    if not placement.quantized:
        raise InvalidInputError(f"{src}: no Conv/Gemm/MatMul with constant weights to quantise")
    for r in recipes:                        # before minutes of calibration
        _check_ours(engines_dir, m, stage, r.precision)
    remove_stale_temps(engines_dir)
    work = temp_dir(engines_dir, f"{stage}.quant")
    out = {}
    try:
        stats, kept = calibrate(src, engines_dir, stage, placement, cal, feeds, work, device)
        for r in recipes:
            out[r.precision] = _write_quantized(engines_dir, stage, src, placements[r.precision], stats, kept, r, cal,
                                                "recorded" if feeds is not None else "pipeline", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write_quantized(engines_dir: Path, stage: str, src: Path, placement: qdq.Placement, stats: calib.Stats,
                     kept: list[dict], r: QuantRecipe, cal: calib.Calibration, source: str, work: Path) -> dict:
    model = onnx.load(str(src))
    qdq.name_nodes(model)
    done = qdq.insert_qdq(model, placement, stats, r.precision, r.smoothquant_alpha, r.method)
    dst = engines_dir / quant_onnx_file(stage, r.precision)
    staged = work / dst.name
    calib.save_model(model, staged)
    del model
    twin = work / f"twin.{r.precision}.onnx"
    fake_quant(staged, twin)
    loss = output_loss(work / "observed.onnx", twin, kept)
    m = mf.load_manifest(engines_dir)
    _check_ours(engines_dir, m, stage, r.precision)     # again: the manifest may have changed meanwhile
    files = {n: mf.file_record(work / n) for n in (dst.name, dst.name + ".data") if (work / n).exists()}
    for name in (dst.name, dst.name + ".data"):
        if name not in files and os.path.lexists(engines_dir / name):
            (engines_dir / name).unlink()   # the old graph's weights; recorded, so ours (_check_ours)
    stage_rec = m["stages"][stage]
    rec = {"file": dst.name, "files": files,
           "source": {"file": stage_rec["file"], "precision": m.get("precision"),
                      "sha256": {k: v["sha256"] for k, v in stage_rec["files"].items()}},
           "tool": "arc2face_export.qdq (ONNX pass reproducing NVIDIA's SD Q/DQ placement)",
           "recipe_revision": RECIPE_REVISION, "recipe": asdict(r),
           "weights": "int8 per-channel symmetric" if r.precision == "int8" else "fp8 e4m3 per-tensor",
           "activations": f"{r.precision} per-tensor symmetric",
           "calibration": {**calibration_fields(cal, source), "samples": stats.samples},
           "calibration_samples": stats.samples,
           "quantized_layers": len(placement.quantized), "smoothed_inputs": done["smoothed"],
           "qdq_activations": done["qdq_activations"], "residual_add_qdq": done["qdq_residuals"],
           "fp16_layers": placement.kept, "attention_bmms_unquantized": len(placement.attention_bmms),
           "loss_vs_source": loss}
    m.setdefault(SECTIONS[r.precision], {})[stage] = rec
    # Recorded before the files move in: a kill at any moment leaves only files the manifest names (an old
    # graph under the new record's hashes is stale, so quantised again), never one the next run refuses.
    mf.write_json_atomic(engines_dir / mf.MANIFEST, m)
    for name in (dst.name + ".data", dst.name):     # the weights first: the graph names complete weights
        if name in files:
            os.chmod(work / name, usual_mode())     # onnx writes external data private
            os.replace(work / name, engines_dir / name)
    log.info("%s: %d layers quantised, %d kept in %s, %d residual adds; vs %s: %s", dst.name,
             len(placement.quantized), len(placement.kept), m.get("precision"), done["qdq_residuals"], m.get("precision"),
             ", ".join(f"{k} rel L2 {v['rel_l2']:.3g} PSNR {v['psnr_db']:.1f} dB" for k, v in loss.items()))
    return rec


def _check_ours(engines_dir: Path, m: dict, stage: str, precision: str) -> None:
    """Refuse to replace `<stage>.<precision>.onnx[.data]` unless the manifest records it as this
    tool's: a file of that name the manifest does not list is someone else's, and is kept."""
    rec = m.get(SECTIONS[precision], {}).get(stage)
    dst = quant_onnx_file(stage, precision)
    check_recorded(engines_dir, (dst, dst + ".data"), rec.get("files") if isinstance(rec, dict) else None,
                   f"{precision} step graph")


# What a record written before a field existed was calibrated with: graphs quantised before the sampler
# was recorded ran DPM-Solver++ (on every folder: an LCM-LoRA folder's are made again, on its LCM steps).
_RECORDED_BEFORE = {"scheduler": "dpmpp2m"}


def calibration_fields(cal: calib.Calibration, source: str) -> dict:
    """What a graph quantised with `cal` records of its calibration; samples from a file ("recorded")
    make the pipeline's identities, steps and guidance moot (None), and record no sampler."""
    fields = {**cal.record(), "source": source}
    if source == "recorded":
        del fields["scheduler"]
        fields.update(identities=None, steps=None, guidance=None)
    return fields


def expected_calibration(cal: calib.Calibration) -> dict:
    """The calibration fields a graph quantised with `cal` records (a data file: `cal.data_sha256`)."""
    return calibration_fields(cal, "pipeline" if cal.data_sha256 is None else "recorded")


def quant_is_current(engines_dir: Path, m: dict, stage: str, recipe: QuantRecipe, cal: calib.Calibration) -> bool:
    """The stage's quantised graph exists, intact (sizes and sha256, hashed once and then trusted through the
    verification stamps), from the current source graph, recipe and calibration (`expected_calibration`:
    where the samples come from, the data file's sha256, the percentile, ...). A damaged record (fields
    missing or of other types) is not current: the graph is made again."""
    r = recipe.resolved()
    try:
        q = m.get(SECTIONS[r.precision], {}).get(stage)
        src = m.get("stages", {}).get(stage)
        if not q or not src or q.get("recipe") != asdict(r) or q.get("recipe_revision") != RECIPE_REVISION:
            return False
        if q["source"]["sha256"] != {k: v["sha256"] for k, v in src["files"].items()}:
            return False
        want = expected_calibration(cal)
        if {k: q["calibration"].get(k, _RECORDED_BEFORE.get(k)) for k in want} != want:
            return False
        verify_records(engines_dir, q["files"], mode="stamp")   # a flipped byte keeps the size: hash (once)
        return True
    except (KeyError, TypeError, AttributeError, ValueError, Arc2FaceError):  # Arc2FaceError: outside, changed
        return False


def ensure_quant_graphs(engines_dir: str | Path, recipes: Iterable[QuantRecipe], cal: calib.Calibration = calib.Calibration(),
                        calib_path: str | Path | None = None, stages: Iterable[str] | None = None,
                        device: str = "auto", force: bool = False) -> None:
    """Make `<stage>.<precision>.onnx` current for the step stages of a folder (`build-engines --precision
    int8|fp8`); stages already current for the recipe and calibration (`calib_path`: its sha256 is part of
    it) are kept unless `force`. `cal` is taken as given: `build-engines` passes the folder's sampler and
    steps (`folder_defaults`), the default here is Arc2Face's 25 DPM-Solver++ steps on any folder."""
    engines_dir = Path(engines_dir)
    recipes = [r.resolved() for r in recipes]
    m = mf.load_manifest(engines_dir)
    todo = [s for s in (stages or QUANT_STAGES) if s in QUANT_STAGES and s in m.get("stages", {})]
    recorded = None
    if calib_path is not None:
        recorded = load_calibration(calib_path, todo)
        cal = replace(cal, data_sha256=mf.sha256_file(calib_path))
    for s in todo:
        stale = [r for r in recipes if force or not quant_is_current(engines_dir, m, s, r, cal)]
        if stale:
            quantize_stage(engines_dir, s, stale, cal, recorded, device)
