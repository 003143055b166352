"""SCRFD face detector (scrfd_10g_bnkps.onnx, a.k.a. antelopev2 det_10g.onnx), as insightface 0.7.x runs it.

Pre-processing, decoding and NMS follow insightface `model_zoo/scrfd.py` (SCRFD.detect/forward/nms):
resize keeping aspect to fit 640x640, paste top-left on black, (rgb − 127.5)/128; per stride s in
8/16/32 the graph gives, for (640/s)² cells × 2 anchors, a sigmoid score, 4 box distances and 10
keypoint distances in units of s; box = centre ∓ distance·s, keypoints = centre + distance·s;
score ≥ 0.5; divide by the resize factor; greedy NMS at IoU 0.4 with "+1" areas, in original-image
pixels (the +1 makes the order of these two steps matter: rescaling after NMS would change which
boxes survive).

The rescale uses insightface's single factor (resized height / height) for both axes, so that boxes
and keypoints match insightface to float rounding; on the long axis that factor is off by less than
1/(resized short side) (0.2% for a 4:3 photo). Images whose short side would be under
MIN_CANVAS_SIDE px on the 640x640 input (longer than 10:1) are refused, as are images under
MIN_IMAGE_SIDE px: neither can hold a face the detector and ArcFace could use.

The session is anything with `.run({name: array}) -> {name: array}` and `input_names`/`output_names`
(an ONNX Runtime or OpenVINO session, or a TensorRT plan's: `face.models`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import InvalidInputError, ModelFormatError, NoFaceError
from ._onnx import open_session, static_input_shape

INPUT_SIZE = 640
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
MIN_IMAGE_SIDE = 20             # px: smaller images cannot hold a detectable face
MIN_CANVAS_SIDE = 64            # px on the 640x640 detector input: i.e. at most 10:1
_FIX = (f"it should be {DETECTOR_FILE} (insightface antelopev2's det_10g.onnx; non-commercial licence): download "
        "it, or `arc2face-export random-checkpoint` writes a random test one")   # no flag: `generate` has no --detector
# Output columns per kind, in insightface's output order: 3 score maps, 3 box maps, 3 keypoint maps.
_KINDS = (("scores", 1), ("boxes", 4), ("kps", 10))


@dataclass(frozen=True, eq=False)
class Face:
    """A detection in original-image pixels."""
    box: np.ndarray      # [4] x1, y1, x2, y2 (float32)
    score: float
    kps: np.ndarray      # [5, 2] (x, y): left eye, right eye, nose, left and right mouth corner

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        # Arc2Face's "largest face": (x2 − x1)·(y2 − y1), without NMS's +1
        return self.width * self.height


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """image: [H, W, 3] uint8 **RGB** → (blob [1, 3, size, size] float32, det_scale).

    insightface reads BGR with cv2 and calls cv2.dnn.blobFromImage(..., swapRB=True), so SCRFD has
    always been fed RGB; our images are RGB already, so no channel swap here."""
    h, w = image.shape[:2]
    im_ratio = h / w                      # insightface: float(img.shape[0]) / img.shape[1]; model ratio 1
    if im_ratio > 1.0:
        new_h = size
        new_w = max(1, int(new_h / im_ratio))   # int() truncates, as insightface does
    else:
        new_w = size
        new_h = max(1, int(new_w * im_ratio))
    det_scale = new_h / h
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))   # bilinear, cv2's default
    # (x − 127.5)·(1/128): 1/128 is exact in float32, so this equals blobFromImage bit for bit
    blob = (canvas.astype(np.float32) - 127.5) * np.float32(1.0 / 128.0)
    return blob.transpose(2, 0, 1)[None].copy(), det_scale


def check_detectable(h: int, w: int, size: int = INPUT_SIZE, name: str = "image") -> None:
    """Refuse images that cannot hold a face the detector could find (too small, or too elongated)."""
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InvalidInputError(f"{name}: {w}x{h} pixels is too small to hold a face (needs at least {MIN_IMAGE_SIDE} px "
                                "each way); use a larger photo")
    short = min(h, w) * size / max(h, w)
    if short < MIN_CANVAS_SIDE:
        raise InvalidInputError(f"{name}: {w}x{h} pixels is too elongated (over {size // MIN_CANVAS_SIDE}:1) to hold a "
                                "detectable face; crop it around the face")


def anchor_centers(size: int, stride: int, num_anchors: int = NUM_ANCHORS) -> np.ndarray:
    """[(size/stride)² · num_anchors, 2] (x, y) cell corners · stride; rows run y-major, then x, then anchor."""
    n = size // stride
    ys, xs = np.mgrid[:n, :n]
    centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    return np.repeat(centers, num_anchors, axis=0)


def decode(levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]], threshold: float = SCORE_THRESHOLD,
           size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """levels: per stride (8, 16, 32): scores [n, 1], box distances [n, 4], keypoint distances [n, 10].

    Returns dets [m, 5] (x1, y1, x2, y2, score) and kps [m, 5, 2] of the anchors scoring ≥ threshold,
    in canvas pixels, sorted by descending score (insightface's pre_det order)."""
    dets, kpss = [], []
    for (scores, boxes, kps), stride in zip(levels, STRIDES):
        c = anchor_centers(size, stride)
        keep = np.where(scores[:, 0] >= threshold)[0]
        c, d, k = c[keep], boxes[keep] * stride, kps[keep] * stride
        box = np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=-1)
        dets.append(np.hstack([box, scores[keep]]))
        kpss.append((np.tile(c, 5) + k).reshape(-1, 5, 2))
    det = np.vstack(dets).astype(np.float32)
    order = det[:, 4].argsort()[::-1]
    return det[order], np.vstack(kpss).astype(np.float32)[order]


