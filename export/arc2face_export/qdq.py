"""Q/DQ placement for the step graphs' UNet, the way NVIDIA's Stable Diffusion int8/FP8 recipe places it.

The recipe (TensorRT Model Optimizer PTQ for SD1.5, as used by NVIDIA's diffusion demo) on an **fp16**
UNet, reproduced here as an ONNX pass over our own fp16 step graph:
  * Q/DQ on the activation input and the weight of every Conv / Gemm / MatMul whose weight is a constant
    (int8: per-output-channel symmetric weights; FP8 E4M3: per-tensor weights, as ModelOpt's FP8 config);
  * attention's activation x activation MatMuls (QK^T, P.V) carry no Q/DQ: they stay fp16, so
    TensorRT keeps its fused attention kernel;
  * the layers ModelOpt's diffusers example filters out stay fp16: time embedding (`time_embedding`,
    `time_emb_proj`), `conv_in`, `conv_out` and the resnets' `conv_shortcut` (`KEEP_FP16`);
  * a residual Add fed directly by a quantised Conv can get Q/DQ on its *other* input, so TensorRT can
    fuse conv + bias + add in int8/FP8 (TensorRT developer guide, "Q/DQ layer-placement
    recommendations"): `plan_placement` lists those adds, the recipe decides (`QuantRecipe.residual_qdq`,
    off by default: it quantises the residual stream, which costs the most accuracy);
  * which Linear layers (MatMul/Gemm with constant weights) join the convs follows ModelOpt's
    diffusers `quant-level` (`QUANT_LEVELS`): 1 convs only, 2 + the feed-forwards (`ff.net`), 2.5 + the
    attention q/k/v projections, 3 (default) + every other Linear (`to_out`); the rest stay fp16;
  * optional SmoothQuant (Xiao et al. 2023) on the MatMul inputs: x' = x / s, W' = diag(s) W with
    s_k = max|x_k|^a / max|W_k|^(1-a), one s per input tensor (q/k/v share theirs);
  * everything else (norms, SiLU, softmax, adds, the scheduler update) keeps the source graph's types.
Activation scales are per tensor (amax / 127 for int8, amax / 448 for FP8), from `calib.Stats`.
Q/DQ on fp16 tensors needs QuantizeLinear-19 (fp16 scales) and FP8 needs it too, so the graph's opset
is raised to 19; every op that changed from 18 to 19 (Cast, Pad, Reshape, Resize, Shape, ...) kept its
old meaning for the attributes our exporter writes.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANT_PRECISIONS = ("int8", "fp8")
QDQ_OPSET = 19
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# ModelOpt's diffusers quantisation example filters these module names out of quantisation.
KEEP_FP16 = re.compile(r"time_emb_proj|time_embedding|time_proj|add_embedding|conv_in\b|conv_out\b|conv_shortcut")
QUANT_LEVELS = (1.0, 2.0, 2.5, 3.0)
_FFN = re.compile(r"(^|[./])ff[./]net")
_QKV = re.compile(r"[./]to_[qkv]([./]|$)")
QMAX = {"int8": 127.0, "fp8": 448.0}             # symmetric int8 range; largest finite float8 e4m3fn
_MIN_SCALE = 2.0 ** -14                           # smallest normal fp16: a zero scale is invalid


@dataclass
class Placement:
    """Where Q/DQ goes in one graph (node and tensor names)."""
    quantized: list[str] = field(default_factory=list)          # weighted nodes that get Q/DQ
    kept: dict[str, str] = field(default_factory=dict)          # weighted node -> why it stays float
    attention_bmms: list[str] = field(default_factory=list)     # activation x activation MatMuls, no Q/DQ
    activations: list[str] = field(default_factory=list)        # tensors quantised as a weighted node's input
    residuals: dict[str, str] = field(default_factory=dict)     # Add node -> its quantised residual input
    matmul_inputs: set[str] = field(default_factory=set)        # activations consumed only by MatMul/Gemm

    def observed(self) -> list[str]:
        """Every tensor calibration must see (each once)."""
        return sorted(set(self.activations) | set(self.residuals.values()))


def _weight(node, inits) -> str | None:
    """The constant weight input of a Conv/Gemm/MatMul, or None (activation x activation)."""
    if node.op_type == "Conv" or node.op_type == "Gemm":
        return node.input[1] if node.input[1] in inits else None
    if node.op_type == "MatMul":
        w = node.input[1]
        return w if w in inits and inits[w].dims and len(inits[w].dims) == 2 else None
    return None


def name_nodes(model: onnx.ModelProto) -> None:
    """Placement is recorded by node name: give unnamed nodes stable ones."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def _below_level(node, level: float) -> bool:
    """A Linear layer (MatMul/Gemm) that quant level `level` leaves in float (convs join at every level)."""
    if node.op_type == "Conv" or level >= 3.0:
        return False
    if _FFN.search(node.name):
        return level < 2.0
    if _QKV.search(node.name):
        return level < 2.5
    return True


