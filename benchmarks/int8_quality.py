"""What int8 costs in quality: the int8 step graph against the fp16 one it was quantised from, end to end.

Same identities, same seeds, same initial latents; only `step_cfg` differs (`step_cfg.int8.onnx`,
written and calibrated by `ensure_int8_graphs`, the code behind `build-engines --precision int8`).
Both run on ONNX Runtime (CPU here), which executes the Q/DQ graph with real int8 arithmetic where it
has kernels for it, so the numbers are the quantisation's own, not a TensorRT build's. Reported per
image and as medians: latent PSNR (peak = range of the fp16 latents), image PSNR (peak 255) and the
cosine between the ArcFace embeddings of the two images (the paper's identity metric) when the model
folder has face models. On random weights these say how far int8 moves the computation, not how the
faces look.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .export_bench import CACHE


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


def bench_int8(size: str = "tiny", identities: int = 4, steps: int = 25, guidance: float = 3.0,
               model_dir: Path | None = None, engines: Path | None = None, say=print) -> dict:
    from arc2face_export.int8 import ensure_int8_graphs, int8_onnx_file
    from arc2face_export.onnx_export import export_all
    from arc2face_ref.random_ckpt import write_random_checkpoint
    from arc2face_rt import manifest as mf
    from arc2face_rt.backends.ort import OrtSession
    from arc2face_rt.pipeline import Arc2FacePipeline, random_identity

    model_dir = model_dir or CACHE / f"model-{size}"
    if not (model_dir / "arc2face").is_dir():
        say(f"writing a random-weight {size} checkpoint to {model_dir}")
        write_random_checkpoint(model_dir, size=size, seed=0, force=model_dir.exists())
    engines = engines or CACHE / f"engines-{size}-fp16"
    say(f"fp16 ONNX graphs in {engines}")
    export_all(model_dir, engines, precision="fp16", progress=say)
    t0 = time.perf_counter()
    say("int8 step graphs (calibrated on the pipeline's own step inputs)")
    ensure_int8_graphs(engines, stages=["step_cfg"])
    quant_s = time.perf_counter() - t0
    quant = mf.load_manifest(engines)["quantized"]["step_cfg"]

    rows = []
    with Arc2FacePipeline(engines, backend="ort", device="cpu") as ref, \
            Arc2FacePipeline(engines, backend="ort", device="cpu") as q:
        q._sessions["step_cfg"] = OrtSession(engines / int8_onnx_file("step_cfg"), device="cpu")
        recognizer = _face_models(model_dir, say)
        for i in range(identities):
            ident = random_identity(100 + i)
            lat_r, img_r = _generate(ref, ident, i, steps, guidance)
            lat_q, img_q = _generate(q, ident, i, steps, guidance)
            row = {"identity": i, "seed": i,
                   "latent_psnr_db": _psnr(lat_r, lat_q, float(lat_r.max() - lat_r.min())),
                   "image_psnr_db": _psnr(img_r, img_q, 255.0),
                   "image_max_abs": int(np.max(np.abs(img_r.astype(np.int16) - img_q.astype(np.int16))))}
            if recognizer is not None:
                e = [recognizer.embed_image(img, f"image {i}")[0] for img in (img_r, img_q)]
                row["arcface_cosine"] = float(e[0] @ e[1])
            say(f"  identity {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k not in ("identity", "seed")}
    return {"kind": "int8", "size": size, "steps": steps, "guidance": guidance, "identities": identities,
            "backend": "onnxruntime CPU", "quantize_s": round(quant_s, 1),
            "quantization": {k: quant[k] for k in ("tool", "format", "weights", "activations", "calibrate_method",
                                                   "calibration_samples", "quantize_nodes", "loss_vs_source")},
            "nodes_kept_in_float": len(quant["nodes_excluded"]), "median": med, "rows": rows}


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
