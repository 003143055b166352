"""ArcFace recognizer (Arc2Face's own `arcface.onnx`, an IResNet-100): aligned 112x112 RGB crops → unit 512-d.

Input convention, as insightface 0.7.x `ArcFaceONNX.__init__` decides it: if among the graph's first
8 nodes one has a name starting with "Sub" or "_minus" AND one a name starting with "Mul" or "_mul"
(an MXNet-converted model that normalises inside), feed raw pixels 0..255 (mean 0, std 1);
otherwise feed (x − 127.5)/127.5. insightface matches node *names*, not op types; so do we, so the
same file gets the same convention. insightface also feeds RGB (blobFromImages with swapRB=True on
its BGR crops); our crops are RGB already.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, ModelFormatError
from ..specs import ID_DIM
from ._onnx import first_nodes, open_session, static_input_shape
from .align import CROP_SIZE

RECOGNIZER_FILE = "arcface.onnx"
_FIX = (f"it should be Arc2Face's {RECOGNIZER_FILE} (FoivosPar/Arc2Face; not antelopev2's glintr100.onnx): "
        "download it, or `arc2face-export random-checkpoint` writes a random test one")   # no flag, as for the detector
_HEAD_NODES = 8


def graph_normalises(nodes: list[tuple[str, str]]) -> bool:
    """insightface's test on the (name, op_type) of the graph's first nodes (names only, see module doc)."""
    names = [name for name, _ in nodes[:_HEAD_NODES]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / ||x|| along `axis` (float32); a zero vector stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, np.float32(1e-12))


class ArcFaceRecognizer:
    """embed(crops [N, 112, 112, 3] uint8 RGB) → [N, 512] float32 unit vectors.

    `graph_normalises` says whether the graph takes raw 0..255 pixels (True) or (x − 127.5)/127.5
    (False); from_file() decides it from the graph, other backends must say. The decision is kept
    in `input_mean`, `input_std` and the readable `convention`."""

    def __init__(self, session, graph_normalises: bool, name: str = "face recognizer", max_batch: int | None = None):
        self.session = session
        self.max_batch = max_batch       # crops per call at most (a TensorRT plan's profile)
        self.name = name
        self.graph_normalises = bool(graph_normalises)
        self.input_mean, self.input_std = (0.0, 1.0) if self.graph_normalises else (127.5, 127.5)
        self.convention = ("graph normalises itself (Sub and Mul among its first nodes): fed raw RGB 0..255"
                           if self.graph_normalises else "fed RGB as (x - 127.5) / 127.5")
        self.input_name = self._check_graph()
        shape = static_input_shape(session, self.input_name)
        self._fixed_batch = shape[0] if shape is not None and shape[0] is not None else None

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto", threads: int | None = None,
                  backend: str = "ort") -> "ArcFaceRecognizer":
        sess = open_session(path, "face recognizer", _FIX, device, threads, backend)
        return cls(sess, graph_normalises(first_nodes(path, _HEAD_NODES)), name=str(path))

    def _expected_text(self) -> str:
        return f"1 input [N,3,{CROP_SIZE},{CROP_SIZE}] and an output [N,{ID_DIM}] first"

    def _check_graph(self) -> str:
        ins, outs = list(self.session.input_names), list(self.session.output_names)
        shape = static_input_shape(self.session, ins[0]) if len(ins) == 1 else None
        bad = len(ins) != 1 or not outs or (shape is not None and (
            len(shape) != 4 or shape[1] not in (3, None) or any(d not in (CROP_SIZE, None) for d in shape[2:])))
        if bad:
            found = f"inputs {ins}" + (f" with shape {list(shape)}" if shape is not None else "")
            raise ModelFormatError(f"{self.name}: not an ArcFace recognizer graph: expected "
                                   f"{self._expected_text()}; found {found} and outputs {outs}")
        return ins[0]

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """crops [N, 112, 112, 3] uint8 RGB → blob [N, 3, 112, 112] float32."""
        x = (crops.astype(np.float32) - np.float32(self.input_mean)) / np.float32(self.input_std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        """crops [N, 112, 112, 3] (or one [112, 112, 3]) uint8 RGB → raw [N, 512] float32 (not normalised)."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise InvalidInputError(f"recognizer input must be aligned [N, {CROP_SIZE}, {CROP_SIZE}, 3] uint8 "
                                    f"RGB crops, got {crops.shape} {crops.dtype}")
        blob = self.preprocess(crops)
        step = self._fixed_batch or min(len(blob), self.max_batch or len(blob))   # e.g. batch-1 graphs: one by one
        out = [self._run(blob[i:i + step]) for i in range(0, len(blob), step)]
        return np.concatenate(out, axis=0)

    def _run(self, blob: np.ndarray) -> np.ndarray:
        outs = self.session.run({self.input_name: blob})
        y = np.asarray(outs[self.session.output_names[0]], dtype=np.float32)
        y = y.reshape(len(blob), -1) if y.ndim > 2 and y.size == len(blob) * ID_DIM else y
        if y.shape != (len(blob), ID_DIM):
            raise ModelFormatError(f"{self.name}: first output has shape {list(y.shape)}; expected "
                                   f"{self._expected_text()}")
        return y

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Aligned crops → L2-normalised [N, 512] float32 (what Arc2Face conditions on)."""
        return l2_normalize(self.embed_raw(crops))
