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
1. the stage is exported in fp16 like the plain fp16 graph (fp32 inputs, outputs and scheduler
   arithmetic), the UNet stages with diffusers' classic attention processor (explicit
   softmax(scale·QKᵀ)·V, the pattern the optimizer recognises; torch's fused
   scaled_dot_product_attention exports a form it does not), and validated against torch fp32;
2. the optimizer fuses it (opt_level 0: graph fusions only). Its GroupNorm fusion writes gamma and
   beta as float32 tensors but copies the fp16 bytes of an fp16 graph, which onnx rejects; the
   values are cast to the declared type while it runs (`_declared_initializer_types`). A GroupNorm,
   BiasAdd or BiasSplitGelu fusion is undone where its CUDA kernel refuses the width
   (`_only_supported_widths`), and the no-op Casts the NhwcConv fusion adds are removed
   (`remove_no_op_casts`);
(ONNX Runtime's own fp16 converter, run on a fused fp32 graph instead, left type errors in our graphs:
Mul and Div nodes with one fp16 and one fp32 input.) The exporter then type-checks each fused graph
(`check_loads`: ONNX Runtime's CPU provider must load it up to the missing CUDA kernels; a graph that
fails is left out of the export, see onnx_export), and tests/test_ort_cuda.py runs them on a GPU,
against the plain fp16 graph and the CPU.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from arc2face_rt.specs import STEP, STEP_CFG, VAE_DECODER

from . import onnx_files

log = logging.getLogger(__name__)

ORT_CUDA_STAGES = (STEP_CFG.name, STEP.name, VAE_DECODER.name)
# Bumped whenever the recipe changes, so a folder made by an older one is not taken as current.
# 1: fused fp32 graph + ONNX Runtime's fp16 converter (left type errors); 2: fused fp16 export;
# 3: no-op Casts removed, width-limited fusions undone where their CUDA kernel refuses the width.
ORT_CUDA_RECIPE = 3


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


CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


def fuse_for_ort_cuda(src: str | Path, dst: str | Path, stage: str, cpu_kernels_only: bool = False) -> dict:
    """Fuse the graph `src` for ONNX Runtime CUDA and write it to `dst` (weights in `dst`.data when
    over 1 GiB). Returns the fused-operator counts. `cpu_kernels_only` keeps to fusions ONNX Runtime
    also has CPU kernels for (MultiHeadAttention unpacked, LayerNormalization, SkipLayerNormalization),
    so a test can compare the fused attention with torch on a CPU.

    Fusions whose CUDA kernel refuses the width at that place are left out there
    (`_only_supported_widths`; recorded as "not_fused"), and the no-op Casts the NhwcConv fusion adds are removed
    (`remove_no_op_casts`). The optimizer's own failures raise FusedGraphError."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    kind = "vae" if stage == VAE_DECODER.name else "unet"
    options = FusionOptions(kind)
    options.enable_attention = kind == "unet"          # see attention_for
    if cpu_kernels_only:
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    not_fused: dict[str, str] = {}
    with _only_supported_widths(not_fused):
        model = _optimize(src, kind, options)
    refused = unsupported_fusions(model.model.graph)
    if refused:                           # a fusion path _only_supported_widths does not see
        raise FusedGraphError(f"{Path(src).name}: fused ops with widths their CUDA kernels refuse: {refused}")
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    no_op_casts = remove_no_op_casts(model.model.graph)
    dst = Path(dst)
    external = model.model.ByteSize() > onnx_files.EXTERNAL_DATA_BYTES
    model.save_model_to_file(str(dst), use_external_data_format=external, all_tensors_to_one_file=True)
    if external:
        _rename_external_data(dst)
    rec = {"fused": fused, "model_type": kind, "no_op_casts_removed": no_op_casts}
    if not_fused:
        rec["not_fused"] = not_fused
    return rec


def _optimize(src, kind: str, options):
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _quiet(), _declared_initializer_types():
            return optimize_model(str(src), model_type=kind, opt_level=0, use_gpu=True, optimization_options=options)
    except (MemoryError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - the optimizer's own failures: that fused graph is dropped
        raise FusedGraphError(f"{Path(src).name}: ONNX Runtime's optimizer failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e


# The CUDA kernels' limits on widths (onnxruntime/contrib_ops/cuda/diffusion/: bias_split_gelu.cc,
# bias_add.cc, group_norm_impl.cu): met by Stable Diffusion 1.5's widths, not by every model (the tiny
# test model's). A graph outside them loads, then fails at its first run with INVALID_ARGUMENT /
# NOT_IMPLEMENTED, so such a fusion is not applied to that model (its plain ops stay).
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 10240)      # input's last dimension (2 x the feed-forward width)
BIAS_ADD_WIDTHS = (320, 640, 1280)                # channels
WIDTH_LIMITED = ("BiasSplitGelu", "BiasAdd", "GroupNorm", "SkipGroupNorm")
# the optimizer's fusions that write them (module, class); it imports its modules under two names
_WIDTH_FUSIONS = (("fusion_group_norm", "FusionGroupNorm"), ("fusion_bias_add", "FusionBiasAdd"),
                  ("fusion_biassplitgelu", "FusionBiasSplitGelu"))


def refused_width(node, width_of) -> str | None:
    """Why `node`'s CUDA kernel refuses its width (None when it takes it); `width_of(name)`: the
    length of a 1-D initializer (bias / gamma), or None."""
    if node.domain != "com.microsoft" or node.op_type not in WIDTH_LIMITED or len(node.input) < 2:
        return None
    w = width_of(node.input[1])
    if w is None:
        return None
    if node.op_type == "BiasSplitGelu" and w not in BIAS_SPLIT_GELU_WIDTHS:
        return f"width {w}; the CUDA kernel takes {'/'.join(map(str, BIAS_SPLIT_GELU_WIDTHS))}"
    if node.op_type == "BiasAdd" and w not in BIAS_ADD_WIDTHS:
        return f"{w} channels; the CUDA kernel takes {'/'.join(map(str, BIAS_ADD_WIDTHS))}"
    if node.op_type in ("GroupNorm", "SkipGroupNorm"):
        groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
        if not groups or w % groups or (w // groups) % 2:
            return f"{w} channels in {groups} groups; the CUDA kernel needs an even number of channels per group"
    return None


def unsupported_fusions(graph) -> dict[str, str]:
    """{op: why} for the fused ops in `graph` (onnx GraphProto) with a width their CUDA kernel refuses."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    out = {}
    for n in graph.node:
        why = refused_width(n, lambda name: dims[name][0] if len(dims.get(name, ())) == 1 else None)
        if why:
            out.setdefault(n.op_type, why)
    return out


