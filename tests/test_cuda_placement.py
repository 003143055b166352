"""The model of ONNX Runtime's CUDA placement (`arc2face_export.cuda_placement`) and the exporter's use
of it: the exported graphs hold no value that the CUDA provider would copy from host to device, which
is what lets ONNX Runtime capture them as CUDA graphs. The real provider checks the same on a GPU
(tests/test_ort_cuda.py::test_every_graph_opens_with_a_cuda_graph)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from arc2face_export.cuda_placement import host_to_device_edges
from arc2face_export.tracing import static_attention_scale


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _x(dtype=TensorProto.FLOAT, dims=("B", 8)):
    return helper.make_tensor_value_info("x", dtype, list(dims))


def test_shape_arithmetic_that_feeds_a_shape_input_stays_on_the_host():
    idx = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    tail = helper.make_tensor("t", TensorProto.INT64, [1], [-1])
    m = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["b"]),
                helper.make_node("Concat", ["b", "t"], ["shape"], axis=0),
                helper.make_node("Reshape", ["x", "shape"], ["y"])],
               [_x()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [idx, tail])
    assert host_to_device_edges(m) == []


def test_a_shape_derived_number_multiplied_into_a_tensor_is_a_host_to_device_copy():
    m = _model([helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("Sqrt", ["f"], ["r"]), helper.make_node("Relu", ["x"], ["h"]),
                helper.make_node("Mul", ["h", "r"], ["y"])],
               [_x()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    edges = host_to_device_edges(m)
    assert [(e.value, e.consumer, e.to_host) for e in edges] == [("r", "Mul", False)]


def test_a_graph_input_read_next_to_a_host_value_is_a_device_to_host_copy():
    m = _model([helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["x", "f"], ["y"])],       # ONNX Runtime puts this Mul on the host
               [_x()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert [(e.value, e.consumer, e.to_host) for e in host_to_device_edges(m)] == [("x", "Mul", True)]


def test_half_precision_inputs_keep_a_node_on_the_device():
    m = _model([helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT16),
                helper.make_node("Mul", ["x", "f"], ["y"])],
               [_x(TensorProto.FLOAT16)], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    assert [(e.value, e.consumer, e.to_host) for e in host_to_device_edges(m)] == [("f", "Mul", False)]


def test_a_static_shape_is_folded_to_a_constant():
    m = _model([helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["x", "f"], ["y"])],
               [_x(dims=(2, 8))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert host_to_device_edges(m) == []


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        torch.manual_seed(0)
        self.attn = Attention(32, heads=2, dim_head=16)

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("static", [False, True])
def test_static_attention_scale_removes_the_copies_and_keeps_the_numbers(tmp_path, static):
    import contextlib

    import onnxruntime as ort

    mod = _Attention().eval()
    x = torch.randn(2, 10, 32)
    path = tmp_path / "attn.onnx"
    with torch.no_grad(), (static_attention_scale() if static else contextlib.nullcontext()):
        torch.onnx.export(mod, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "B"}, "y": {0: "B"}}, opset_version=18, dynamo=False)
    edges = host_to_device_edges(onnx.load(str(path)))
    assert (len(edges) == 0) == static, edges
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = mod(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exported_graphs_have_no_host_to_device_copies(tiny_engines):
    for path in sorted(tiny_engines.glob("*.onnx")):
        assert host_to_device_edges(onnx.load(str(path), load_external_data=False)) == [], path.name
