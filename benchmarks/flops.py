"""FLOP counts per stage and the compute floor they imply.

Full size: the published SD1.5 figures: UNet 0.80 TFLOP per image-forward at
64x64 (CFG doubles it), VAE decoder 2.5 TFLOP, CLIP text encoder 0.013 TFLOP. The tiny random model
has other layer widths, so its counts come from torch's FlopCounterMode on the models themselves
(matmul/conv/attention FLOPs, 2 per multiply-add, as the full-size figures count).

floor_s = sum over stages of FLOPs / peak rate of the precision the stage runs in; peaks are measured once
per run (env.measure_cpu_peaks: fp32, bf16, int8 GEMM rates; env.measure_gpu_peak_flops: fp16).
"""
from __future__ import annotations

from pathlib import Path

DESIGN_FLOPS = {"unet_forward": 0.80e12, "vae_decode": 2.5e12, "clip": 0.013e12}


def count_flops(model_dir: str | Path) -> dict:
    """FLOPs of one image through each model of MODEL_DIR (counted with torch, CPU, batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from arc2face_ref.loading import load_models
    from arc2face_ref.modules import VaeDecode
    from arc2face_ref.projector import Arc2FaceProjector

    m = load_models(model_dir)
    out = {}
    with torch.no_grad():
        for key, fn in (
            ("unet_forward", lambda: m.unet(torch.randn(1, 4, 64, 64), torch.tensor([500.0]), torch.randn(1, 77, 768))),
            ("vae_decode", lambda: VaeDecode(m.vae)(torch.randn(1, 4, 64, 64))),
            ("clip", lambda: Arc2FaceProjector(m.encoder)(torch.randn(1, 512))),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[key] = float(counter.get_total_flops())
    return out


def flops_for(size: str, model_dir: str | Path | None = None) -> dict:
    """{unet_forward, vae_decode, clip, source}: design figures for `full`, counted for anything else."""
    if size == "full":
        return dict(DESIGN_FLOPS, source="published SD1.5 UNet/VAE and CLIP-L figures")
    counted = count_flops(model_dir)
    return dict(counted, source="counted with torch.utils.flop_counter on the tiny random model")


def image_flops(flops: dict, steps: int, cfg: bool = True) -> float:
    """FLOPs to make one image from an identity: projector + steps x UNet (x2 with CFG) + VAE decode."""
    return flops["clip"] + steps * (2 if cfg else 1) * flops["unet_forward"] + flops["vae_decode"]


def stage_flops(flops: dict, steps: int, cfg: bool = True) -> dict:
    """FLOPs of each timed stage at batch 1 (detect/embed are not counted: no figures for them)."""
    step = (2 if cfg else 1) * flops["unet_forward"]
    return {"project": flops["clip"], "step": step, "steps": steps * step, "decode": flops["vae_decode"]}


def stage_rate(peaks: dict, precision: str | None) -> float | None:
    """FLOP/s for a stage computed in `precision`: that precision's measured peak, else the only or the
    fp32 one (a GPU run has one fp16 peak for everything; --peak-tflops gives one rate)."""
    pick = peaks.get(precision) or (next(iter(peaks.values())) if len(peaks) == 1 else peaks.get("fp32"))
    return pick["tflops"] * 1e12 if pick else None


def add_floor(row: dict, flops: dict, peaks: dict, steps: int, cfg: bool = True) -> None:
    """row["floor"]: the compute floor of one image and of each stage, each stage at the peak rate of
    the precision it runs in (row["info"]["stage_precisions"]: project / step / decode; default the
    row's precision), and the row's ratios to it."""
    if not peaks or row.get("status") not in ("ok", "partial") or not row.get("latency_s"):
        return
    info = row.get("info", {})
    precs = {s: info.get("stage_precisions", {}).get(s, info.get("precision")) for s in ("project", "step", "decode")}
    rates = {s: stage_rate(peaks, p) for s, p in precs.items()}
    if None in rates.values():
        return
    sf = stage_flops(flops, steps, cfg)
    floor_s = sf["project"] / rates["project"] + sf["steps"] / rates["step"] + sf["decode"] / rates["decode"]
    f = {"image_tflop": round(image_flops(flops, steps, cfg) / 1e12, 4), "latency_floor_s": floor_s,
         "precisions": precs, "latency_ratio": row["latency_s"]["median"] / floor_s,
         "throughput_floor_ips": 1 / floor_s,
         "throughput_ratio": {b: (1 / ips) / floor_s for b, ips in row.get("throughput_ips", {}).items()},
         "stages": {}}
    for s, fl in sf.items():
        rate = rates["step" if s == "steps" else s]
        if (row.get("stages_s") or {}).get(s) is not None:
            f["stages"][s] = {"floor_s": fl / rate, "ratio": row["stages_s"][s] / (fl / rate)}
    row["floor"] = f
