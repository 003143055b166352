"""fp16 graphs for ONNX Runtime's CUDA provider, with its fused Stable Diffusion kernels.

The plain graphs run attention as MatMul -> Softmax -> MatMul (a [B·heads, 4096, 4096] score matrix
per self-attention at 64x64) and GroupNorm as Reshape -> InstanceNormalization -> Mul/Add. ONNX
Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`, model types "unet" and "vae",
the fusions its own Stable Diffusion pipeline uses) rewrites them into its CUDA contrib ops:
MultiHeadAttention (flash / memory-efficient attention), GroupNorm and SkipGroupNorm, BiasSplitGelu,
BiasAdd, NhwcConv, SkipLayerNormalization. Those kernels exist only for CUDA, so these graphs are an
addition to the folder (`<stage>.ort-cuda.onnx`, manifest section `ort_cuda`), used by the ONNX
Runtime backend on a GPU; the CPU, TensorRT and OpenVINO paths keep the plain graphs.

How a graph is made (`export_all(..., ort_cuda=True)`, `arc2face-export onnx --ort-cuda`):
1. the stage is exported in fp32 (the UNet stages with diffusers' classic attention processor:
   explicit scores = scale·QKᵀ, softmax, ·V, the pattern the optimizer recognises; torch's fused
   scaled_dot_product_attention exports a form it does not) and validated against torch like every
   stage;
2. the optimizer fuses it (opt_level 0: graph fusions only, nothing ONNX-Runtime-version specific);
3. ONNX Runtime's float16 converter casts it to fp16 with fp32 inputs and outputs, keeping in fp32
   the nodes of our wrapper (the scheduler coefficients, the CFG mix, the DPM-Solver++ update, the
   VAE's pixel rounding): every node whose name has a single path component.
The fused graphs are checked on a GPU (tests/test_ort_cuda.py: against the plain fp16 graph and the
CPU); on a CPU they cannot run.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from arc2face_rt.specs import STEP, STEP_CFG, VAE_DECODER

log = logging.getLogger(__name__)

ORT_CUDA_STAGES = (STEP_CFG.name, STEP.name, VAE_DECODER.name)
_EXTERNAL_DATA_BYTES = 1 << 30


def ort_cuda_file(stage: str) -> str:
    return f"{stage}.ort-cuda.onnx"


def attention_for(module, stage: str):
    """How `stage`'s attention is traced for fusion: the classic processor for the UNet stages (their
    attention becomes MultiHeadAttention); the VAE's single attention stays as exported (the
    optimizer's VAE attention fusion does not match diffusers' current graph, and at one head of 512
    channels it is a small part of the decode), so only its convolutions and norms are fused."""
    return contextlib.nullcontext(module) if stage == VAE_DECODER.name else classic_attention(module)


@contextlib.contextmanager
def classic_attention(module):
    """Every diffusers Attention in `module` uses the classic processor while the block runs."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved = [(m, m.processor) for m in module.modules() if isinstance(m, Attention)]
    for m, _ in saved:
        m.set_processor(AttnProcessor())
    try:
        yield module
    finally:
        for m, p in saved:
            m.set_processor(p)


def fuse_for_ort_cuda(src: str | Path, dst: str | Path, stage: str) -> dict:
    """Fuse the fp32 graph `src` for ONNX Runtime CUDA, convert it to fp16 and write it to `dst`
    (weights in `dst`.data when over 1 GiB). Returns the fused-operator counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = "vae" if stage == VAE_DECODER.name else "unet"
    options = FusionOptions(kind)
    options.enable_attention = kind == "unet"          # see attention_for
    with _quiet():
        model = optimize_model(str(src), model_type=kind, opt_level=0, use_gpu=True, optimization_options=options)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    keep_fp32 = [n.name for n in model.model.graph.node if n.name.count("/") == 1]
    with _quiet():
        model.convert_float_to_float16(keep_io_types=True, node_block_list=keep_fp32)
    dst = Path(dst)
    external = model.model.ByteSize() > _EXTERNAL_DATA_BYTES
    model.save_model_to_file(str(dst), use_external_data_format=external, all_tensors_to_one_file=True)
    if external:
        _rename_external_data(dst)
    return {"fused": fused, "kept_fp32": len(keep_fp32), "model_type": kind}


def _rename_external_data(dst: Path) -> None:
    """The optimizer names the weights file `<file>.data`; make sure it is exactly that."""
    import onnx

    data = [p for p in dst.parent.iterdir() if p.name.startswith(dst.name) and p.name != dst.name]
    if [p.name for p in data] == [dst.name + ".data"]:
        return
    model = onnx.load(str(dst), load_external_data=True)
    for p in data:
        p.unlink()
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


@contextlib.contextmanager
def _quiet():
    """The optimizer logs every fusion, and prints that onnx shape inference cannot type its contrib
    ops (expected: the fused graph is typed by ONNX Runtime)."""
    import io

    names = ("onnxruntime.transformers", "fusion_base", "onnx_model", "float16", "fusion_utils")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
