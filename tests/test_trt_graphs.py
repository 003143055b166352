"""Tiny stage-shaped ONNX graphs for the TensorRT tests (the builder needs no real model).

Each graph has exactly the I/O names, dtypes and shapes of its `specs.STAGES` entry, and the step
graphs compute the real scheduler update (x_in = s*x, CFG, m0 = a*x + b*eps,
x_out = c0*x + c1*m0 + c2*m_prev + c3*noise) around a 3x3 conv standing in for the UNet, so GPU
parity tests and the CUDA-graph denoise loop check real arithmetic. Other test modules import
`make_stage_onnx` / `make_engines_dir` from here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from arc2face_rt import manifest as mf
from arc2face_rt import specs

_ONNX_DTYPES = {"float32": TP.FLOAT, "float16": TP.FLOAT16, "uint8": TP.UINT8, "int64": TP.INT64}


def _vi(t: specs.TensorSpec):
    return h.make_tensor_value_info(t.name, _ONNX_DTYPES[t.dtype], list(t.shape))


def _init(name, arr):
    return nh.from_array(np.asarray(arr), name)


def _scalar(k: int, out: str):
    """out = coeffs[k] (a 0-d tensor that broadcasts against anything)."""
    return h.make_node("Gather", ["coeffs", f"idx{k}"], [out], axis=0)


def _step_nodes(cfg: bool, rng):
    w = (rng.standard_normal((4, 4, 3, 3)) * 0.1).astype(np.float32)
    inits = [_init(f"idx{k}", np.array(k, np.int64)) for k in range(8)]
    w2 = (np.eye(4, dtype=np.float32)[:, :, None, None] + rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.1)
    inits += [_init("w_c", w), _init("w_2", w2), _init("w_3", w2[::-1].copy()), 
              _init("shape_b111", np.array([-1, 1, 1, 1], np.int64)), _init("t_scale", np.array(1e-3, np.float32))]
    names = ["t", "s", "a", "b", "c0", "c1", "c2", "c3"]
    nodes = [_scalar(k, n) for k, n in enumerate(names)]
    nodes += [
        h.make_node("Mul", ["x", "s"], ["x_in"]),
        h.make_node("Conv", ["x_in", "w_c"], ["conv_1"], pads=[1, 1, 1, 1]),   # three convs: the middle
        h.make_node("Conv", ["conv_1", "w_2"], ["conv_2"]),                     # ones are what int8 quantises
        h.make_node("Conv", ["conv_2", "w_3"], ["conv_c"]),
        h.make_node("ReduceMean", ["cond"], ["cond_mean"], axes=[1, 2], keepdims=0),      # [B]
        h.make_node("Reshape", ["cond_mean", "shape_b111"], ["cond_b"]),                  # [B,1,1,1]
        h.make_node("Mul", ["t", "t_scale"], ["t_term"]),
        h.make_node("Add", ["conv_c", "cond_b"], ["eps_c0"]),
        h.make_node("Add", ["eps_c0", "t_term"], ["eps_c"]),
    ]
    if cfg:   # eps = eps_u + g*(eps_c - eps_u); the "uncond" branch is another conv
        inits.append(_init("w_u", (w[::-1] * 0.5).copy()))
        nodes += [h.make_node("Conv", ["x_in", "w_u"], ["eps_u"], pads=[1, 1, 1, 1]),
                  h.make_node("Sub", ["eps_c", "eps_u"], ["d"]),
                  h.make_node("Mul", ["d", "guidance"], ["gd"]),
                  h.make_node("Add", ["eps_u", "gd"], ["eps"])]
    else:
        nodes += [h.make_node("Identity", ["eps_c"], ["eps"])]
    nodes += [
        h.make_node("Mul", ["a", "x"], ["ax"]), h.make_node("Mul", ["b", "eps"], ["beps"]),
        h.make_node("Add", ["ax", "beps"], ["m0"]),
        h.make_node("Mul", ["c0", "x"], ["u0"]), h.make_node("Mul", ["c1", "m0"], ["u1"]),
        h.make_node("Mul", ["c2", "m_prev"], ["u2"]), h.make_node("Mul", ["c3", "noise"], ["u3"]),
        h.make_node("Add", ["u0", "u1"], ["v0"]), h.make_node("Add", ["u2", "u3"], ["v1"]),
        h.make_node("Add", ["v0", "v1"], ["x_out"]),
    ]
    return nodes, inits


def _projector_nodes(rng):
    w = (rng.standard_normal((specs.ID_DIM, specs.TEXT_DIM)) * 0.05).astype(np.float32)
    pos = (rng.standard_normal((specs.TEXT_LEN, specs.TEXT_DIM)) * 0.1).astype(np.float32)
    nodes = [h.make_node("MatMul", ["id", "w"], ["e"]),                       # [B,768]
             h.make_node("Unsqueeze", ["e", "ax1"], ["e1"]),                   # [B,1,768]
             h.make_node("Add", ["e1", "pos"], ["cond"])]                      # [B,77,768]
    return nodes, [_init("w", w), _init("pos", pos), _init("ax1", np.array([1], np.int64))]


def _vae_nodes(rng):
    w = (rng.standard_normal((3, 4, 1, 1)) * 0.5).astype(np.float32)
    nodes = [h.make_node("Resize", ["latents", "", "scales"], ["up"], mode="nearest"),   # [B,4,512,512]
             h.make_node("Conv", ["up", "w"], ["rgb"]),                                 # [B,3,512,512]
             h.make_node("Transpose", ["rgb"], ["nhwc"], perm=[0, 2, 3, 1]),
             h.make_node("Mul", ["nhwc", "k127"], ["y"]), h.make_node("Add", ["y", "k127"], ["y1"]),
             h.make_node("Clip", ["y1", "k0", "k255"], ["y2"]),
             h.make_node("Round", ["y2"], ["y3"]),
             h.make_node("Cast", ["y3"], ["image"], to=TP.UINT8)]
    inits = [_init("scales", np.array([1, 1, 8, 8], np.float32)), _init("w", w),
             _init("k127", np.array(127.5, np.float32)), _init("k0", np.array(0, np.float32)),
             _init("k255", np.array(255, np.float32))]
    return nodes, inits


_KEEP_FP32 = {"scales"}   # Resize scales must stay float32


def _to_fp16_inside(graph) -> None:
    """Compute in fp16, keep fp32 I/O (as the lead's fp16 export does): cast at the boundary."""
    for init in graph.initializer:
        if init.data_type == TP.FLOAT and init.name not in _KEEP_FP32:
            init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), init.name))
    rename = {}
    casts_in = []
    for vi in graph.input:
        if vi.type.tensor_type.elem_type == TP.FLOAT:
            rename[vi.name] = vi.name + "_h"
            casts_in.append(h.make_node("Cast", [vi.name], [vi.name + "_h"], to=TP.FLOAT16))
    out_names = {vi.name for vi in graph.output if vi.type.tensor_type.elem_type == TP.FLOAT}
    nodes = list(graph.node)
    for n in nodes:
        n.input[:] = [rename.get(i, i + "_h" if i in out_names else i) for i in n.input]
        n.output[:] = [o + "_h" if o in out_names else o for o in n.output]
    casts_out = [h.make_node("Cast", [o + "_h"], [o], to=TP.FLOAT) for o in sorted(out_names)]
    del graph.node[:]
    graph.node.extend(casts_in + nodes + casts_out)


