"""int8 / FP8 step graphs (issue 13): Q/DQ placed as NVIDIA's SD recipe places it, on the tiny fp16 UNet.

One module-scoped folder: the tiny checkpoint's fp16 projector + step_cfg, quantised to int8 and FP8
with a calibration the pipeline itself drives (1 identity x every step of a 3-step schedule). The
structural tests read the written ONNX with onnx (shape inference for the float types); the build
test hands both graphs to TensorRT-RTX, which builds on the CPU.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from arc2face_rt import manifest as mf
from arc2face_rt.errors import InvalidInputError

quantize = pytest.importorskip("arc2face_export.quantize")
from arc2face_export import calib, qdq  # noqa: E402

CAL = calib.Calibration(identities=1, steps=3)
FLOAT_OPS = ("Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "InstanceNormalization", "Sigmoid", "Add",
             "Mul", "Div", "Erf")


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    d = tmp_path_factory.mktemp("quant") / "fp16"
    export_all(tiny_model_dir, d, precision="fp16", stages=("projector", "step_cfg"))
    quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("int8"), quantize.QuantRecipe("fp8")], CAL,
                                 stages=["step_cfg"], device="cpu")
    return d


def _graph(d, precision):
    return onnx.load(str(d / quantize.quant_onnx_file("step_cfg", precision)))


def _producers(g):
    return {o: n for n in g.node for o in n.output}


def _weighted(g):
    return [n for n in g.node if n.op_type in qdq.WEIGHTED_OPS]


def _from_dq(name, prod, inits, want_dtype=None):
    """`name` is the output of a DequantizeLinear (of an initializer of `want_dtype`, when given)."""
    n = prod.get(name)
    if n is None or n.op_type != "DequantizeLinear":
        return False
    return want_dtype is None or (n.input[0] in inits and inits[n.input[0]].data_type == want_dtype)


@pytest.mark.parametrize("precision,qtype", [("int8", TensorProto.INT8), ("fp8", TensorProto.FLOAT8E4M3FN)])
def test_qdq_placement_follows_the_recipe(quantized, precision, qtype):
    g = _graph(quantized, precision).graph
    prod, inits = _producers(g), {i.name: i for i in g.initializer}
    kept, quantised, bmms = [], [], []
    for n in _weighted(g):
        w_is_dq = _from_dq(n.input[1], prod, inits, qtype)
        if w_is_dq:
            quantised.append(n.name)
            assert _from_dq(n.input[0], prod, inits), f"{n.name}: weight quantised but not its input"
        elif n.input[1] in inits:
            kept.append(n.name)
            assert not _from_dq(n.input[0], prod, inits), f"{n.name} stays fp16 but reads a DQ"
            assert inits[n.input[1]].data_type == TensorProto.FLOAT16
        else:
            bmms.append(n.name)
            assert not any(_from_dq(i, prod, inits) for i in n.input), f"{n.name}: attention BMM has Q/DQ"
    # every weighted layer is quantised except exactly the recipe's exclusions
    assert kept and all(qdq.KEEP_FP16.search(k) for k in kept)
    assert not any(qdq.KEEP_FP16.search(q) for q in quantised)
    for must in ("conv_in", "conv_out", "conv_shortcut", "time_embedding", "time_emb_proj"):
        assert any(must in k for k in kept), must
    assert any("attn1" in b for b in bmms) and any("attn2" in b for b in bmms)   # QK^T and P.V of both
    assert sum("to_q" in q for q in quantised) >= 2 and sum("/ff/" in q for q in quantised) >= 2
    assert len(quantised) > 2 * len(kept)


def _conv_fed_adds(g):
    """The residual adds TensorRT could fuse into a quantised conv: (add node, its other inputs)."""
    prod, inits = _producers(g), {i.name: i for i in g.initializer}
    qconvs = {n.output[0] for n in g.node if n.op_type == "Conv" and _from_dq(n.input[1], prod, inits)}
    adds = [n for n in g.node if n.op_type == "Add" and any(i in qconvs for i in n.input)
            and all(i not in inits for i in n.input)]
    return [(n, [i for i in n.input if i not in qconvs]) for n in adds], prod, inits


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_residual_adds_carry_no_qdq_by_default(quantized, precision):
    """The residual stream stays fp16 unless asked (full size: 33 dB image PSNR without, 27 dB with)."""
    adds, prod, inits = _conv_fed_adds(_graph(quantized, precision).graph)
    assert len(adds) >= 4      # resnets' conv2 + skip, transformers' proj_out + residual
    for n, other in adds:
        assert other and not any(_from_dq(i, prod, inits) for i in other), n.name
    rec = mf.load_manifest(quantized)[mf.QUANT_SECTIONS[precision]]["step_cfg"]
    assert rec["recipe"]["residual_qdq"] is False and rec["residual_add_qdq"] == 0


def test_residual_qdq_option_quantises_the_residual_input_of_conv_fed_adds(quantized, tmp_path):
    """`--residual-qdq`: Q/DQ on the other input of every add fed by a quantised conv, so TensorRT can
    fuse conv + add in int8."""
    d = tmp_path / "e"
    shutil.copytree(quantized, d)
    quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("int8", residual_qdq=True)], CAL, stages=["step_cfg"],
                                 device="cpu")
    adds, prod, inits = _conv_fed_adds(_graph(d, "int8").graph)
    assert len(adds) >= 4
    for n, other in adds:
        assert other and all(_from_dq(i, prod, inits) for i in other), n.name
    rec = mf.load_manifest(d)["quantized"]["step_cfg"]
    assert rec["recipe"]["residual_qdq"] is True and rec["residual_add_qdq"] == len(adds)


def test_quant_levels_nest_and_pick_modelopts_layer_families(quantized):
    """ModelOpt's diffusers quant-level: 1 convs, 2 + feed-forwards, 2.5 + q/k/v, 3 + every Linear."""
    base = onnx.load(str(quantized / "step_cfg.onnx"), load_external_data=False)
    qdq.name_nodes(base)
    kind = {n.name: n.op_type for n in base.graph.node}
    got = {lv: set(qdq.plan_placement(base, lv).quantized) for lv in qdq.QUANT_LEVELS}
    linear = {lv: {n for n in q if kind[n] != "Conv"} for lv, q in got.items()}
    assert got[1.0] < got[2.0] < got[2.5] < got[3.0]
    assert got[1.0] == {n for n in got[3.0] if kind[n] == "Conv"} and not linear[1.0]
    assert linear[2.0] and all("/ff/net" in n for n in linear[2.0])
    assert linear[2.5] - linear[2.0] and all(re.search(r"/to_[qkv]/", n) for n in linear[2.5] - linear[2.0])
    assert linear[3.0] - linear[2.5] and all("/to_out" in n for n in linear[3.0] - linear[2.5])
    kept = qdq.plan_placement(base, 2.0).kept
    assert all(kept[n] == "quant level 2" for n in got[3.0] - got[2.0])
    with pytest.raises(ValueError, match="quant level"):
        qdq.plan_placement(base, 1.5)


