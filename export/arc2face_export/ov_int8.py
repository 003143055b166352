"""int8 step graphs for the OpenVINO backend: NNCF post-training quantisation of the UNet.

Tool: `nncf.quantize` on the OpenVINO model read from `<stage>.onnx` (model_type TRANSFORMER: NNCF's
scheme for networks with attention; preset MIXED: symmetric per-channel int8 weights, asymmetric int8
activations), calibrated on step-graph inputs the pipeline itself records
(`calib.pipeline_calibration_feeds`: random identities, the folder's own sampler and step count (25
DPM-Solver++ steps; 4 LCM steps on an LCM-LoRA folder), inputs kept at evenly spaced steps, run by ONNX
Runtime in fp32), as the GPU int8 path is.

Kept in float (NNCF's ignored scope): the sensitive layers of the GPU int8 path (first and last
convolution, time embedding, norms: `SENSITIVE_NAME`), and every node computed from the
scheduler coefficients (the timestep sinusoid, s·x, the CFG mix and the scheduler update), so the
scheduler arithmetic is never quantised.

Files: `<stage>.ov-int8.xml` + `.bin` next to the source graph, saved into a tagged temporary folder beside
them (`.<stage>.ov-int8.xml.arc2face-HOST-PID-RANDOM.tmp/`, which the next run removes if this one is killed)
and moved into place after they are complete, recorded in manifest["openvino_int8"][stage] with the source
graph's sha256, the scheme, and the quantised outputs' error against the source graph on the calibration
inputs (both run by OpenVINO in f32). The runtime uses them with `--backend openvino --cpu-precision int8`.
Files of those names that the manifest does not record are someone else's: refused before calibration, kept.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import naming_output, remove_stale_temps, temp_dir
from arc2face_rt.backends.openvino import INT8_KEY, OpenVinoSession, core, scheduler_subgraph
from arc2face_rt.errors import Arc2FaceError, InvalidInputError
from arc2face_rt.integrity import verify_records
from arc2face_rt.outputs import check_output_dir

from .calib import output_drift, pipeline_calibration_feeds
from .engines_folder import check_recorded
from .quantize import QUANT_STAGES as INT8_STAGES

# Node-name patterns (diffusers UNet exported by torch.onnx) NNCF leaves in float, with the first and last Conv.
SENSITIVE_NAME = re.compile(r"time_emb|time_proj|timestep|conv_in\b|conv_out\b|norm", re.IGNORECASE)

log = logging.getLogger(__name__)


class _StreamError(RuntimeError):
    """OpenVINO's save_model failing to write its stream (a full disk, a file-size limit)."""


def ov_int8_file(stage: str) -> str:
    return f"{stage}.ov-int8.xml"


def _bin(xml: Path) -> Path:
    return xml.with_suffix(".bin")


def ignored_names(model) -> list[str]:
    """Friendly names NNCF must leave in float: sensitive layers and the scheduler subgraph."""
    names, _ = scheduler_subgraph(model)
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    keep = set(names) | {n for n in (op.get_friendly_name() for op in model.get_ops()) if SENSITIVE_NAME.search(n)}
    if convs:
        keep |= {convs[0], convs[-1]}
    return sorted(keep)


