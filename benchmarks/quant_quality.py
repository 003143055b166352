"""What int8 and FP8 cost: the Q/DQ step graphs against the fp16 one they were quantised from, end to end.

`python -m benchmarks quant --size tiny|full`. Same identities, same seeds, same initial latents; only
`step_cfg` differs. The Q/DQ graphs are written and calibrated by `ensure_quant_graphs`, the code
behind `build-engines --precision int8|fp8`. ONNX Runtime on a CPU cannot run fp16 Q/DQ (nor FP8)
graphs as TensorRT would, so every variant runs as an fp32 twin (`quantize.fake_quant`), each in a
process of its own: the reference is the fp16 graph widened to fp32 (its fp16 weights exactly, fp32
arithmetic), the int8 and FP8 rows the Q/DQ graphs widened the same way (same scales, same int8/FP8
rounding of weights and activations, fp32 arithmetic elsewhere). So the numbers isolate the
quantisation; TensorRT's fp16 arithmetic between the Q/DQ pairs adds fp16's own (smaller) error.

Reported per image and as medians: latent PSNR (peak = range of the reference latents), image PSNR
(peak 255) and the cosine between the ArcFace embeddings of the two images when the model folder
has face models; gates as the issue's (image PSNR >= 30 dB, cosine >= 0.95). With TensorRT(-RTX)
installed it also builds the fp16, int8 and FP8 step_cfg plans and reports build time and plan size.
On random weights these measure how far quantisation moves the computation, not how faces look.

Full size: torch's fp16 export of the full UNet is very slow on a CPU, so the fp16 step graph is the
fp32 export converted with onnxconverter-common (the UNet's nodes only: the latent update, CFG and the
sinusoidal time projection stay fp32, as our fp16 export keeps them), in a cache folder next to the
fp32 projector and VAE decoder.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .export_bench import CACHE, checkpoint

GATES = {"image_psnr_db": 30.0, "arcface_cosine": 0.95}


def _psnr(ref: np.ndarray, test: np.ndarray, peak: float) -> float:
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def _generate(pipe, identity: np.ndarray, seed: int, steps: int, guidance: float):
    from arc2face_rt.pipeline import image_noise

    sched = pipe.schedule("dpmpp2m", steps)
    cond = pipe.project(identity[None])
    x = image_noise(seed, 0, sched)[0][None]
    lat = pipe.denoise(cond, x, sched, guidance)
    return lat, pipe.decode(lat)[0]


def fp16_from_fp32(fp32_dir: Path, out: Path, say=print) -> Path:
    """A cache engines folder whose step_cfg is the fp32 export's converted to fp16 (UNet nodes only)."""
    import onnx
    from onnxconverter_common import float16

    from arc2face_export.onnx_files import save_model
    from arc2face_rt import manifest as mf

    if (out / mf.MANIFEST).is_file():
        return out
    m = mf.load_manifest(fp32_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stage in ("projector", "vae_decoder"):
        for rel in m["stages"][stage]["files"]:
            shutil.copyfile(fp32_dir / rel, tmp / rel)
    say(f"converting {fp32_dir}/step_cfg.onnx to fp16 (UNet nodes) with onnxconverter-common")
    # types from shape inference on the graph without its weights (a 3.4 GB proto cannot be inferred whole)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_dir / "step_cfg.onnx"), load_external_data=False))
    onnx.external_data_helper.load_external_data_for_model(model, str(fp32_dir))
    # fp32 where our torch fp16 export keeps it: the latent update / CFG and the sinusoidal time projection
    keep = [n.name for n in model.graph.node if not n.name.startswith("/unet/") or n.name.startswith("/unet/time_proj/")]
    with warnings.catch_warnings():   # one "truncated to 1e-07" warning per tiny weight: thousands of lines
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        model = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                                 disable_shape_infer=True)
    # onnxconverter-common 1.16 casts outputs made by blocked (fp32) nodes to fp16 despite keep_io_types:
    # those Casts become fp32 -> fp32 and the outputs stay fp32, as the stage spec says
    outputs = {o.name: o for o in model.graph.output}
    for n in model.graph.node:
        if n.op_type == "Cast" and n.output[0] in outputs:
            next(a for a in n.attribute if a.name == "to").i = onnx.TensorProto.FLOAT
            outputs[n.output[0]].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    save_model(model, tmp / "step_cfg.onnx")
    del model
    say(f"  {_cast_mixed_inputs(tmp / 'step_cfg.onnx', set(keep))} Casts added where the converter left fp32 "
        "inputs on fp16 ops")
    rec = dict(m["stages"]["step_cfg"])
    rec["files"] = {p.name: mf.file_record(p) for p in sorted(tmp.glob("step_cfg.onnx*"))}
    rec["converted_from"] = {"folder": str(fp32_dir), "tool": "onnxconverter_common.float16"}
    stages = {"projector": m["stages"]["projector"], "vae_decoder": m["stages"]["vae_decoder"], "step_cfg": rec}
    keys = ("format", "format_version", "spec_revision", "opset", "created", "source", "scheduler_config", "libraries")
    mf.write_json_atomic(tmp / mf.MANIFEST, {**{k: m[k] for k in keys if k in m}, "precision": "fp16", "stages": stages})
    tmp.rename(out)
    return out


