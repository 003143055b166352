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
from arc2face_export.onnx_export import _export_one, _modules_for, example_inputs, export_all
from arc2face_export.ort_cuda import ORT_CUDA_RECIPE, FusedGraphError, attention_for, check_loads, fuse_for_ort_cuda
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.specs import STEP_CFG


@pytest.fixture(scope="module")
def fused(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "fused"
    return out, export_all(tiny_model_dir, out, precision="fp16", ort_cuda=True)


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


def test_fused_attention_computes_what_torch_computes(tiny_models, tmp_path):
    """The optimizer's attention fusion on our classic-attention export (heads, scale, layout), with the
    fusions that have CPU kernels, against the torch step at fp32."""
    module = _modules_for(tiny_models, STEP_CFG.name, "fp32")
    feeds = example_inputs(STEP_CFG, batch=2)
    with attention_for(module, STEP_CFG.name):
        _export_one(module, STEP_CFG, feeds, tmp_path / "step_cfg.onnx")
    rec = fuse_for_ort_cuda(tmp_path / "step_cfg.onnx", tmp_path / "fused.onnx", STEP_CFG.name, cpu_kernels_only=True)
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


def test_on_a_gpu_the_fused_graph_is_offered_after_verification(fused, monkeypatch):
    import arc2face_rt.folder_setup as folder_setup
    import arc2face_rt.pipeline as pipeline
    from arc2face_rt.errors import EngineMismatchError

    out, m = fused
    monkeypatch.setattr(folder_setup, "ort_gpu_usable", lambda device: True)
    with pipeline.Arc2FacePipeline(out, backend="ort", device="cpu") as pipe:
        assert pipe._ort_cuda_path("step_cfg") == out / "step_cfg.ort-cuda.onnx"
        assert pipe._ort_cuda_path("projector") is None
        monkeypatch.setenv("ARC2FACE_ORT_FUSED", "0")
        assert pipe._ort_cuda_path("step_cfg") is None
        monkeypatch.delenv("ARC2FACE_ORT_FUSED")
        path = out / m["ort_cuda"]["vae_decoder"]["file"]
        data = path.read_bytes()
        try:
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))     # same size, other content
            with pytest.raises(EngineMismatchError):
                pipe._ort_cuda_path("vae_decoder")
        finally:
            path.write_bytes(data)


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