def plan_placement(model: onnx.ModelProto, level: float = 3.0) -> Placement:
    """Decide the Q/DQ placement of `model` at quant level `level` (see the module docstring); the graph
    is not changed. Levels nest: a lower level's quantised layers are a subset of a higher one's."""
    if level not in QUANT_LEVELS:
        raise ValueError(f"quant level {level} not in {QUANT_LEVELS}")
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    p = Placement()
    quantized_convs = set()
    for n in g.node:
        if n.op_type not in WEIGHTED_OPS:
            continue
        w = _weight(n, inits)
        if w is None:
            if n.op_type == "MatMul":
                p.attention_bmms.append(n.name)
            continue
        m = KEEP_FP16.search(n.name)
        if m:
            p.kept[n.name] = m.group(0)
            continue
        if _below_level(n, level):
            p.kept[n.name] = f"quant level {level:g}"
            continue
        p.quantized.append(n.name)
        if n.input[0] not in p.activations:
            p.activations.append(n.input[0])
        if n.op_type == "Conv":
            quantized_convs.add(n.output[0])
    quantized = set(p.quantized)
    activations = set(producer) | {i.name for i in g.input}
    for t in p.activations:
        users = [c for c in consumers[t] if c.name in quantized]
        if all(c.op_type in ("MatMul", "Gemm") for c in users):
            p.matmul_inputs.add(t)
    for n in g.node:   # conv -> Add(residual): Q/DQ on the residual so TensorRT fuses the add into the conv
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        a, b = n.input
        for conv_out, other in ((a, b), (b, a)):
            if conv_out in quantized_convs and other not in inits and other in activations:
                if other not in p.matmul_inputs:
                    p.residuals[n.name] = other
                break
    return p


# ----------------------------------------------------------------------------- numbers

def _fp16_scale(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, _MIN_SCALE).astype(np.float16).astype(np.float32)


def activation_scale(amax: float, precision: str) -> np.float32:
    return _fp16_scale(np.float32(amax / QMAX[precision]))


def quantize_weight(w: np.ndarray, axis: int | None, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(quantised weight, scale): per-channel along `axis` (int8) or per tensor (axis None)."""
    w = w.astype(np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), np.float32)
    else:
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1)
    scale = _fp16_scale(amax / QMAX[precision])
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    x = w / scale.reshape(shape)
    if precision == "int8":
        return np.clip(np.rint(x), -127, 127).astype(np.int8), scale
    import ml_dtypes  # onnx's own float8 dependency

    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale


def _weight_axis(node) -> int:
    """Output-channel axis of the weight: Conv [O,I,kh,kw] 0; MatMul [K,N] 1; Gemm [N,K] (transB) 0 else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 1


def _in_axis(node) -> int:
    """Input-channel axis of a MatMul/Gemm weight (SmoothQuant scales it)."""
    return 1 - _weight_axis(node)


def smoothing_scales(x_chan_amax: np.ndarray, weights: list[tuple], alpha: float) -> np.ndarray:
    """SmoothQuant's s_k = max|x_k|^a / max|W_k|^(1-a) over every weight that reads the tensor."""
    w_amax = np.max([np.abs(np.moveaxis(w, ax, 0)).reshape(w.shape[ax], -1).max(1) for w, ax in weights], axis=0)
    s = np.power(np.maximum(x_chan_amax, 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)   # keep x / s and W * s inside fp16's range


# ----------------------------------------------------------------------------- graph rewrite

_ZERO = {"int8": (TensorProto.INT8, 0), "fp8": (TensorProto.FLOAT8E4M3FN, 0)}


def _zero_point(name: str, precision: str, shape=()) -> onnx.TensorProto:
    dtype, _ = _ZERO[precision]
    return helper.make_tensor(name, dtype, list(shape), [0] * int(np.prod(shape, dtype=np.int64)))


def _float_init(name: str, arr: np.ndarray, dtype: int) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype)), name)