def make_stage_onnx(name: str, path: str | Path, precision: str = "fp32", seed: int = 0) -> Path:
    """Write a tiny graph with stage `name`'s exact I/O; fp16 computes in half inside, fp32 at the boundary."""
    spec = specs.STAGES[name]
    rng = np.random.default_rng(seed)
    if name in ("step", "step_cfg"):
        nodes, inits = _step_nodes(name == "step_cfg", rng)
    elif name == "projector":
        nodes, inits = _projector_nodes(rng)
    elif name == "vae_decoder":
        nodes, inits = _vae_nodes(rng)
    else:
        raise ValueError(name)
    graph = h.make_graph(nodes, f"tiny_{name}", [_vi(t) for t in spec.inputs], [_vi(t) for t in spec.outputs], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="arc2face-rt-tests")
    model.ir_version = 9
    if precision == "fp16":
        _to_fp16_inside(model.graph)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def make_engines_dir(root: str | Path, precision: str = "fp32", stages=tuple(specs.STAGES)) -> Path:
    """An engines folder shaped like `arc2face-export onnx` output: tiny graphs + manifest.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = {}
    for i, name in enumerate(stages):
        spec = specs.STAGES[name]
        p = make_stage_onnx(name, root / spec.onnx_file, precision, seed=i)
        records[name] = {"file": spec.onnx_file, "files": {spec.onnx_file: mf.file_record(p)},
                         "inputs": [[t.name, t.dtype, list(t.shape)] for t in spec.inputs],
                         "outputs": [[t.name, t.dtype, list(t.shape)] for t in spec.outputs]}
    mf.write_json_atomic(root / mf.MANIFEST, {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "spec_revision": specs.SPEC_REVISION,
        "precision": precision, "opset": 17, "source": {"model_dir": None, "kind": "tiny-test-graphs"},
        "stages": records})
    return root


def random_feeds(spec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {t.name: rng.standard_normal(t.concrete(batch)).astype(t.dtype) for t in spec.inputs}
    if "coeffs" in feeds:   # t, s, a, b, c0, c1, c2, c3: a plausible DPM-Solver-like row
        feeds["coeffs"] = np.array([999, 1.0, 1.2, -0.6, 0.5, 0.5, 0.1, 0.05], np.float32)
    if "guidance" in feeds:
        feeds["guidance"] = np.array([3.0], np.float32)
    return feeds


@pytest.mark.parametrize("name", list(specs.STAGES))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_graphs_match_specs_under_onnxruntime(tmp_path, name, precision):
    import onnxruntime as ort

    spec = specs.STAGES[name]
    path = make_stage_onnx(name, tmp_path / spec.onnx_file, precision)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, random_feeds(spec, 2))
    for t, o in zip(spec.outputs, outs):
        assert o.shape == t.concrete(2) and o.dtype == np.dtype(t.dtype)
