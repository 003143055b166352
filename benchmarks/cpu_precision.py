"""What OpenVINO bf16 and int8 cost in fidelity: each against our fp32 pipeline, end to end, same seeds.

Reference: the fp32 engines on ONNX Runtime (the path tested against diffusers within one grey level).
Each precision runs the same identities and initial latents on `--backend openvino --cpu-precision P`
(int8: the step graphs `arc2face-export openvino-int8` writes, quantised first when missing). Reported
per image and as medians: latent PSNR (peak = range of the fp32 latents), image PSNR (peak 255), max
grey-level difference, and the cosine between the ArcFace embeddings of the two images when the model
folder has face models. Gates (the issue's): image PSNR >= 30 dB and ArcFace cosine >= 0.95, on the
medians. With random weights these measure how far the reduced precision moves the computation
(computational drift), not how the faces look.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .export_bench import CACHE, checkpoint
from .quant_quality import _face_models, _generate, _psnr

GATES = {"image_psnr_db": 30.0, "arcface_cosine": 0.95}


def _rows(pipe, identities: int, steps: int, guidance: float) -> list:
    from arc2face_rt.pipeline import random_identity

    return [_generate(pipe, random_identity(100 + i), i, steps, guidance) for i in range(identities)]


def bench_cpu_precision(size: str = "tiny", precisions=("bf16", "int8"), identities: int = 4, steps: int = 25,
                        guidance: float = 3.0, model_dir: Path | None = None, engines: Path | None = None,
                        say=print) -> dict:
    from arc2face_export.onnx_export import export_all
    from arc2face_rt.backends.openvino import CPU_PRECISIONS, cpu_isa
    from arc2face_rt.errors import InvalidInputError
    from arc2face_rt.pipeline import Arc2FacePipeline

    bad = [p for p in precisions if p not in CPU_PRECISIONS or p == "auto"]
    if bad or not precisions:
        raise InvalidInputError(f"--precisions: {bad[0] if bad else ''!r} is not one of "
                                f"{', '.join(p for p in CPU_PRECISIONS if p != 'auto')}")
    if engines is not None and engines.is_dir() and any(engines.iterdir()) and not (engines / "manifest.json").exists():
        raise InvalidInputError(f"--engines {engines}: holds files but no manifest.json (not an engines folder); "
                                "give an fp32 engines folder, a new or empty one to export into, or leave it out")
    model_dir = checkpoint(model_dir, size, say)
    engines = engines or CACHE / f"engines-{size}-fp32"
    export_all(model_dir, engines, precision="fp32", progress=say)
    quant_s = None
    if "int8" in precisions:
        from arc2face_export.ov_int8 import ensure_ov_int8
        t0 = time.perf_counter()
        ensure_ov_int8(engines, stages=("step_cfg" if guidance > 1 else "step",), say=say)
        quant_s = round(time.perf_counter() - t0, 1)

    say(f"fp32 reference on ONNX Runtime: {identities} identities x {steps} steps")
    with Arc2FacePipeline(engines, backend="ort", device="cpu") as ref:   # closed before OpenVINO opens
        refs = _rows(ref, identities, steps, guidance)
    recognizer = _face_models(model_dir, say)
    out = {}
    for prec in precisions:
        say(f"OpenVINO {prec}")
        with Arc2FacePipeline(engines, backend="openvino", cpu_precision=prec) as pipe:
            got = _rows(pipe, identities, steps, guidance)
        rows = []
        for i, ((lat_r, img_r), (lat_q, img_q)) in enumerate(zip(refs, got)):
            row = {"identity": i, "seed": i,
                   "latent_psnr_db": _psnr(lat_r, lat_q, float(lat_r.max() - lat_r.min())),
                   "image_psnr_db": _psnr(img_r, img_q, 255.0),
                   "image_max_abs": int(np.max(np.abs(img_r.astype(np.int16) - img_q.astype(np.int16))))}
            if recognizer is not None:
                e = [recognizer.embed_image(img, f"image {i}")[0] for img in (img_r, img_q)]
                row["arcface_cosine"] = float(e[0] @ e[1])
            say(f"  {prec} identity {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k not in ("identity", "seed")}
        gates = {k: {"min": v, "value": med.get(k), "passed": med.get(k) is not None and med[k] >= v}
                 for k, v in GATES.items()}
        out[prec] = {"median": med, "rows": rows, "gates": gates,
                     "gates_passed": all(g["passed"] for g in gates.values() if g["value"] is not None)}
    return {"kind": "cpu_precision", "size": size, "steps": steps, "guidance": guidance, "identities": identities,
            "reference": "fp32 engines on ONNX Runtime (CPU)", "cpu": cpu_isa().as_dict(), "isa": cpu_isa().summary(),
            "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file(), "int8_quantize_s": quant_s,
            "precisions": out}
