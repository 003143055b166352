"""Explicit int8 (Q/DQ) for the step graphs' UNet, for strongly typed TensorRT engines.

Tool: onnxruntime.quantization.quantize_static, QDQ format, per-channel symmetric int8 weights,
symmetric int8 activations (TensorRT only takes symmetric int8), Conv/MatMul/Gemm inputs only (their
outputs stay in float: TensorRT fuses DQ -> Conv and gains nothing from quantised outputs).
nvidia-modelopt's ONNX PTQ was the first choice, but `pip install nvidia-modelopt[onnx]` would
downgrade onnx and swap onnxruntime for onnxruntime-gpu in this environment, so it is not used.

The sensitive nodes stay in float: the first and last Conv (conv_in / conv_out), the time
embedding, and anything named like a norm (norms are not in the quantised op types anyway).
Calibration runs the graph in fp32 on the CPU with step-graph inputs the pipeline itself produced
(x, m_prev, noise, cond, coeffs, guidance per denoise step), so an fp16 source graph is first
widened to fp32 (casts to fp16 become casts to fp32). The result computes in fp32 outside the Q/DQ
pairs; mixing fp16 with Q/DQ would need opset >= 19 (fp16 scales) and is not done here.

Files: `<stage>.int8.onnx` (+ `.onnx.data` when large) next to the source graph, recorded in
manifest["quantized"][stage] with the source graph's sha256, the exclusions and the measured loss.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import usual_mode
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.specs import STAGES

log = logging.getLogger(__name__)

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
INT8_STAGES = ("step_cfg", "step")
# Node-name patterns (diffusers UNet exported by torch.onnx) kept in float.
SENSITIVE_NAME = re.compile(r"time_emb|time_proj|timestep|conv_in\b|conv_out\b|norm", re.IGNORECASE)


def int8_onnx_file(stage: str) -> str:
    return f"{stage}.int8.onnx"


# ----------------------------------------------------------------------------- calibration data

class FeedsReader:
    """An onnxruntime CalibrationDataReader over an iterable of feed dicts {input name: array}.

    Keys the graph does not take (e.g. `guidance` for the no-CFG step) are dropped, arrays become
    contiguous float32 as the step graphs' inputs are.
    """

    def __init__(self, feeds: Iterable[dict], input_names: Iterable[str]):
        self._names = set(input_names)
        self._feeds = feeds
        self._it: Iterator[dict] | None = None
        self.count = 0

    def get_next(self):
        if self._it is None:
            self._it = iter(self._feeds)
        try:
            feed = next(self._it)
        except StopIteration:
            return None
        self.count += 1
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed.items() if k in self._names}

    def rewind(self):
        self._it = None

    def __iter__(self):
        return self


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
        raise InvalidInputError(f"{path}: cannot read calibration data ({e}); pass an .npz written by the pipeline") from e
    if not arrays or any(a.ndim == 0 for a in arrays.values()):
        raise InvalidInputError(f"{path}: holds no per-sample arrays (leading axis = sample); pass an .npz written "
                                "by the pipeline")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise InvalidInputError(f"{path}: arrays have different sample counts {sorted(n)}")
    return [{k: a[i] for k, a in arrays.items()} for i in range(n.pop())]


def check_feeds(feeds: list[dict], stage: str, source) -> None:
    """Every input of step stage `stage`, as a float array of its spec's shape, in every sample."""
    for t in STAGES[stage].inputs:
        for i, feed in enumerate(feeds):
            a = feed.get(t.name)
            batch = a.shape[0] if a is not None and a.ndim and "B" in t.shape else 0
            if a is None or a.dtype.kind != "f" or a.shape != t.concrete(batch):
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise InvalidInputError(f"{source}: sample {i} input '{t.name}' is {got}; the {stage} graph takes float "
                                        f"{list(t.shape)}: pass an .npz written by the pipeline")


