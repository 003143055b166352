"""How a run's pixels are made, beyond its options: what every PNG and `dataset.json` record next to the
options, so that `--resume` never mixes images of two setups that look alike on paper.

    backend     trt | ort | openvino
    precision   what the denoiser computes in: ONNX Runtime the folder's export precision (fp32 | fp16);
                TensorRT the precision the plans were built with (fp16 | fp32 | int8 | fp8,
                `manifest.built_precision`); OpenVINO the resolved --cpu-precision (fp32 | bf16), and
                for int8 also the float precision of the rest: "int8 (bf16 float)" | "int8 (fp32 float)"
    engines     16 hex digits of sha256 over the sha256 of the folder's generation graphs (every
                stage's files, also those a run does not open, `step` beside `step_cfg`, say): TensorRT
                the plans; ONNX Runtime the stages, plus the fused `ort_cuda` graphs when they run;
                OpenVINO the stages, plus the `openvino_int8` step graphs at int8
    device      ONNX Runtime on the GPU only: "cuda" (absent: the CPU)
    ort_graphs  ONNX Runtime on the GPU with the `onnx --ort-cuda` graphs: "fused" (absent: the plain ones)
    tf32        ONNX Runtime on the GPU with fp32 graphs and ARC2FACE_ORT_TF32=1: true (absent: no TF32)
    ort_conv_bias  ONNX Runtime on the GPU with the fused graphs and ARC2FACE_ORT_FUSE_CONV_BIAS=1: true
                (cuDNN's fused convolution-and-bias kernels, with TF32; absent: the bias added by its own kernel)

Everything here is known from the manifest, the environment and this machine before any graph is opened
(`predicted`), so a `--resume` with another setup is refused before a model loads; once sessions are open,
where ONNX Runtime actually runs them replaces the prediction (`from_sessions`).
"""
from __future__ import annotations

import hashlib
import os

from .manifest import built_precision, record_files
from .specs import ALL_STAGES

RUN_KEYS = ("backend", "precision", "engines", "device", "ort_graphs", "tf32", "ort_conv_bias")
ORT_CUDA = "ort_cuda"                  # manifest section of `arc2face-export onnx --ort-cuda`


def engine_id(manifest: dict, sections: tuple[str, ...]) -> str:
    """Short hash naming the exact graphs of `sections`: every file of the generation stages' records in
    them (`specs.ALL_STAGES`), not the face models' plans `build-engines` adds to `plans`, which make no pixel."""
    h = [r["sha256"] for section in sections for stage, rec in manifest.get(section, {}).items()
         if stage in ALL_STAGES for r in record_files(rec).values()]
    return hashlib.sha256("".join(sorted(h)).encode()).hexdigest()[:16]


def legacy_engine_id(manifest: dict, record: dict) -> str | None:
    """The engine id PNGs and dataset.json recorded before this record existed (over the `stages` and
    `ort_cuda` sections whatever ran), where it names the same pixels as `record`: ONNX Runtime on the
    CPU and OpenVINO fp32/bf16, which load only the stages. None for the other setups, whose older
    images say too little to be continued."""
    if "device" in record or record["backend"] not in ("ort", "openvino") or \
            str(record["precision"]).startswith("int8"):
        return None
    return engine_id(manifest, ("stages", ORT_CUDA))


def as_current(got: dict, record: dict, legacy: str | None) -> dict:
    """`got` (what a PNG or dataset.json records) with a legacy engine id (`legacy_engine_id`) read as
    `record`'s: the same graphs under the old name."""
    return {**got, "engines": record["engines"]} if legacy and got.get("engines") == legacy else got


def ort_fused_wanted(manifest: dict) -> bool:
    """Whether ONNX Runtime on the GPU opens the folder's fused graphs (fp16 `--ort-cuda` export, not
    switched off with ARC2FACE_ORT_FUSED=0)."""
    return bool(manifest.get(ORT_CUDA)) and manifest.get("precision") == "fp16" \
        and os.environ.get("ARC2FACE_ORT_FUSED", "1") != "0"


def run_record(manifest: dict, backend: str, ov_precision=None, on_gpu: bool = False, fused: bool = False) -> dict:
    """The record (keys: RUN_KEYS, the ONNX Runtime GPU ones only when they apply). `ov_precision`:
    OpenVINO's resolved `backends.openvino.Precision`; `on_gpu`/`fused`: ONNX Runtime runs on CUDA / runs
    the fused graphs."""
    sections: tuple[str, ...] = ("stages",)
    if backend == "trt":
        sections, precision = ("plans",), built_precision(manifest, manifest.get("precision"))
    elif ov_precision is not None:
        precision = ov_precision.name
        if ov_precision.int8_steps:
            sections += ("openvino_int8",)
            precision = f"int8 ({'bf16' if ov_precision.heavy == 'bf16' else 'fp32'} float)"
    else:
        precision = manifest.get("precision")
        fused = on_gpu and fused
        if fused:
            sections += (ORT_CUDA,)
    rec = {"backend": backend, "precision": precision, "engines": engine_id(manifest, sections)}
    if backend == "ort" and on_gpu:
        rec["device"] = "cuda"
        if fused:
            rec["ort_graphs"] = "fused"
            if os.environ.get("ARC2FACE_ORT_FUSE_CONV_BIAS") == "1":
                rec["ort_conv_bias"] = True
        if manifest.get("precision") == "fp32" and os.environ.get("ARC2FACE_ORT_TF32") == "1":
            rec["tf32"] = True
    return rec


def from_sessions(sessions: dict, ort_cuda_files: set) -> tuple[bool, bool]:
    """ONNX Runtime: (on the GPU, fused graphs) as the open sessions report it (`on_gpu`, the file each
    opened); a fused graph this onnxruntime cannot load falls back to the plain one."""
    on_gpu = any(getattr(s, "on_gpu", False) for s in sessions.values())
    fused = any(str(getattr(s, "path", "")) in ort_cuda_files for s in sessions.values())
    return on_gpu, fused