def test_a_lower_quant_level_leaves_attention_projections_in_fp16(quantized, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(quantized, d)
    quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("fp8", level=2.0)], CAL, stages=["step_cfg"], device="cpu")
    g = _graph(d, "fp8").graph
    prod, inits = _producers(g), {i.name: i for i in g.initializer}
    ff = [n for n in _weighted(g) if "/ff/net" in n.name]
    attn = [n for n in _weighted(g) if re.search(r"/to_(q|k|v|out)", n.name) and n.input[1] in inits]
    assert ff and attn
    assert all(_from_dq(n.input[1], prod, inits, TensorProto.FLOAT8E4M3FN) for n in ff)
    assert not any(_from_dq(n.input[0], prod, inits) for n in attn)
    rec = mf.load_manifest(d)["quantized_fp8"]["step_cfg"]
    assert rec["recipe"]["level"] == 2.0 and sum(v == "quant level 2" for v in rec["fp16_layers"].values()) == len(attn)
    with pytest.raises(InvalidInputError, match="quant level 1.5"):
        quantize.QuantRecipe("int8", level=1.5).resolved()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_float_ops_stay_fp16_and_scales_are_fp16(quantized, precision):
    """Quantising adds Q/DQ; it does not widen: every float tensor that was fp16 stays fp16."""
    m_q = onnx.shape_inference.infer_shapes(_graph(quantized, precision))
    m_b = onnx.shape_inference.infer_shapes(onnx.load(str(quantized / "step_cfg.onnx")))
    assert m_q.opset_import[0].version >= 19

    def types(m):
        return {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.output)}

    tq, tb = types(m_q), types(m_b)
    unet_ops = [n for n in m_q.graph.node if n.name.startswith("/unet/") and n.op_type in FLOAT_OPS]
    floats = [(n, o) for n in unet_ops for o in n.output if tb.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert sum(tb[o] == TensorProto.FLOAT16 for _, o in floats) > 100
    for n, o in floats:
        assert tq[o] == tb[o], (n.name, o, tq[o], tb[o])
        if n.op_type in ("Conv", "MatMul", "Softmax", "LayerNormalization", "InstanceNormalization"):
            assert tq[o] == TensorProto.FLOAT16, (n.name, o)
    fp32 = {k for k, v in tq.items() if v == TensorProto.FLOAT}
    assert fp32 <= {k for k, v in tb.items() if v == TensorProto.FLOAT}   # no new fp32 tensors
    inits = {i.name: i for i in m_q.graph.initializer}
    for n in m_q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[n.input[1]].data_type == TensorProto.FLOAT16, n.name
            zp = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
            assert inits[n.input[2]].data_type == zp, n.name


def test_int8_weights_are_per_channel_fp8_per_tensor(quantized):
    for precision, per_channel in (("int8", True), ("fp8", False)):
        g = _graph(quantized, precision).graph
        prod, inits = _producers(g), {i.name: i for i in g.initializer}
        conv = next(n for n in g.node if n.op_type == "Conv" and _from_dq(n.input[1], prod, inits))
        dq = prod[conv.input[1]]
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert list(scale.dims) == ([w.dims[0]] if per_channel else []), precision
        if per_channel:   # the stored int8 weight times its scale is the fp16 weight, to half a step
            q = onnx.numpy_helper.to_array(w).astype(np.float32)
            assert np.abs(q).max() == 127


def test_manifest_records_recipe_calibration_and_fp16_layers(quantized):
    m = mf.load_manifest(quantized)     # schema check included
    for precision in ("int8", "fp8"):
        rec = m[mf.QUANT_SECTIONS[precision]]["step_cfg"]
        assert rec["recipe"]["precision"] == precision
        assert rec["recipe"]["smoothquant_alpha"] == (0.8 if precision == "int8" else 0.0)
        assert rec["recipe"]["method"] == ("percentile" if precision == "int8" else "max")
        assert rec["calibration"]["samples"] == CAL.identities * CAL.steps == rec["calibration_samples"]
        assert rec["calibration"]["source"] == "pipeline" and rec["calibration"]["guidance"] == 3.0
        assert "/unet/conv_in/Conv" in rec["fp16_layers"] and rec["attention_bmms_unquantized"] >= 4
        assert rec["residual_add_qdq"] == 0 and rec["quantized_layers"] > 10
        assert rec["source"]["sha256"] == {k: v["sha256"] for k, v in m["stages"]["step_cfg"]["files"].items()}
        for out, loss in rec["loss_vs_source"].items():      # tiny model: quantisation moves little
            assert loss["psnr_db"] > 25, (precision, out, loss)
    assert m["quantized"]["step_cfg"]["smoothed_inputs"] > 0


def test_current_graphs_are_kept_and_a_new_recipe_rewrites(quantized, monkeypatch):
    calls = []
    monkeypatch.setattr(quantize, "quantize_stage", lambda *a, **k: calls.append(a[2]))
    quantize.ensure_quant_graphs(quantized, [quantize.QuantRecipe("int8"), quantize.QuantRecipe("fp8")], CAL,
                                 stages=["step_cfg"])
    assert calls == []
    quantize.ensure_quant_graphs(quantized, [quantize.QuantRecipe("int8", method="max")], CAL, stages=["step_cfg"])
    assert [r.method for r in calls[0]] == ["max"]


def test_a_changed_byte_of_the_same_size_makes_the_graph_stale(quantized, monkeypatch, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    f = d / quantize.quant_onnx_file("step_cfg", "int8")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF                          # a flipped bit deep in the weights, size unchanged
    f.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(quantize, "quantize_stage", lambda *a, **k: calls.append([r.precision for r in a[2]]))
    quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("int8"), quantize.QuantRecipe("fp8")], CAL,
                                 stages=["step_cfg"])
    assert calls == [["int8"]]