# ----------------------------------------------------------------------------- graph preparation

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
                               per_run: int = 4, seed: int = 0, device: str = "auto") -> list[dict]:
    """Step-graph inputs the pipeline itself produces: `identities` random identities, the default
    DPM-Solver++ schedule of `steps` steps, inputs kept at `per_run` evenly spaced steps of each run
    (so early, noisy and late, clean latents are all represented). Runs with ONNX Runtime on the
    folder's own graphs; guidance 3 for step_cfg, 1 for step."""
    from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

    if stage not in INT8_STAGES:
        raise ValueError(f"calibration is for {INT8_STAGES}, not {stage}")
    guidance = 3.0 if stage == "step_cfg" else 1.0
    keep = {int(round(v)) for v in np.linspace(0, steps - 1, per_run)}
    feeds: list[dict] = []
    with Arc2FacePipeline(engines_dir, backend="ort", device=device) as pipe:
        pipe._sessions[stage] = _RecordingSession(pipe.session(stage), keep, feeds, steps)
        for i in range(identities):
            log.info("calibration: %s, identity %d/%d (%d steps)", stage, i + 1, identities, steps)
            pipe.generate(random_identity(seed + 1000 + i), 1,
                          GenerationOptions(steps=steps, guidance=guidance, seed=seed + i, batch_size=1))
    return feeds


def widen_fp16_to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make an fp16-inside graph compute in fp32 (same ops, same I/O), so ORT can calibrate it."""
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
    del g.value_info[:]   # stale fp16 annotations; the quantiser re-infers shapes
    return model


def sensitive_nodes(model: onnx.ModelProto) -> list[str]:
    """Quantisable nodes to keep in float: first and last Conv, time embedding, norms (by name)."""
    quantisable = [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]
    convs = [n for n in quantisable if n.op_type == "Conv"]
    keep = {n.name for n in quantisable if SENSITIVE_NAME.search(n.name or "")}
    if convs:
        keep |= {convs[0].name, convs[-1].name}
    return sorted(k for k in keep if k)


def _name_nodes(model: onnx.ModelProto) -> None:
    """nodes_to_exclude works by name: give unnamed nodes stable ones."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


# ----------------------------------------------------------------------------- quantisation

def quantize_int8(src_onnx: str | Path, dst_onnx: str | Path, feeds: Iterable[dict],
                  nodes_to_exclude: Iterable[str] | None = None, calibrate_method: str = "MinMax",
                  external_data: bool | None = None) -> dict:
    """Write a Q/DQ int8 copy of `src_onnx` calibrated on `feeds`; return what was done (for the manifest).

    `nodes_to_exclude` adds to the automatic `sensitive_nodes`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src_onnx, dst_onnx = Path(src_onnx), Path(dst_onnx)
    model = onnx.load(str(src_onnx))                      # loads external data too
    model = widen_fp16_to_fp32(model)
    _name_nodes(model)
    exclude = sorted(set(sensitive_nodes(model)) | set(nodes_to_exclude or ()))
    if external_data is None:
        external_data = model.ByteSize() > (1 << 30)
    reader = FeedsReader(feeds, [i.name for i in model.graph.input])
    quantize_static(
        model, dst_onnx, calibration_data_reader=reader, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=False,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        use_external_data_format=external_data, calibrate_method=getattr(CalibrationMethod, calibrate_method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES)})
    if reader.count == 0:
        dst_onnx.unlink(missing_ok=True)
        raise InvalidInputError("int8 calibration got no samples; pass step-graph inputs recorded by the pipeline")
    q = onnx.load(str(dst_onnx), load_external_data=False)
    n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    log.info("%s: %d QuantizeLinear nodes, %d nodes kept in float, %d calibration samples",
             dst_onnx.name, n_q, len(exclude), reader.count)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per-channel symmetric",
            "activations": "int8 symmetric", "op_types": list(QUANTIZED_OP_TYPES), "calibrate_method": calibrate_method,
            "calibration_samples": reader.count, "nodes_excluded": exclude, "quantize_nodes": n_q}


def quantization_loss(ref_onnx: str | Path, quant_onnx: str | Path, feeds: Iterable[dict]) -> dict:
    """Output error of the quantised graph vs the unquantised one under onnxruntime (CPU), same inputs.

    Returns {output: {"rel_l2": ||q - r|| / ||r||, "psnr_db": 20 log10(range(r) / rmse)}} over all feeds
    together (for the benchmarks; uint8 outputs are compared as float).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(ref_onnx), opts, providers=["CPUExecutionProvider"])
    qnt = ort.InferenceSession(str(quant_onnx), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    inputs = {i.name for i in ref.get_inputs()}
    acc = {n: [0.0, 0.0, np.inf, -np.inf, 0] for n in names}  # sum sq err, sum sq ref, min, max, count
    for feed in feeds:
        f = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed.items() if k in inputs}
        for n, r, q in zip(names, ref.run(names, f), qnt.run(names, f)):
            r, q = r.astype(np.float64), q.astype(np.float64)
            a = acc[n]
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


