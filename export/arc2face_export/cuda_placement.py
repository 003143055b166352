"""Which values of an ONNX graph ONNX Runtime's CUDA execution provider would copy from host to device.

ONNX Runtime captures a CUDA graph only when every compute node runs on the CUDA provider and the
partitioned graph holds no Memcpy node ("This session cannot use the graph capture feature ... as all
compute graph nodes have not been partitioned to the CUDAExecutionProvider"). Shape arithmetic may run
on the CPU as long as its results only feed inputs the CUDA kernels read from host memory (the shape
of a Reshape, the starts of a Slice, ...). A host value that feeds a device input (say an attention
scale computed from `Shape(q)` and multiplied into q) needs a MemcpyFromHost node and forbids the graph.

This module replays ONNX Runtime's constant folding and placement rule on a model so the exporter and
the tests can see those edges without a GPU:
- constant folding (before partitioning) turns into initializers every node whose inputs are all
  constant, and every `Shape` whose input has a fully static shape;
- the CUDA `Shape`/`Size` kernels write their output to host memory;
- a consumer of host values runs on the CPU when every input is a host value, a small initializer
  (<= 100 elements) or a graph input, none is float16/bfloat16, and none is read from host memory by
  the CUDA kernel anyway (`GetCpuPreferredNodes`, onnxruntime/core/framework/fallback_cpu_capability.cc);
- everything else runs on CUDA; a host value reaching one of its device inputs is a host-to-device copy,
  and a graph input (bound on the device by the loop) read by a host node a device-to-host copy.
It is a model of ONNX Runtime 1.31's rule, checked against the real provider by the `gpu` tests.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

# Inputs the CUDA kernels declare as host memory (OrtMemTypeCPUInput), by op type.
HOST_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Unsqueeze": frozenset({1}), "Squeeze": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}), "ConstantOfShape": frozenset({0}), "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}), "Tile": frozenset({1}), "Range": frozenset({0, 1, 2}), "Split": frozenset({1}),
    "Pad": frozenset({1, 2, 3}), "TopK": frozenset({1}), "OneHot": frozenset({1}), "CumSum": frozenset({1}),
    **{op: frozenset({1}) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                      "ReduceL2", "ReduceLogSumExp")},
}
HOST_OUTPUT_OPS = frozenset({"Shape", "Size"})
SMALL_INITIALIZER = 100
_HALF_TYPES = frozenset({10, 16, 17, 18, 19, 20})     # float16, bfloat16, the float8 types


@dataclass(frozen=True)
class HostEdge:
    """`value`, computed on the host by `producer`, is read from device memory by `consumer`; or, with
    `to_host`, a graph input (bound on the device) that a node placed on the host reads."""
    value: str
    producer: str
    consumer: str
    to_host: bool = False

    def __str__(self) -> str:
        if self.to_host:
            return f"{self.value}: {self.producer} (CUDA) -> {self.consumer} (host)"
        return f"{self.value}: {self.producer} (host) -> {self.consumer} (CUDA)"


def host_to_device_edges(model) -> list[HostEdge]:
    """The copies between host and device ONNX Runtime's CUDA provider would make inside `model` (an
    onnx ModelProto; weights need not be loaded): Memcpy-from-host nodes, and graph inputs read on the
    host."""
    import onnx

    graph = model.graph
    if _small(model):
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:          # noqa: BLE001 - e.g. contrib ops onnx does not know: no folding info
            pass
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)
             + list(graph.output)}
    sizes = {}
    for t in graph.initializer:
        types[t.name] = t.data_type
        sizes[t.name] = _count(t.dims)
    nodes = []
    for n in graph.node:
        if n.op_type == "Constant":                    # ONNX Runtime turns these into initializers
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    types[n.output[0]] = a.t.data_type
                    sizes[n.output[0]] = _count(a.t.dims)
                elif a.name in ("value_float", "value_int"):
                    sizes[n.output[0]] = 1
                elif a.name in ("value_floats", "value_ints"):
                    sizes[n.output[0]] = len(a.floats or a.ints)
            continue
        nodes.append(n)
    _fold_constants(nodes, graph, sizes)
    nodes = [n for n in nodes if not all(o in sizes for o in n.output)]
    inputs = {v.name for v in graph.input}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers[x].append(i)

    host = set()                                       # values in host memory
    on_cpu = set()                                     # node indices placed on the CPU
    queue: list[int] = []
    for i, n in enumerate(nodes):
        if n.op_type in HOST_OUTPUT_OPS:
            host.update(n.output)
            for o in n.output:
                queue.extend(consumers[o])
    heapq.heapify(queue)                               # node order is topological in exported graphs
    seen = set()
    while queue:
        i = heapq.heappop(queue)
        if i in seen:
            continue
        seen.add(i)
        n = nodes[i]
        if _prefers_cpu(n, types, sizes, inputs, host):
            on_cpu.add(i)
            host.update(n.output)
            for o in n.output:
                for c in consumers[o]:
                    heapq.heappush(queue, c)
    edges = []
    for i, n in enumerate(nodes):
        if i in on_cpu:                                # a graph input bound on the device, read on the host
            edges += [HostEdge(x, "graph input", n.name or n.op_type, to_host=True) for x in n.input if x in inputs]
            continue
        for k, x in enumerate(n.input):
            if x in host and k not in HOST_INPUTS.get(n.op_type, ()):
                p = producer.get(x)
                edges.append(HostEdge(x, nodes[p].name or nodes[p].op_type, n.name or n.op_type))
    return edges


def _fold_constants(nodes, graph, sizes) -> None:
    """Mark the outputs ONNX Runtime's constant folding computes at load time as (sized) constants."""
    shapes = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for n in nodes:                                    # topological order
        if n.op_type in _NOT_FOLDED:
            continue
        if n.op_type == "Shape":
            if n.input[0] not in shapes:
                continue
        elif not all(x in sizes for x in n.input if x):
            continue
        for o in n.output:
            sizes[o] = _count(shapes[o]) if o in shapes else 1


_NOT_FOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform",
                         "RandomNormalLike", "RandomUniformLike", "Multinomial"})


def _prefers_cpu(node, types, sizes, inputs, host) -> bool:
    for k, x in enumerate(node.input):
        if not x:
            continue
        if types.get(x) in _HALF_TYPES:
            return False
        if sizes.get(x, SMALL_INITIALIZER + 1) <= SMALL_INITIALIZER or x in inputs:
            continue
        if x not in host or k in HOST_INPUTS.get(node.op_type, ()):
            return False
    return True


def _count(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _small(model) -> bool:
    """Shape inference needs the proto in memory under 2 GiB (external weights are not loaded)."""
    return model.ByteSize() < (1 << 31) - (1 << 20)