def nms(dets: np.ndarray, iou_threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS over dets [m, 5] (x1, y1, x2, y2, score) → kept row indices, best first.

    insightface's convention: areas and intersections count pixels inclusively (+1), and a box is
    suppressed when its IoU with a kept box is strictly greater than the threshold."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(iou <= iou_threshold)[0] + 1]
    return keep


class ScrfdDetector:
    """SCRFD with 5 keypoints. detect(rgb image) → faces, best score first (insightface's order)."""

    def __init__(self, session, score_threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
                 input_size: int = INPUT_SIZE, name: str = "face detector"):
        self.session = session
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_size = input_size
        self.name = name
        self._expected = {(int((input_size // s) ** 2 * NUM_ANCHORS), cols): (kind, i)
                          for kind, cols in _KINDS for i, s in enumerate(STRIDES)}
        self.input_name = self._check_graph()

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto", threads: int | None = None, backend: str = "ort",
                  **kw) -> "ScrfdDetector":
        sess = open_session(path, "face detector", _FIX, device, threads, backend)
        return cls(sess, name=str(path), **kw)

    def _expected_text(self) -> str:
        shapes = [f"[{n},{cols}]" for kind, cols in _KINDS for (n, c) in self._expected if c == cols]
        return (f"1 input [1,3,{self.input_size},{self.input_size}] and 9 outputs (scores, boxes, keypoints "
                f"for strides 8/16/32: {', '.join(shapes)})")

    def _check_graph(self) -> str:
        ins, outs = list(self.session.input_names), list(self.session.output_names)
        shape = static_input_shape(self.session, ins[0]) if len(ins) == 1 else None
        bad_input = len(ins) != 1 or (shape is not None and (
            len(shape) != 4 or shape[1] not in (3, None) or shape[0] not in (1, None)
            or any(d not in (self.input_size, None) for d in shape[2:])))
        if bad_input or len(outs) != 9:
            hint = (" (6 outputs: an SCRFD without keypoints; use the _bnkps / det_10g model)"
                    if len(outs) == 6 else "")
            found = f"inputs {ins}" + (f" with shape {list(shape)}" if shape is not None else "")
            raise ModelFormatError(f"{self.name}: not an SCRFD-with-keypoints graph: expected "
                                   f"{self._expected_text()}; found {found} and {len(outs)} outputs "
                                   f"{outs}{hint}")
        return ins[0]

    def _levels(self, outs: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Identify the 9 outputs by their shapes ([n, c] or [1, n, c]); return them per stride."""
        found, slots = {}, {}
        for name in self.session.output_names:
            a = np.asarray(outs[name])
            if a.ndim == 3 and a.shape[0] == 1:   # batched export: [1, n, c]
                a = a[0]
            found[name] = list(a.shape)
            key = tuple(a.shape) if a.ndim == 2 else None
            if key in self._expected and self._expected[key] not in slots:
                slots[self._expected[key]] = a.astype(np.float32, copy=False)
        if len(slots) != 9:
            raise ModelFormatError(f"{self.name}: unexpected output shapes: expected {self._expected_text()}; "
                                   f"found {found}")
        return [(slots["scores", i], slots["boxes", i], slots["kps", i]) for i in range(len(STRIDES))]

    def detect(self, image: np.ndarray, score_threshold: float | None = None) -> list[Face]:
        """image: [H, W, 3] uint8 RGB → faces (score ≥ threshold, after NMS), best score first."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidInputError(f"detector input must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
        check_detectable(image.shape[0], image.shape[1], self.input_size)
        thr = self.score_threshold if score_threshold is None else score_threshold
        blob, det_scale = preprocess(image, self.input_size)
        levels = self._levels(self.session.run({self.input_name: blob}))
        dets, kps = decode(levels, thr, self.input_size)
        # back to image pixels BEFORE NMS, as insightface does: with +1 areas, IoU depends on the scale
        dets[:, :4] /= det_scale
        kps /= det_scale
        keep = nms(dets, self.nms_threshold)
        return [Face(box=dets[i, :4].copy(), score=float(dets[i, 4]), kps=kps[i].copy()) for i in keep]


def choose_face(faces: list[Face], face: str | int = "largest", min_size: float = 0.0,
                name: str = "image") -> tuple[Face, int]:
    """Pick one face; return it and how many faces were eligible (the caller warns when > 1).

    face="largest": the largest box area, as Arc2Face's demo does (`sorted(faces, key=area)[-1]`, which
    on ties takes the later face in detection order). face=i: the i-th face in detection order (best
    score first). Faces whose box is narrower or shorter than `min_size` pixels are ignored."""
    eligible = [f for f in faces if min(f.width, f.height) >= min_size]
    if not faces:
        raise NoFaceError(f"{name}: no face found; use a photo with a clear, frontal face "
                          "(or lower --min-score)")
    if not eligible:
        big = max(faces, key=lambda f: f.area)
        raise NoFaceError(f"{name}: {len(faces)} face(s) found but all smaller than {min_size:g} px "
                          f"(largest {big.width:.0f}x{big.height:.0f}); lower --min-size or use a larger photo")
    if face == "largest":
        best = max(range(len(eligible)), key=lambda i: (eligible[i].area, i))
        return eligible[best], len(eligible)
    if isinstance(face, bool) or not isinstance(face, (int, np.integer)):
        raise InvalidInputError(f"face choice must be 'largest' or an index, got {face!r}")
    if not -len(eligible) <= face < len(eligible):
        raise InvalidInputError(f"{name}: face index {face} but only {len(eligible)} face(s) found; "
                                f"use --face 0..{len(eligible) - 1} or --face largest")
    return eligible[face], len(eligible)