def stable_names(model) -> int:
    """Give the nodes OpenVINO named itself (`Constant_271872`, `ShapeOf_112`, `Constant_1083_1`: a counter
    global to the process) names numbered in graph order instead, so the saved IR, and the engine id that
    hashes it, is the same whatever the process did before (an int8 run continued after a stop quantised
    one graph where the first run had done two, and its IR differed in those names alone). Returns how many."""
    k = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if re.fullmatch(re.escape(kind) + r"_\d+(?:_\d+)*", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{k}")
            k += 1
    return k


def quantize_ov_int8(src_onnx: str | Path, dst_xml: str | Path, feeds: list[dict], work: Path) -> dict:
    """Write an NNCF int8 copy of `src_onnx` as OpenVINO IR calibrated on `feeds` into `work` (a temporary
    folder beside `dst_xml`, named in errors; the caller moves it in); return what was done."""
    import nncf
    import openvino as ov

    if not feeds:
        raise InvalidInputError("int8 calibration got no samples; pass step-graph inputs recorded by the pipeline")
    src_onnx, dst_xml = Path(src_onnx), Path(dst_xml)
    model = core().read_model(str(src_onnx))
    names = {p.get_any_name() for p in model.inputs}
    data = [{k: np.ascontiguousarray(v, np.float32) for k, v in f.items() if k in names} for f in feeds]
    ignored = ignored_names(model)
    if not log.isEnabledFor(logging.INFO):        # NNCF's per-node INFO lines only with -v
        nncf.set_log_level(logging.WARNING)
    q = nncf.quantize(model, nncf.Dataset(data), preset=nncf.QuantizationPreset.MIXED,
                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data),
                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    n_fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())
    stable_names(q)
    # OpenVINO reports a failed write (a full disk, a file-size limit) as RuntimeError("basic_ios::clear:
    # iostream error"): named as the output, with the fix; the engines folder is the only place it can go.
    with naming_output(dst_xml, library_errors=(_StreamError,), elsewhere=None):
        try:
            ov.save_model(q, str(work / dst_xml.name), compress_to_fp16=False)
        except RuntimeError as e:              # only its stream errors are the disk's; others stay bugs
            if "iostream" not in str(e) and "ios_base" not in str(e):
                raise
            raise _StreamError(str(e)) from e
    log.info("%s: %d FakeQuantize nodes, %d nodes kept in float, %d calibration samples",
             dst_xml.name, n_fq, len(ignored), len(data))
    return {"tool": f"nncf {nncf.__version__} quantize (OpenVINO {ov.get_version()})", "preset": "MIXED",
            "model_type": "TRANSFORMER", "weights": "int8 per-channel symmetric", "activations": "int8 asymmetric",
            "calibration_samples": len(data), "fake_quantize_nodes": n_fq, "nodes_excluded": len(ignored)}


def quantization_loss(ref: str | Path, quant: str | Path, feeds: list[dict]) -> dict:
    """{output: {"rel_l2", "psnr_db"}} of the quantised graph against the source, OpenVINO f32, same inputs."""
    a, b = OpenVinoSession(ref, "f32"), OpenVinoSession(quant, "f32")
    return output_drift(a, b, feeds)


def calibration_record(m: dict, feeds: list[dict] | None = None, identities: int = 4, steps: int | None = None,
                       per_run: int = 4) -> dict:
    """How a graph of folder `m` is calibrated (what its record keeps, so that other settings quantise
    again): the pipeline's run (identities, steps and steps kept per run, with the folder's sampler), or
    `feeds` given by the caller."""
    from arc2face_rt.folder_setup import folder_defaults

    if feeds is not None:
        h = hashlib.sha256()
        for feed in feeds:
            for k in sorted(feed):
                a = np.ascontiguousarray(feed[k])
                h.update(f"{k}:{a.dtype}:{a.shape};".encode())
                h.update(a.tobytes())
        return {"source": "given", "samples": len(feeds), "sha256": h.hexdigest()}
    sampling = folder_defaults(m)
    steps = steps or sampling["steps"]
    return {"source": "pipeline", "identities": identities, "steps": steps, "per_run": min(per_run, steps),
            "scheduler": sampling["scheduler"]}


def is_current(engines_dir: Path, m: dict, stage: str, calibration: dict | None = None) -> bool:
    """The stage's int8 graph exists, intact (sizes and sha256, hashed once and then trusted through the
    verification stamps), quantised from the folder's current source graph, and (`calibration` given)
    calibrated so (a record from before calibrations were kept counts as the defaults'). A damaged record
    (fields missing or of other types, which the runtime refuses) is not current: the graph is made again."""
    try:
        q, src = m.get(INT8_KEY, {}).get(stage), m.get("stages", {}).get(stage)
        if not q or not src or q["source"]["sha256"] != {k: v["sha256"] for k, v in src["files"].items()}:
            return False
        if calibration is not None and q.get("calibration", calibration_record(m)) != calibration:
            return False
        verify_records(engines_dir, q["files"], mode="stamp")   # a flipped byte keeps the size: hash (once)
        return True
    except (KeyError, TypeError, AttributeError, ValueError, Arc2FaceError):  # Arc2FaceError: outside, changed
        return False


def _check_ours(engines_dir: Path, m: dict, stage: str) -> None:
    """Refuse to replace `<stage>.ov-int8.xml/.bin` unless the manifest records them as this tool's."""
    rec, xml = m.get(INT8_KEY, {}).get(stage), ov_int8_file(stage)
    check_recorded(engines_dir, (xml, _bin(Path(xml)).name), rec.get("files") if isinstance(rec, dict) else None,
                   "OpenVINO int8 step graph")


