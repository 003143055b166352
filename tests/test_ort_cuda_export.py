"""`arc2face-export onnx --ort-cuda`: fp16 graphs fused by ONNX Runtime's transformer optimizer for its
CUDA kernels. They cannot run on a CPU, so here: what the manifest records, that ONNX Runtime type-checks
them (loading fails only for want of CUDA kernels), that the attention fusion computes what torch
computes (fused with the fusions ONNX Runtime has CPU kernels for), and that the CPU path ignores them.
On a GPU, tests/test_ort_cuda.py runs them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from arc2face_export.cuda_placement import host_to_device_edges
from arc2face_export.onnx_export import _modules_for, example_inputs, export_all
from arc2face_export.tracing import export_graph
from arc2face_export.ort_cuda import (ORT_CUDA_RECIPE, FusedGraphError, attention_for, check_loads, fuse_for_ort_cuda,
                                     remove_no_op_casts, unsupported_fusions)
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.specs import STEP_CFG


@pytest.fixture(scope="module")
def fused(tiny_fp16_engines):
    return tiny_fp16_engines


def test_manifest_records_verified_fused_graphs(fused):
    from arc2face_rt.integrity import verify_records

    out, m = fused
    assert sorted(m["ort_cuda"]) == ["step", "step_cfg", "vae_decoder"]
    unet = m["ort_cuda"]["step_cfg"]["fused"]
    assert unet.get("MultiHeadAttention", 0) > 0 and unet.get("NhwcConv", 0) > 0
    assert unet.get("GroupNorm", 0) + unet.get("SkipGroupNorm", 0) > 0
    assert m["ort_cuda"]["vae_decoder"]["fused"].get("NhwcConv", 0) > 0
    for rec in m["ort_cuda"].values():
        assert rec["recipe"] == ORT_CUDA_RECIPE and "source_validation" in rec
        verify_records(out, rec["files"], mode="full")


@pytest.mark.parametrize("stage", ["step_cfg", "step", "vae_decoder"])
def test_onnx_runtime_type_checks_the_fused_graphs(fused, stage):
    """Loading on the CPU provider gets past type checking and stops only at a CUDA-only kernel."""
    out, m = fused
    path = out / m["ort_cuda"][stage]["file"]
    g = onnx.load(str(path))
    assert host_to_device_edges(g) == []
    assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.UINT8)
               for v in list(g.graph.input) + list(g.graph.output))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*(NhwcConv|GroupNorm|BiasSplitGelu|BiasAdd)"):
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_fused_attention_computes_what_torch_computes(tiny_models, tmp_path, capsys):
    """The optimizer's attention fusion on our classic-attention export (heads, scale, layout), with the
    fusions that have CPU kernels, against the torch step at fp32; the optimizer prints nothing (its
    "fusion" progress bar included)."""
    module = _modules_for(tiny_models, STEP_CFG.name, "fp32")
    feeds = example_inputs(STEP_CFG, batch=2)
    with attention_for(module, STEP_CFG.name):
        export_graph(module, STEP_CFG, feeds, tmp_path / "step_cfg.onnx")
    capsys.readouterr()
    rec = fuse_for_ort_cuda(tmp_path / "step_cfg.onnx", tmp_path / "fused.onnx", STEP_CFG.name, cpu_kernels_only=True)
    assert capsys.readouterr() == ("", "")
    assert rec["fused"].get("Attention", 0) + rec["fused"].get("MultiHeadAttention", 0) > 0
    got = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        want = module(*(torch.from_numpy(feeds[t.name]) for t in STEP_CFG.inputs))
    for g, w in zip(got, want):
        assert np.linalg.norm(g - w.numpy()) / np.linalg.norm(w.numpy()) < 1e-5


def test_the_cpu_path_never_asks_for_the_fused_graphs(fused, monkeypatch):
    import arc2face_rt.backends.ort as ort_backend
    from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

    out, _ = fused
    asked = []
    real = ort_backend.open_session
    monkeypatch.setattr(ort_backend, "open_session", lambda *a, **k: (asked.append(k.get("cuda_path")), real(*a, **k))[1])
    with Arc2FacePipeline(out, backend="ort", device="auto") as pipe:
        pipe.generate(random_identity(1), 1, GenerationOptions(steps=2, seed=0))
    assert len(asked) == 3 and asked == [None, None, None]


def test_on_a_gpu_the_fused_graph_is_offered_after_verification(fused, monkeypatch, tmp_path):
    import arc2face_rt.folder_setup as folder_setup
    import arc2face_rt.pipeline as pipeline
    from arc2face_rt.errors import EngineMismatchError
    from test_bad_input import engines_copy, replace_file

    out, m = engines_copy(fused[0], tmp_path / "e"), fused[1]       # the shared folder stays as it is
    monkeypatch.setattr(folder_setup, "ort_gpu_usable", lambda device: True)
    with pipeline.Arc2FacePipeline(out, backend="ort", device="cpu") as pipe:
        assert pipe._ort_cuda_path("step_cfg") == out / "step_cfg.ort-cuda.onnx"
        assert pipe._ort_cuda_path("projector") is None
        monkeypatch.setenv("ARC2FACE_ORT_FUSED", "0")
        assert pipe._ort_cuda_path("step_cfg") is None
        monkeypatch.delenv("ARC2FACE_ORT_FUSED")
        path = out / m["ort_cuda"]["vae_decoder"]["file"]
        data = path.read_bytes()
        replace_file(path, data[:-1] + bytes([data[-1] ^ 1]))        # same size, other content
        with pytest.raises(EngineMismatchError):
            pipe._ort_cuda_path("vae_decoder")


def test_ort_cuda_needs_an_fp16_folder_and_its_own_stages(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidInputError, match="fp16"):
        export_all(tiny_model_dir, tmp_path / "a", precision="fp32", ort_cuda=True)
    with pytest.raises(InvalidInputError, match="projector"):
        export_all(tiny_model_dir, tmp_path / "b", precision="fp16", ort_cuda=("projector",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_type_error_in_a_fused_graph_is_refused(tmp_path):
    from onnx import helper

    g = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [2]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "bad.onnx"))
    with pytest.raises(FusedGraphError, match="bad.onnx"):
        check_loads(tmp_path / "bad.onnx")


@pytest.mark.parametrize("stage", ["step_cfg", "vae_decoder"])
def test_no_cast_feeds_an_nhwc_conv(fused, stage):
    """The NhwcConv fusion puts a Cast(to=fp16) in front of every NhwcConv of an fp16 graph, which ONNX
    Runtime 1.30's CPU provider mistypes while loading (check_loads fails there, so the graph would be
    lost): the exporter removes these no-op casts."""
    out, m = fused
    g = onnx.load(str(out / m["ort_cuda"][stage]["file"])).graph
    made_by = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "NhwcConv"]
    assert convs and m["ort_cuda"][stage]["no_op_casts_removed"] >= len(convs)
    assert [n.name for n in convs if made_by.get(n.input[0]) is not None and made_by[n.input[0]].op_type == "Cast"] == []


def test_a_cast_to_its_own_type_is_bypassed_and_nothing_else(tmp_path):
    from onnx import helper

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Cast", ["t"], ["t16"], to=f16),          # fp16 -> fp16: an identity
             helper.make_node("Relu", ["t16"], ["r"]),
             helper.make_node("Cast", ["z"], ["z16"], to=f16),          # fp32 -> fp16: kept
             helper.make_node("Add", ["r", "z16"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=f16)]            # a graph output: kept
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f16, [2, 3]),
                                       helper.make_tensor_value_info("z", f32, [3, 2])],
                          [helper.make_tensor_value_info("y", f16, [3, 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    feeds = {"x": np.arange(-3, 3, dtype=np.float16).reshape(2, 3), "z": np.ones((3, 2), np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert remove_no_op_casts(model.graph) == 1
    assert [n.input[0] for n in model.graph.node if n.op_type == "Cast"] == ["z", "s"]
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("stage", ["step_cfg", "step", "vae_decoder"])
def test_fused_ops_keep_to_the_widths_their_cuda_kernels_take(fused, stage):
    """BiasSplitGelu (2560/5120/10240), BiasAdd (320/640/1280) and GroupNorm (an even number of channels
    per group) refuse other widths at run time on CUDA; the tiny model has some, so those places keep
    their plain ops (recorded), and the other places are fused."""
    from arc2face_export.ort_cuda import BIAS_ADD_WIDTHS, BIAS_SPLIT_GELU_WIDTHS

    out, m = fused
    g = onnx.load(str(out / m["ort_cuda"][stage]["file"])).graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "BiasSplitGelu":
            assert dims[n.input[1]][0] in BIAS_SPLIT_GELU_WIDTHS
        elif n.op_type == "BiasAdd":
            assert dims[n.input[1]][0] in BIAS_ADD_WIDTHS
        elif n.op_type in ("GroupNorm", "SkipGroupNorm"):
            groups = next(a.i for a in n.attribute if a.name == "groups")
            assert (dims[n.input[1]][0] // groups) % 2 == 0
    assert unsupported_fusions(g) == {}
    rec = m["ort_cuda"][stage]
    assert "GroupNorm" in rec["not_fused"] and rec["fused"].get("GroupNorm", 0) > 0    # left out only where refused
    if stage != "vae_decoder":
        assert "BiasSplitGelu" in rec["not_fused"]


def test_a_fused_graph_that_fails_is_dropped_and_the_export_kept(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A fused graph is an extra: one ONNX Runtime rejects is left out with a warning and a manifest
    note, the plain graphs are written, and the folder then counts as up to date."""
    import arc2face_export.onnx_export as onnx_export

    def reject(path):
        raise FusedGraphError(f"{path.name}: ONNX Runtime rejects the fused graph (simulated)")

    monkeypatch.setattr(onnx_export, "check_loads", reject)
    out = tmp_path / "e"
    m = export_all(tiny_model_dir, out, precision="fp16", stages=("vae_decoder",), ort_cuda=True, validate=False)
    assert m.get("ort_cuda") == {} and "simulated" in m["ort_cuda_skipped"]["vae_decoder"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vae_decoder.onnx"]
    assert any("no ONNX Runtime CUDA graph" in r.getMessage() for r in caplog.records)
    again = export_all(tiny_model_dir, out, precision="fp16", stages=("vae_decoder",), ort_cuda=True, validate=False)
    assert again["created"] == m["created"]          # up to date: not exported again
