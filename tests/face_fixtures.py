"""Helpers shared by tests/test_face_*.py: fake backend sessions, raw SCRFD outputs, tiny ONNX graphs,
hand-made image files, and the random tiny face models (written once per test run)."""
from __future__ import annotations

import atexit
import functools
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

SIZE = 640
STRIDES = (8, 16, 32)


class FakeSession:
    """The backend-session surface (input_names, output_names, run) around a callable."""

    def __init__(self, fn, input_names=("input.1",), output_names=(), inputs=None):
        self.fn = fn
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        if inputs is not None:
            self.inputs = inputs
        self.calls = []

    def run(self, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return self.fn(feeds)


def rows(stride: int) -> int:
    return (SIZE // stride) ** 2 * 2


def scrfd_outputs(hits=(), seed=0, background=0.05):
    """Raw SCRFD outputs as lists per kind: ([scores ×3], [boxes ×3], [kps ×3]) in stride order.

    hits: (stride, cell_y, cell_x, anchor, score, box distances [4], kps distances [10]) in stride units.
    Every other anchor scores `background` and has random distances."""
    rng = np.random.default_rng(seed)
    scores = [np.full((rows(s), 1), background, np.float32) for s in STRIDES]
    boxes = [rng.uniform(0.5, 3, (rows(s), 4)).astype(np.float32) for s in STRIDES]
    kps = [rng.uniform(-2, 2, (rows(s), 10)).astype(np.float32) for s in STRIDES]
    for stride, cy, cx, a, score, d, k in hits:
        i = STRIDES.index(stride)
        r = (cy * (SIZE // stride) + cx) * 2 + a
        scores[i][r] = score
        boxes[i][r] = d
        kps[i][r] = k
    return scores, boxes, kps


OUTPUT_NAMES = [f"{k}{s}" for k in ("score", "bbox", "kps") for s in STRIDES]


def scrfd_session(hits_fn, order=None, batched=False):
    """A fake SCRFD session; hits_fn(blob) gives the hits for that input. `order` permutes outputs."""
    names = list(OUTPUT_NAMES) if order is None else [OUTPUT_NAMES[i] for i in order]

    def fn(feeds):
        blob = feeds["input.1"]
        assert blob.shape == (1, 3, SIZE, SIZE) and blob.dtype == np.float32
        s, b, k = scrfd_outputs(hits_fn(blob))
        arrays = dict(zip(OUTPUT_NAMES, s + b + k))
        return {n: (arrays[n][None] if batched else arrays[n]) for n in names}

    return FakeSession(fn, output_names=names)


# ---- tiny ONNX graphs (onnx.helper) -------------------------------------------------------------------

def write_onnx(path, nodes, inputs, outputs, initializers=()):
    """Save a graph; inputs/outputs: (name, shape) with None/str for symbolic axes."""
    import onnx
    from onnx import TensorProto, helper

    def vi(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    graph = helper.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def const(name, array):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def recognizer_graph(path, normalising: bool, w: np.ndarray, sub_name="Sub_0", mul_name="Mul_1",
                     in_shape=("N", 3, 112, 112), out_dim=512):
    """A toy recognizer: [optional Sub 127.5, Mul 1/127.5] → mean over H, W → [N, 3] @ w [3, out_dim].
    The normalising variant has the Sub/Mul nodes at its head, as MXNet-converted ArcFace models do."""
    from onnx import helper

    nodes, x = [], "input.1"
    inits = [const("w", w)]
    if normalising:
        inits += [const("mean", [127.5]), const("scale", [1 / 127.5])]
        nodes += [helper.make_node("Sub", [x, "mean"], ["xs"], name=sub_name),
                  helper.make_node("Mul", ["xs", "scale"], ["xm"], name=mul_name)]
        x = "xm"
    nodes += [helper.make_node("ReduceMean", [x], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
              helper.make_node("MatMul", ["pooled", "w"], ["embedding"], name="fc")]
    return write_onnx(path, nodes, [("input.1", in_shape)], [("embedding", ("N", out_dim))], inits)


# ---- image files ---------------------------------------------------------------------------------------

def png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height (8-bit RGB) and whose IDAT is empty: no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return Path(path)


def astronaut():
    import skimage.data

    return skimage.data.astronaut()  # [512, 512, 3] uint8 RGB, one real face


# ---- random tiny face models (torch; written once per run) ------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_models_dir() -> Path:
    from arc2face_ref.face_models import write_face_models

    d = Path(tempfile.mkdtemp(prefix="arc2face-face-models-"))
    atexit.register(shutil.rmtree, d, True)
    write_face_models(d, seed=0, size="tiny")
    return d