_SAME_TYPE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Concat", "Max", "Min", "Sum", "Where"}


def _cast_mixed_inputs(path: Path, blocked: set[str]) -> int:
    """onnxconverter-common 1.16 leaves some fp32 tensors from blocked nodes or shape arithmetic feeding
    converted fp16 ops without a Cast (the time projection's Concat into time_embedding's Gemm, the
    attention scale's Div); ONNX Runtime on fp32 twins does not mind, TensorRT refuses the graph. Add a
    Cast to fp16 before each such input of a converted op that needs one type. Returns the count."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)   # the weights stay in <path>.data, untouched
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    n_cast = 0
    for _ in range(10):   # a fixed op's output type becomes known to the next round's inference
        del model.graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        types.update({i.name: i.data_type for i in model.graph.initializer})
        rebuilt, added = [], 0
        for n in model.graph.node:
            ins = [types.get(t) for t in n.input]
            if n.name not in blocked and n.op_type in _SAME_TYPE_OPS and f16 in ins and f32 in ins:
                for k, t in enumerate(n.input):
                    if types.get(t) == f32:
                        out = f"{t}_to_fp16_{n_cast + added}"
                        rebuilt.append(onnx.helper.make_node("Cast", [t], [out], name=f"{n.name}_cast{k}_fp16", to=f16))
                        n.input[k] = out
                        added += 1
            rebuilt.append(n)
        del model.graph.node[:]
        model.graph.node.extend(rebuilt)
        n_cast += added
        if not added:
            break
    onnx.save_model(model, str(path))
    return n_cast


def _plans(engines: Path, precisions, say) -> dict:
    """Build time and size of the step_cfg plan per precision (TensorRT(-RTX) here, on this machine)."""
    from arc2face_export import trt_build
    from arc2face_rt import manifest as mf
    from arc2face_rt.errors import BackendUnavailableError
    from arc2face_rt.specs import STEP_CFG

    try:
        trt = trt_build.import_trt()
    except BackendUnavailableError as e:
        say(f"no plan builds: {e}")
        return {}
    m = mf.load_manifest(engines)
    out = {}
    for prec in ("fp16", *precisions):
        onnx_file = m["stages"]["step_cfg"]["file"] if prec == "fp16" else m[mf.QUANT_SECTIONS[prec]]["step_cfg"]["file"]
        plan = engines / f".bench.step_cfg.{prec}.plan"
        say(f"building the {prec} step_cfg plan")
        t0 = time.perf_counter()
        try:
            rec = trt_build.build_plan(engines / onnx_file, plan, STEP_CFG, trt_build.BuildOptions(), prec, trt=trt)
        except Exception as e:   # noqa: BLE001 - a failed build is a result to report, not a reason to lose the rest
            out[prec] = {"error": str(e).splitlines()[0][:500]}
            say(f"  {prec} step_cfg plan failed: {out[prec]['error']}")
            continue
        out[prec] = {"build_s": round(time.perf_counter() - t0, 1), "plan_mb": round(rec["bytes"] / 2**20, 1),
                     "library": rec["library"], "compute_capabilities": rec["compute_capabilities"],
                     "profile": rec["build"]["profile"]}
        say(f"  {prec} step_cfg plan: {out[prec]['plan_mb']} MiB in {out[prec]['build_s']} s")
        plan.unlink()
    return out


def _variant_images(engines: Path, src: Path, twin: Path, identities: int, steps: int, guidance: float) -> list:
    """(latents, image) per identity with the fp32 twin of step graph `src` in place of step_cfg (run in a
    child process of its own; see bench_quant)."""
    from arc2face_export.quantize import FakeQuantSession, fake_quant
    from arc2face_rt.pipeline import Arc2FacePipeline, random_identity

    fake_quant(src, twin)
    try:
        with Arc2FacePipeline(engines, backend="ort", device="cpu") as pipe:
            pipe._sessions["step_cfg"] = FakeQuantSession(twin)
            return [_generate(pipe, random_identity(100 + i), i, steps, guidance) for i in range(identities)]
    finally:
        for p in twin.parent.glob(twin.name + "*"):
            p.unlink()


def bench_quant(size: str = "tiny", precisions=("int8", "fp8"), identities: int = 2, steps: int = 25,
                guidance: float = 3.0, calib_identities: int = 2, model_dir: Path | None = None,
                engines: Path | None = None, fp32_engines: Path | None = None, build: bool = True,
                residual_qdq: bool = False, level: float = 3.0, say=print) -> dict:
    from arc2face_export.calib import Calibration
    from arc2face_export.quantize import QuantRecipe, ensure_quant_graphs
    from arc2face_rt import manifest as mf

    given, model_dir = model_dir, model_dir or CACHE / f"model-{size}"
    if fp32_engines is not None:
        engines = fp16_from_fp32(fp32_engines, engines or CACHE / f"engines-{size}-fp16c", say)
    else:
        from arc2face_export.onnx_export import export_all

        model_dir = checkpoint(given, size, say)
        engines = engines or CACHE / f"engines-{size}-fp16"
        say(f"fp16 ONNX graphs in {engines}")
        export_all(model_dir, engines, precision="fp16", progress=say, stages=("projector", "step_cfg", "vae_decoder"))
    cal = Calibration(identities=calib_identities, steps=steps, guidance=guidance)
    t0 = time.perf_counter()
    say(f"{'/'.join(precisions)} step graphs, calibrated on {calib_identities} identities x {steps} steps")
    ensure_quant_graphs(engines, [QuantRecipe(p, residual_qdq=residual_qdq, level=level) for p in precisions], cal,
                        stages=["step_cfg"], device="cpu")
    quant_s = time.perf_counter() - t0
    m = mf.load_manifest(engines)
    records = {p: m[mf.QUANT_SECTIONS[p]]["step_cfg"] for p in precisions}

    work = engines / ".bench-twins"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    variants = {"fp16": engines / m["stages"]["step_cfg"]["file"], **{p: engines / records[p]["file"] for p in precisions}}
    got = {}
    try:
        # One fresh process per variant: a full-size fp32 twin is 3.4 GB and ONNX Runtime's CPU session
        # does not hand its memory back on close, so three in one process ran a 24 GiB machine out of memory.
        ctx = multiprocessing.get_context("spawn")
        for name, src in variants.items():
            t1 = time.perf_counter()
            with ProcessPoolExecutor(1, mp_context=ctx) as ex:
                got[name] = ex.submit(_variant_images, engines, src, work / f"{name}.onnx", identities, steps,
                                      guidance).result()
            say(f"  {name}: {identities} identities in {time.perf_counter() - t1:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {p: [] for p in precisions}
    recognizer = _face_models(model_dir, say)
    for i in range(identities):
        lat_r, img_r = got["fp16"][i]
        for p in precisions:
            lat_q, img_q = got[p][i]
            row = {"identity": i, "seed": i,
                   "latent_psnr_db": _psnr(lat_r, lat_q, float(lat_r.max() - lat_r.min())),
                   "image_psnr_db": _psnr(img_r, img_q, 255.0),
                   "image_max_abs": int(np.max(np.abs(img_r.astype(np.int16) - img_q.astype(np.int16))))}
            if recognizer is not None:
                row["arcface_cosine"] = _cosine(recognizer, img_r, img_q)
            say(f"  identity {i} {p}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            results[p].append(row)
    plans = _plans(engines, precisions, say) if build else None   # last: full-size builds take long on a CPU
    out = {}
    for p, rows in results.items():
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k not in ("identity", "seed")}
        gates = {k: {"min": v, "value": med.get(k), "passed": med.get(k) is not None and med[k] >= v}
                 for k, v in GATES.items()}
        rec = records[p]
        out[p] = {"median": med, "rows": rows, "gates": gates,
                  "gates_passed": all(g["passed"] for g in gates.values() if g["value"] is not None),
                  "quantization": {k: rec[k] for k in ("tool", "recipe", "weights", "activations", "calibration",
                                                       "quantized_layers", "smoothed_inputs", "residual_add_qdq",
                                                       "attention_bmms_unquantized", "loss_vs_source")},
                  "fp16_layers": len(rec["fp16_layers"]),
                  "onnx_mb": round(sum(f["bytes"] for f in rec["files"].values()) / 2**20, 1)}
    res = {"kind": "quant", "size": size, "steps": steps, "guidance": guidance, "identities": identities,
           "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file(),
           "backend": "onnxruntime CPU, fp32 fake-quant twins (see benchmarks/quant_quality.py)",
           "reference": "the fp16 step graph widened to fp32", "quantize_s": round(quant_s, 1),
           "precisions": out}
    if plans is not None:
        res["plans"] = plans
    json.dumps(res)   # fail here, not after writing half a file
    return res


def _cosine(analyzer, a: np.ndarray, b: np.ndarray) -> float:
    """ArcFace cosine of two images: the detected face of each, else (random-weight detectors often
    find none) the recognizer on the whole image resized to its 112x112 input."""
    import cv2

    from arc2face_rt.errors import InvalidInputError

    try:
        e = [analyzer.embed_image(img, "image")[0] for img in (a, b)]
    except InvalidInputError:
        e = [analyzer.embed_aligned(cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)) for img in (a, b)]
    return float(e[0] @ e[1])


def _face_models(model_dir: Path, say):
    from arc2face_rt.errors import MissingWeightsError
    from arc2face_rt.face.models import load_face_models
    from arc2face_rt.face.identity import FaceAnalyzer

    try:
        det, rec = load_face_models(model_dir, device="cpu")
    except MissingWeightsError as e:
        say(f"no ArcFace cosine: {e}")
        return None
    return FaceAnalyzer(det, rec)