@contextlib.contextmanager
def _only_supported_widths(left_out: dict):
    """While the optimizer runs, a GroupNorm / BiasAdd / BiasSplitGelu fusion whose new node has a width
    its CUDA kernel refuses is undone (its nodes are neither added nor removed): that place keeps its
    plain ops, the others are fused. `left_out` collects {op: "why (n places)"}."""
    import importlib
    import sys

    importlib.import_module("onnxruntime.transformers.optimizer")     # imports them under their short names
    for mod, _ in _WIDTH_FUSIONS:
        importlib.import_module(f"onnxruntime.transformers.{mod}")
    classes = {getattr(m, cls) for mod, cls in _WIDTH_FUSIONS for name, m in list(sys.modules.items())
               if name.endswith(mod) and hasattr(m, cls)}
    saved = {c: c.__dict__["fuse"] for c in classes}
    counts: dict[str, list] = {}

    def wrap(real):
        def fuse(self, node, input_name_to_nodes, output_name_to_node):
            n_add, n_remove = len(self.nodes_to_add), len(self.nodes_to_remove)
            out = real(self, node, input_name_to_nodes, output_name_to_node)

            def width_of(name):
                t = self.model.get_initializer(name)
                return t.dims[0] if t is not None and len(t.dims) == 1 else None
            whys = [(n.op_type, w) for n in self.nodes_to_add[n_add:] if (w := refused_width(n, width_of))]
            if whys:
                del self.nodes_to_add[n_add:]
                del self.nodes_to_remove[n_remove:]
                for op, why in whys:
                    counts.setdefault(op, [why, 0])[1] += 1
            return out
        return fuse

    for c, real in saved.items():
        c.fuse = wrap(real)
    try:
        yield
    finally:
        for c, real in saved.items():
            c.fuse = real
        left_out.update({op: f"{why} ({n} places)" for op, (why, n) in counts.items()})


# Ops whose first output has the element type of their first input (ONNX and com.microsoft schemas);
# Where's is its second input's; the outputs of _TYPED_OUTPUTS, and all of Split's, are typed so too.
_SAME_TYPE_OPS = frozenset(
    "Transpose Reshape Identity Squeeze Unsqueeze Flatten Slice Concat Split Expand Tile Pad Resize Gather "
    "GatherElements DepthToSpace SpaceToDepth Add Sub Mul Div Pow Neg Abs Max Min Sum Mean Clip Round Floor Ceil "
    "Reciprocal Relu LeakyRelu Elu Sigmoid HardSigmoid Softplus Tanh Erf Sqrt Exp Log Sin Cos Softmax Gelu "
    "ReduceMean ReduceSum ReduceMax Conv ConvTranspose MatMul Gemm AveragePool MaxPool GlobalAveragePool "
    "InstanceNormalization BatchNormalization LayerNormalization GroupNorm SkipGroupNorm NhwcConv "
    "BiasSplitGelu BiasAdd BiasGelu FastGelu QuickGelu MultiHeadAttention Attention SkipLayerNormalization".split())