def test_rewriting_a_graph_replaces_only_its_own_files(quantized, tmp_path):
    """A new recipe rewrites `step_cfg.int8.onnx` (and its `.data`) and nothing else: a user's files whose
    names merely start with it stay, byte for byte."""
    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    mine = {"step_cfg.int8.onnx.notes.txt": b"my notes", "step_cfg.int8.onnx.bak": b"old graph"}
    for name, data in mine.items():
        (d / name).write_bytes(data)
    old = (d / "step_cfg.int8.onnx").read_bytes()
    quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("int8", method="max")], CAL, stages=["step_cfg"],
                                 device="cpu")
    rec = mf.load_manifest(d)["quantized"]["step_cfg"]
    assert rec["recipe"]["method"] == "max" and list(rec["files"]) == ["step_cfg.int8.onnx"]
    assert (d / "step_cfg.int8.onnx").read_bytes() != old
    assert {name: (d / name).read_bytes() for name in mine} == mine


@pytest.mark.parametrize("name", ["step_cfg.int8.onnx", "step_cfg.int8.onnx.data"])
def test_a_graph_file_the_manifest_does_not_record_is_kept_and_named(quantized, tmp_path, monkeypatch, name):
    """A file at the name of the int8 graph (or of its external data) that the manifest does not record is
    not this tool's: refused, naming it and the fix, before any calibration, and left as it was."""
    from arc2face_rt.errors import OutputExistsError

    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    if name == "step_cfg.int8.onnx":                    # the graph is there, its record is not
        m = json.loads((d / mf.MANIFEST).read_text())
        del m["quantized"]
        (d / mf.MANIFEST).write_text(json.dumps(m))
    else:
        (d / name).write_bytes(b"someone else's weights")
    before = (d / name).read_bytes()

    def calibrated(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(quantize, "calibrate", calibrated)
    with pytest.raises(OutputExistsError) as e:
        quantize.ensure_quant_graphs(d, [quantize.QuantRecipe("int8", method="max")], CAL, stages=["step_cfg"],
                                     device="cpu")
    assert str(e.value) == (f"{d / name}: exists and manifest.json does not record it as this folder's int8 step "
                            f"graph, so it is not replaced; move it out of {d}, then run again")
    assert (d / name).read_bytes() == before


@pytest.mark.parametrize("kill_at", ["manifest", "move"])
def test_a_first_graph_stopped_while_it_lands_is_made_again_not_refused(quantized, tmp_path, monkeypatch, kill_at):
    """A stop as a first-ever int8 graph lands (at its manifest write, or at the move of its file) leaves
    only files the manifest names: the next run quantises again instead of refusing an unrecorded file."""
    import os

    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    m = json.loads((d / mf.MANIFEST).read_text())
    del m["quantized"]
    (d / mf.MANIFEST).write_text(json.dumps(m))
    (d / "step_cfg.int8.onnx").unlink()
    real_write, real_replace = mf.write_json_atomic, os.replace

    def write(path, data, *a, **k):
        if kill_at == "manifest" and "quantized" in data:
            raise KeyboardInterrupt
        return real_write(path, data, *a, **k)

    def replace(src, dst, *a, **k):
        if kill_at == "move" and os.path.basename(dst).startswith("step_cfg.int8.onnx"):
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(mf, "write_json_atomic", write)
    monkeypatch.setattr(os, "replace", replace)
    recipe = [quantize.QuantRecipe("int8")]
    with pytest.raises(KeyboardInterrupt):
        quantize.ensure_quant_graphs(d, recipe, CAL, stages=["step_cfg"], device="cpu")
    monkeypatch.undo()
    quantize.ensure_quant_graphs(d, recipe, CAL, stages=["step_cfg"], device="cpu")
    m = mf.load_manifest(d)
    assert quantize.quant_is_current(d, m, "step_cfg", recipe[0], CAL)


def test_smoothquant_keeps_the_linear_layer_exact():
    """x W == (x / s)(diag(s) W): SmoothQuant's rewrite alone changes nothing but the ranges."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 16)) * np.linspace(0.1, 30, 16), rng.standard_normal((16, 8))
    s = qdq.smoothing_scales(np.abs(x).max(0), [(w, 0)], 0.8)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-10)
    assert np.ptp(np.abs(x / s).max(0)) < np.ptp(np.abs(x).max(0))   # outlier channels flattened


def _rtx_or_skip():
    """TensorRT-RTX (builds without a GPU), or skip."""
    from trt_needed import tensorrt

    trt_build, trt = tensorrt()
    if not trt_build.is_rtx(trt):
        pytest.skip("TensorRT-RTX only (full TensorRT builds only on its target GPU)")
    return trt


def test_trt_builds_int8_and_fp8_plans_with_quantised_convolutions(quantized, tmp_path):
    from arc2face_export import trt_build, trt_network

    trt = _rtx_or_skip()
    d = tmp_path / "e"
    shutil.copytree(quantized, d)
    for precision, qtype in (("int8", "INT8"), ("fp8", "FP8")):
        m = trt_build.build_engines(d, stages=["step_cfg"], precision=precision)
        plan = m["plans"]["step_cfg"]
        assert plan["build"]["precision"] == precision and plan["bytes"] > 0
        assert list(plan["onnx"]) == [quantize.quant_onnx_file("step_cfg", precision)]
        if precision == "fp8":
            assert all(cc in ("8.9", "12.0") for cc in plan["compute_capabilities"])
        # what the builder compiled: quantised convolutions read DEQUANTIZE layers of int8/fp8 tensors
        _, net, _, _ = trt_network.parse_onnx(trt, d / quantize.quant_onnx_file("step_cfg", precision))
        producer = {}
        for i in range(net.num_layers):
            layer = net.get_layer(i)
            for k in range(layer.num_outputs):
                producer[layer.get_output(k).name] = layer
        convs = [net.get_layer(i) for i in range(net.num_layers) if net.get_layer(i).type.name == "CONVOLUTION"]
        fed = [c for c in convs if producer.get(c.get_input(0).name) is not None
               and producer[c.get_input(0).name].type.name == "DEQUANTIZE"]
        assert len(fed) >= len(convs) - 8            # all but conv_in/out, the shortcut (and their kin)
        for c in fed:
            q = producer[c.get_input(0).name].get_input(0)
            assert q.dtype.name == qtype, (c.name, q.dtype)
    assert json.loads((d / mf.MANIFEST).read_text())["plans"]["step_cfg"]["build"]["precision"] == "fp8"


def test_fp8_is_refused_for_gpus_older_than_ada():
    from arc2face_export import trt_build
    from arc2face_rt.errors import InvalidInputError

    trt = _rtx_or_skip()
    with pytest.raises(InvalidInputError, match="needs compute capability 8.9 or newer"):
        trt_build.resolve_compute_capabilities(trt, "8.6,8.9", "fp8")
    assert trt_build.resolve_compute_capabilities(trt, "8.9", "fp8") == ("8.9",)
    assert trt_build.resolve_compute_capabilities(trt, "8.6", "int8") == ("8.6",)
    if trt_build.cuda.device_count() == 0:      # auto without a GPU: the portable set's FP8-capable part
        assert trt_build.resolve_compute_capabilities(trt, "auto", "fp8") == ("8.9", "12.0")


def test_build_engines_fp8_for_an_older_gpu_is_refused_before_any_work(quantized, tmp_path):
    import argparse

    build_cli = pytest.importorskip("arc2face_export.build_cli")
    from arc2face_rt.errors import InvalidInputError

    trt = _rtx_or_skip()
    assert trt is not None
    d = tmp_path / "e"
    shutil.copytree(quantized, d)
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    parser = argparse.ArgumentParser()
    build_cli.add_build_engines_parser(parser.add_subparsers())
    args = parser.parse_args(["build-engines", "--out", str(d), "--precision", "fp8", "--compute-capability", "8.6",
                              "--no-face"])
    with pytest.raises(InvalidInputError, match="fp8 needs compute capability 8.9"):
        args.func(args)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