def quantize_stage(engines_dir: str | Path, stage: str, feeds: list[dict], nodes_to_exclude=None) -> dict:
    """Quantise an engines folder's `<stage>.onnx` into `<stage>.int8.onnx`, measure the loss on the
    calibration feeds, and record it all in manifest["quantized"][stage]; return that record."""
    engines_dir = Path(engines_dir)
    m = mf.load_manifest(engines_dir)
    stage_rec = m.get("stages", {}).get(stage)
    if not stage_rec:
        raise InvalidInputError(f"{engines_dir}: no stage '{stage}' in the manifest; export it first")
    src = engines_dir / stage_rec["file"]
    dst = engines_dir / int8_onnx_file(stage)
    mf.verify_files(engines_dir, stage_rec["files"])
    info = quantize_int8(src, dst, feeds, nodes_to_exclude=nodes_to_exclude)
    loss = quantization_loss(src, dst, feeds)
    written = [p for p in sorted(engines_dir.glob(dst.name + "*")) if p.is_file()]
    for p in written:
        os.chmod(p, usual_mode())           # onnx writes external data private
    files = {p.name: mf.file_record(p) for p in written}
    rec = {"file": dst.name, "files": files, "source": {"file": stage_rec["file"], "precision": m.get("precision"),
           "sha256": {k: v["sha256"] for k, v in stage_rec["files"].items()}}, **info, "loss_vs_source": loss}
    m.setdefault("quantized", {})[stage] = rec
    mf.write_json_atomic(engines_dir / mf.MANIFEST, m)
    log.info("%s: int8 vs %s: %s", dst.name, m.get("precision"),
             ", ".join(f"{k} rel L2 {v['rel_l2']:.3g} PSNR {v['psnr_db']:.1f} dB" for k, v in loss.items()))
    return rec


def int8_is_current(engines_dir: Path, m: dict, stage: str) -> bool:
    q = m.get("quantized", {}).get(stage)
    src = m.get("stages", {}).get(stage)
    if not q or not src:
        return False
    if q["source"]["sha256"] != {k: v["sha256"] for k, v in src["files"].items()}:
        return False
    return all((engines_dir / k).is_file() and (engines_dir / k).stat().st_size == v["bytes"] for k, v in q["files"].items())


def ensure_int8_graphs(engines_dir: str | Path, calib_path: str | Path | None = None,
                       stages: Iterable[str] | None = None) -> None:
    """Make `<stage>.int8.onnx` current for the step stages of a folder (used by `build-engines --precision int8`)."""
    engines_dir = Path(engines_dir)
    m = mf.load_manifest(engines_dir)
    todo = [s for s in (stages or INT8_STAGES) if s in INT8_STAGES and s in m.get("stages", {})
            and not int8_is_current(engines_dir, m, s)]
    if not todo:
        return
    recorded = load_calibration(calib_path, todo) if calib_path is not None else None
    for s in todo:
        quantize_stage(engines_dir, s, recorded if recorded is not None else pipeline_calibration_feeds(engines_dir, s))


def load_calibration(path: str | Path, stages: Iterable[str]) -> list[dict]:
    """The calibration feeds of `path`, checked against every step stage in `stages` (before any is quantised)."""
    feeds = feeds_from_npz(path)
    for s in stages:
        if s in INT8_STAGES:
            check_feeds(feeds, s, path)
    return feeds