def insert_qdq(model: onnx.ModelProto, p: Placement, stats, precision: str, alpha: float | None = None,
               method: str = "max") -> dict:
    """Rewrite `model` in place with the Q/DQ of `p`; `stats` is a calib.Stats over `p.observed()`,
    read with calibration `method` ("max" | "percentile"); `alpha`: SmoothQuant's, None/0 for none.

    Returns {"smoothed": n tensors, "qdq_activations": n, "qdq_residuals": n}."""
    if precision not in QUANT_PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {QUANT_PRECISIONS}")
    _raise_opset(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    new_nodes: dict[str, list] = defaultdict(list)   # node name -> nodes to insert before it
    new_inits: list = []
    smoothed = 0
    conv_dtype = {nodes[m].output[0]: inits[nodes[m].input[1]].data_type for m in p.quantized
                  if nodes[m].op_type == "Conv"}

    def qdq(src: str, tag: str, amax: float, dtype: int, before: str) -> str:
        scale = activation_scale(amax, precision)
        s, z = f"{tag}_qscale", f"{tag}_qzero"
        new_inits.extend([_float_init(s, np.array(scale), dtype), _zero_point(z, precision)])
        new_nodes[before] += [helper.make_node("QuantizeLinear", [src, s, z], [f"{tag}_q"], name=f"{tag}_Q"),
                              helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"], name=f"{tag}_DQ")]
        return f"{tag}_dq"

    # group the quantised nodes by their activation input (one Q/DQ, one SmoothQuant scale per tensor)
    users = defaultdict(list)
    for name in p.quantized:
        users[nodes[name].input[0]].append(nodes[name])
    order = {n.name: i for i, n in enumerate(g.node)}
    for k, (t, group) in enumerate(sorted(users.items(), key=lambda kv: min(order[n.name] for n in kv[1]))):
        first = min(group, key=lambda n: order[n.name]).name
        dtype = inits[group[0].input[1]].data_type
        tag = f"qdq{k}"
        weights = [(numpy_helper.to_array(inits[n.input[1]]), _in_axis(n)) for n in group]
        src, amax = t, stats.amax(t, method)
        if alpha and t in p.matmul_inputs:
            s = smoothing_scales(stats.channel_amax(t), weights, alpha)
            amax = float(np.max(stats.channel_amax(t) / s))
            new_inits.append(_float_init(f"{tag}_smooth", 1.0 / s, dtype))
            new_nodes[first].append(helper.make_node("Mul", [t, f"{tag}_smooth"], [f"{tag}_smoothed"], name=f"{tag}_Smooth"))
            src = f"{tag}_smoothed"
            for n in group:   # W' = diag(s) W along the input-channel axis
                w, ax = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32), _in_axis(n)
                shape = [1, 1]
                shape[ax] = -1
                inits[n.input[1]].CopyFrom(_float_init(n.input[1], w * s.reshape(shape), inits[n.input[1]].data_type))
            smoothed += 1
        out = qdq(src, tag, amax, dtype, first)
        for n in group:
            n.input[0] = out
    dq_of: dict[str, str] = {}
    for n in (nodes[name] for name in p.quantized):   # weights: stored quantised, DQ before use
        w_name = n.input[1]
        if w_name in dq_of:                            # a weight shared by several layers: one DQ
            n.input[1] = dq_of[w_name]
            continue
        axis = _weight_axis(n) if precision == "int8" else None
        q, scale = quantize_weight(numpy_helper.to_array(inits[w_name]), axis, precision)
        dtype = inits[w_name].data_type
        qn, s, z = f"{w_name}_quantized", f"{w_name}_wscale", f"{w_name}_wzero"
        init_q = numpy_helper.from_array(q, qn) if precision == "int8" else \
            helper.make_tensor(qn, TensorProto.FLOAT8E4M3FN, q.shape, q.view(np.uint8).tobytes(), raw=True)
        new_inits.extend([init_q, _float_init(s, scale, dtype), _zero_point(z, precision, scale.shape)])
        kw = {"axis": axis} if axis is not None else {}
        new_nodes[n.name].append(helper.make_node("DequantizeLinear", [qn, s, z], [f"{w_name}_dq"],
                                                  name=f"{w_name}_DQ", **kw))
        n.input[1] = dq_of[w_name] = f"{w_name}_dq"
    for k, (add, t) in enumerate(sorted(p.residuals.items())):
        n = nodes[add]
        dtype = next(conv_dtype[i] for i in n.input if i in conv_dtype)
        out = qdq(t, f"res{k}", stats.amax(t, method), dtype, add)
        n.input[:] = [out if i == t else i for i in n.input]
    rebuilt = []
    for n in g.node:
        rebuilt += new_nodes.get(n.name, [])
        rebuilt.append(n)
    del g.node[:]
    g.node.extend(rebuilt)
    used = {i for n in g.node for i in n.input}
    kept = [i for i in list(g.initializer) + new_inits if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return {"smoothed": smoothed, "qdq_activations": len(users), "qdq_residuals": len(p.residuals)}


def _raise_opset(model: onnx.ModelProto) -> None:
    """Opset 19 in place: opset-18 graphs (our exports) by renumbering (see the module docstring), older
    ones through onnx's version converter (small test graphs)."""
    default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default.version >= QDQ_OPSET:
        return
    if default.version >= 18:
        default.version = QDQ_OPSET
    else:
        from onnx import version_converter

        model.CopyFrom(version_converter.convert_version(model, QDQ_OPSET))