_TYPE_FROM_INPUT = {"Where": 1}
_TYPED_OUTPUTS = {"SkipGroupNorm": (0, 1), "SkipLayerNormalization": (0, 3)}     # output, input+skip sum


def remove_no_op_casts(graph) -> int:
    """Bypass every Cast whose input already has the target type (an identity); return how many.

    The NhwcConv fusion cannot see the type of the Transpose it has just added, so it puts a
    Cast(to=fp16) in front of every NhwcConv of an fp16 graph. Harmless to ONNX Runtime 1.31, but the
    CPU provider of 1.30 mistypes them while loading ("Type (tensor(float)) of output arg
    (InsertedPrecisionFreeCast_...) does not match expected type (tensor(float16))"), so the graph
    would fail `check_loads` there. Types are followed from the graph's inputs, initializers,
    Constants and Casts through `_SAME_TYPE_OPS`; a Cast whose input type is unknown stays."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
    changed = True
    while changed:                          # nodes may be out of order: to a fixed point
        changed = False
        for n in graph.node:
            if not n.output or n.output[0] in types:
                continue
            if n.op_type == "Cast":
                t = next((a.i for a in n.attribute if a.name == "to"), None)
            elif n.op_type in _SAME_TYPE_OPS or n.op_type in _TYPE_FROM_INPUT:
                k = _TYPE_FROM_INPUT.get(n.op_type, 0)
                if len(n.input) <= k or n.input[k] not in types:
                    continue
                t = types[n.input[k]]
            else:
                continue
            idx = range(len(n.output)) if n.op_type == "Split" else _TYPED_OUTPUTS.get(n.op_type, (0,))
            for i in idx:
                if i < len(n.output) and n.output[i]:
                    types[n.output[i]] = t
            changed = True
    graph_outputs = {o.name for o in graph.output}
    drop = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in graph_outputs
            and types.get(n.input[0]) is not None
            and types[n.input[0]] == next((a.i for a in n.attribute if a.name == "to"), None)]
    for n in drop:
        for m in graph.node:
            for i, x in enumerate(m.input):
                if x == n.output[0]:
                    m.input[i] = n.input[0]
        graph.node.remove(n)
    return len(drop)


@contextlib.contextmanager
def _declared_initializer_types():
    """While the optimizer runs, an array it adds as an initializer is cast to the type it declares."""
    import importlib
    import sys

    import numpy as np
    from onnx import helper

    importlib.import_module("onnxruntime.transformers.fusion_base")   # the optimizer also imports it as `fusion_base`
    classes = {m.Fusion for name, m in sys.modules.items() if name.endswith("fusion_base") and hasattr(m, "Fusion")}
    saved = {c: c.__dict__["add_initializer"] for c in classes}

    def wrap(real):
        def add_initializer(self, name, data_type, dims, vals, raw=True):
            if isinstance(vals, np.ndarray):
                vals = vals.astype(helper.tensor_dtype_to_np_dtype(data_type), copy=False)
            return real(self, name, data_type, dims, vals, raw)
        return add_initializer

    for c, real in saved.items():
        c.add_initializer = wrap(real)
    try:
        yield
    finally:
        for c, real in saved.items():
            c.add_initializer = real


class FusedGraphError(RuntimeError):
    """A fused graph ONNX Runtime rejects for a reason other than its CUDA-only kernels."""


def check_loads(path: str | Path) -> None:
    """Load `path` with ONNX Runtime's CPU provider and no graph optimisation: the graph must pass its
    type and shape checks and fail only on a kernel the CPU provider lacks (the fused CUDA ops)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        if "NOT_IMPLEMENTED" not in str(e):
            raise FusedGraphError(f"{Path(path).name}: ONNX Runtime rejects the fused graph "
                                  f"({str(e).strip().splitlines()[0][:300]}); please report it") from e


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
    """The optimizer logs every fusion, prints that onnx shape inference cannot type its contrib ops
    (expected: the fused graph is typed by ONNX Runtime), and shows a bare tqdm bar ("fusion", 18
    steps) on stderr; the export says what it is doing itself. Its errors are raised, not printed."""
    import io

    names = ("onnxruntime.transformers", "fusion_base", "onnx_model", "float16", "fusion_utils")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
