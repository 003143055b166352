"""Random-weight stand-ins for the two face models, with the real files' names and I/O layouts.

write_face_models(out_dir) writes:
- `scrfd_10g_bnkps.onnx`: NOT a face detector. A small random conv net with SCRFD-10G's I/O layout:
  input "input.1" [1, 3, 640, 640]; 9 outputs in insightface's order, scores [n, 1] (after a sigmoid)
  for strides 8, 16, 32, then box distances [n, 4], then keypoint distances [n, 10], n = (640/s)²·2.
  Its outputs are fixed priors plus a small image-dependent random perturbation: exactly one anchor
  (stride 32, the cell at canvas (320, 320)) scores ≈ 0.95, every other anchor ≈ 0.02, and that
  anchor's box (≈ 224x256 px) and keypoints (the ArcFace template, scaled into the box) are
  face-shaped. So on ANY image (a face, a cat, noise) it "finds" one face near the canvas centre,
  which lets the whole front end (decode, NMS, alignment, recognizer) run end to end with random weights.
  size="full" only widens it; its compute is nothing like SCRFD-10G's 10 GFLOPs.
- `arcface.onnx`: an IResNet with random weights, input "input.1" [N, 3, 112, 112], output
  "embedding" [N, 512]; size="full" is the real IResNet-100 architecture (≈ 65 M parameters,
  ≈ 260 MB), size="tiny" one narrow block per stage (same I/O). Exported by torch, so its first
  nodes are Conv/BN: the runtime feeds it (x − 127.5)/127.5, as for the real arcface.onnx.
Both are deterministic functions of `seed`.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from arc2face_rt.atomic import atomic_write

from .iresnet import iresnet100, iresnet_tiny, randomize_

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "arcface.onnx"
OPSET = 17
MAX_IR_VERSION = 10
SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
# ArcFace 112x112 template (runtime/arc2face_rt/face/align.py); kept literal so the reference stays
# independent of the runtime it checks.
_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                      [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
FACE_CENTRE = (320, 320)            # canvas pixels of the one anchor that fires
FACE_STRIDE = 32


def _priors() -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per stride: score logits [n, 1], box distances [n, 4], keypoint distances [n, 10] (stride units)."""
    out = {}
    for s in STRIDES:
        cells = SIZE // s
        n = cells * cells * ANCHORS
        logit = torch.full((n, 1), -4.0)
        box = torch.ones(n, 4)
        kps = torch.zeros(n, 10)
        if s == FACE_STRIDE:
            # row of (cell y, cell x, anchor 0): rows run y-major, then x, then anchor
            row = ((FACE_CENTRE[1] // s) * cells + FACE_CENTRE[0] // s) * ANCHORS
            logit[row] = 3.0
            box[row] = torch.tensor([112.0, 112.0, 112.0, 144.0]) / s        # left, top, right, bottom
            kps[row] = torch.from_numpy((_TEMPLATE - 56.0).reshape(-1) * 2.0 / s)
        out[s] = (logit, box, kps)
    return out


class RandomScrfd(nn.Module):
    """x: [1, 3, 640, 640] → 9 SCRFD outputs (see module doc)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())             # /4
        self.down = nn.ModuleList([nn.Conv2d(width, width, 3, 2, 1) for _ in STRIDES])   # /8, /16, /32
        self.score = nn.ModuleList([nn.Conv2d(width, ANCHORS * 1, 3, 1, 1) for _ in STRIDES])
        self.bbox = nn.ModuleList([nn.Conv2d(width, ANCHORS * 4, 3, 1, 1) for _ in STRIDES])
        self.kps = nn.ModuleList([nn.Conv2d(width, ANCHORS * 10, 3, 1, 1) for _ in STRIDES])
        for s, (logit, box, kps) in _priors().items():
            self.register_buffer(f"logit_{s}", logit)
            self.register_buffer(f"box_{s}", box)
            self.register_buffer(f"kps_{s}", kps)

    @staticmethod
    def _rows(y: torch.Tensor, cols: int) -> torch.Tensor:
        # [1, A·cols, h, w] → [h·w·A, cols], SCRFD's own reshape (rows: y, x, anchor)
        return y.permute(0, 2, 3, 1).reshape(-1, cols)

    def forward(self, x: torch.Tensor):
        f = self.stem(x)
        scores, boxes, kpss = [], [], []
        for i, s in enumerate(STRIDES):
            f = torch.relu(self.down[i](f))
            scores.append(torch.sigmoid(getattr(self, f"logit_{s}") + 0.5 * torch.tanh(self._rows(self.score[i](f), 1))))
            boxes.append(getattr(self, f"box_{s}") * torch.exp(0.1 * torch.tanh(self._rows(self.bbox[i](f), 4))))
            kpss.append(getattr(self, f"kps_{s}") + 0.05 * torch.tanh(self._rows(self.kps[i](f), 10)))
        return (*scores, *boxes, *kpss)


def _export(model: nn.Module, example: torch.Tensor, path: Path, input_names, output_names, dynamic_axes) -> None:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():   # the legacy exporter is a deliberate choice (fast, opset 17)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if proto.ir_version > MAX_IR_VERSION:   # onnxruntime 1.20 reads IR ≤ 10
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString(), overwrite=True)


def build_detector(seed: int = 0, size: str = "tiny") -> RandomScrfd:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RandomScrfd(width=16 if size == "tiny" else 64).eval()


def build_recognizer(seed: int = 0, size: str = "tiny") -> nn.Module:
    model = iresnet_tiny() if size == "tiny" else iresnet100()
    return randomize_(model, torch.Generator().manual_seed(seed + 1)).eval()


def write_face_models(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> dict[str, Path]:
    """Write random `scrfd_10g_bnkps.onnx` and `arcface.onnx` into out_dir (replacing them).

    Returns {"detector": path, "recognizer": path}. size: "tiny" (seconds, for tests) or "full"
    (IResNet-100 recognizer, ≈ 260 MB)."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    det, rec = build_detector(seed, size), build_recognizer(seed, size)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in STRIDES]
    with torch.no_grad():
        _export(det, torch.zeros(1, 3, SIZE, SIZE), out / DETECTOR_FILE, ["input.1"], names, None)
        _export(rec, torch.zeros(1, 3, 112, 112), out / RECOGNIZER_FILE, ["input.1"], ["embedding"],
                {"input.1": {0: "N"}, "embedding": {0: "N"}})
    return {"detector": out / DETECTOR_FILE, "recognizer": out / RECOGNIZER_FILE}
