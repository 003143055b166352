"""Tracing a torch module into one stage's ONNX graph (`export_graph`), and what the trace needs to
give graphs both ONNX Runtime's CUDA provider and a CPU can run well: a constant attention scale, and
a channels-last forward pass that is faster on CPUs without fp16 kernels and leaves the graph as it is."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from arc2face_rt.specs import StageSpec

from .cuda_placement import host_to_device_edges
from .onnx_files import save_model

log = logging.getLogger("arc2face_export")
OPSET = 18


@contextlib.contextmanager
def static_attention_scale():
    """Trace attention with its softmax scale as a constant.

    Called without `scale`, torch's exporter computes 1/sqrt(head_dim) at run time from `Shape(q)`;
    ONNX Runtime's CUDA provider then runs that arithmetic on the host and copies the result into the
    device-side multiply, a Memcpy node that forbids its CUDA graphs (see `cuda_placement`). The head
    dimension is fixed by the weights, so the scale is the same number for every batch size."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, scale=None, **kwargs):
        if scale is None:
            scale = 1.0 / float(int(query.shape[-1])) ** 0.5
        return real(query, key, value, *args, scale=scale, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


# The memory order of the 4-D weights while tracing. ONNX has none, so the graph is the same node for
# node as an NCHW trace (tests/test_export.py compares them); what changes is the trace's own forward
# pass, which on a CPU without fp16 convolution kernels (AVX2) runs fp16 convolutions about 15x faster
# channels-last than NCHW (2-core EPYC, a 32-channel 64x64 convolution: 0.020 s instead of 0.30 s).
TRACE_MEMORY_FORMAT = torch.channels_last


@contextlib.contextmanager
def _weights_in(module, memory_format):
    """`module`'s 4-D weights in `memory_format` inside, back in NCHW order afterwards."""
    module.to(memory_format=memory_format)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


def export_graph(module, spec: StageSpec, feeds: dict, path: Path) -> None:
    """Trace `module` on `feeds` into the ONNX graph `path` with exactly `spec`'s inputs and outputs (batch
    axis dynamic), saved with external data when large; warn about values ONNX Runtime's CUDA provider
    would copy from host to device."""
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    dynamic = {t.name: {0: "B"} for t in spec.inputs + spec.outputs if t.shape and t.shape[0] == "B"}
    raw = path.with_suffix(".raw.onnx")
    with torch.no_grad(), warnings.catch_warnings(), static_attention_scale(), \
            _weights_in(module, TRACE_MEMORY_FORMAT):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shape asserts in diffusers, expected
        warnings.simplefilter("ignore", DeprecationWarning)        # the legacy exporter is chosen on purpose
        torch.onnx.export(module, args, str(raw), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    stamp_io(model, spec)
    for p in raw.parent.iterdir():   # the raw export (and any loose weight files it scattered)
        p.unlink()
    save_model(model, path)
    del model
    edges = host_to_device_edges(onnx.load(str(path), load_external_data=False))
    if edges:
        log.warning("%s: %d values would be copied from host to device by ONNX Runtime's CUDA provider "
                    "(no CUDA graph there), e.g. %s", path.name, len(edges), edges[0])


def stamp_io(model, spec: StageSpec) -> None:
    """Declare exactly the spec's I/O shapes (the tracer sometimes leaves outputs with made-up
    symbolic dims); validation then checks the real outputs against them."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        for v, t in zip(values, tensors):
            assert v.name == t.name, (v.name, t.name)
            dims = v.type.tensor_type.shape.dim
            del dims[:]
            for d in t.shape:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d