def ensure_ov_int8(engines_dir: str | Path, stages=None, feeds: list[dict] | None = None,
                   identities: int = 4, steps: int | None = None, per_run: int = 4, force: bool = False,
                   say=log.info) -> dict:
    """Quantise the folder's step graphs that lack a current OpenVINO int8 copy; return manifest[INT8_KEY].

    `stages` None: the step graphs (step_cfg, step) the folder has. `steps` None: the folder's default
    step count (`folder_defaults`), sampled with its default scheduler. `feeds` (one list for every
    stage) replaces the pipeline-recorded calibration inputs."""
    from arc2face_rt.folder_setup import folder_defaults

    engines_dir = Path(engines_dir)
    m = mf.load_manifest(engines_dir)
    if m.get("precision") != "fp32":
        raise InvalidInputError(f"{engines_dir}: {m.get('precision')} graphs; OpenVINO int8 is quantised from an "
                                "fp32 export (`arc2face-export onnx --precision fp32`)")
    if stages is None:
        stages = tuple(s for s in INT8_STAGES if m.get("stages", {}).get(s))
        if not stages:
            raise InvalidInputError(f"{engines_dir}: has no step graph ({' or '.join(INT8_STAGES)}) to quantise; "
                                    f"{mf.reexport_advice(engines_dir)}")
    sampling = folder_defaults(m)
    steps = steps or sampling["steps"]
    for stage in stages:
        if stage not in INT8_STAGES:
            raise InvalidInputError(f"int8 is for the step graphs {INT8_STAGES}, not {stage}")
        if not m.get("stages", {}).get(stage):
            raise InvalidInputError(f"{engines_dir}: no stage '{stage}'; export it first")
    calibration = calibration_record(m, feeds, identities, steps, per_run)
    todo = [s for s in stages if force or not is_current(engines_dir, m, s, calibration)]
    if todo:              # refuse a folder we cannot write into before minutes of calibration
        files = " and ".join(f"{ov_int8_file(s)}/.bin" for s in todo)
        check_output_dir(engines_dir, flag="--engines", fix=f"openvino-int8 writes {files} and {mf.MANIFEST} "
                         "there: copy the folder somewhere writable and pass that as --engines")
    for stage in todo:    # and files of those names that are not ours
        _check_ours(engines_dir, m, stage)
    remove_stale_temps(engines_dir)              # what a killed run left behind (never raises)
    for stage in stages:
        src_rec = m["stages"][stage]
        if stage not in todo:
            say(f"{stage}: OpenVINO int8 graph is current")
            continue
        mf.verify_files(engines_dir, src_rec["files"])
        t0 = time.perf_counter()
        if feeds is None:
            say(f"{stage}: recording calibration inputs ({identities} identities x {min(per_run, steps)} of {steps} "
                f"{sampling['scheduler']} steps)")
            calib = pipeline_calibration_feeds(engines_dir, stage, identities=identities, steps=steps, per_run=per_run,
                                               scheduler=sampling["scheduler"])
        else:
            calib = feeds
        say(f"{stage}: NNCF quantisation on {len(calib)} samples")
        dst = engines_dir / ov_int8_file(stage)
        work = temp_dir(engines_dir, dst.name)
        try:    # quantised, measured and hashed in `work`; the files move in right after the manifest names them
            staged = work / dst.name
            info = quantize_ov_int8(engines_dir / src_rec["file"], dst, calib, work)
            loss = quantization_loss(engines_dir / src_rec["file"], staged, calib)
            files = {dst.name: mf.file_record(staged), _bin(dst).name: mf.file_record(_bin(staged))}
            m = mf.load_manifest(engines_dir)      # re-read: write only our key on top of the current manifest
            _check_ours(engines_dir, m, stage)     # again: the manifest may have changed meanwhile
            m.setdefault(INT8_KEY, {})[stage] = {
                "file": dst.name, "files": files, "seconds": round(time.perf_counter() - t0, 1),
                "source": {"file": src_rec["file"], "sha256": {k: v["sha256"] for k, v in src_rec["files"].items()}},
                "calibration": calibration, **info, "loss_vs_source": loss}
            # recorded first: a kill at any moment leaves only files the manifest names (old files under the
            # new hashes are stale, so made again), never one the next run refuses as someone else's
            mf.write_json_atomic(engines_dir / mf.MANIFEST, m)
            os.replace(_bin(staged), _bin(dst))    # weights first: the .xml names a complete .bin
            os.replace(staged, dst)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"{stage}: wrote {dst.name}; vs fp32: " + ", ".join(
            f"{k} rel L2 {v['rel_l2']:.3g}, PSNR {v['psnr_db']:.1f} dB" for k, v in loss.items()))
    return m.get(INT8_KEY, {})
