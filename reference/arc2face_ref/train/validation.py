"""Validation during `fit` and the run's log.

Every N steps a fixed set of identities (the first samples of the data) is generated with the
reference pipeline (DPM-Solver++, fixed seeds: the same noise every time), written as a PNG grid
(one row per identity), and, when face models are given, scored as `arc2face-rt score` does: the
cosine between the ArcFace embedding of each generated face and the identity it was generated from.
Metrics go to RUN/metrics.csv always and to TensorBoard (RUN/tensorboard/) when it is installed.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from arc2face_rt.atomic import atomic_write
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.face.identity import SKIPPABLE

from ..loading import Arc2FaceModels
from ..pipeline import ReferencePipeline
from .shards import SampleRef, read_id

METRICS = ("step", "loss", "lr", "images_per_s", "id_similarity")


def open_face_analyzer(face_models: Path):
    """The validation's face models (`--face-models`), opened before any model is loaded so that a
    wrong folder is refused first."""
    from arc2face_rt.face.identity import FaceAnalyzer
    from arc2face_rt.face.models import load_face_models

    return FaceAnalyzer(*load_face_models(face_models, device="cpu", models_flag="--face-models"))


class Validator:
    def __init__(self, refs: list[SampleRef], n_ids: int, per_id: int, resolution: int, steps: int,
                 guidance: float, seed: int, analyzer=None):
        """`analyzer`: a FaceAnalyzer (`open_face_analyzer`) for the ID similarity, or None."""
        self.ids = np.stack([read_id(r) for r in refs[:n_ids]])                    # [I, 512]
        self.per_id, self.steps, self.guidance = per_id, steps, guidance
        g = torch.Generator().manual_seed(seed)
        lat = resolution // 8
        self.latents = torch.randn(len(self.ids) * per_id, 4, lat, lat, generator=g).numpy()
        self.analyzer = analyzer

    @torch.no_grad()
    def __call__(self, models: Arc2FaceModels, png: Path) -> float:
        """Generate the grid into `png`; return the mean ID similarity (NaN without face models)."""
        ids = np.repeat(self.ids, self.per_id, axis=0)
        images = ReferencePipeline(models)(ids, self.latents, steps=self.steps, guidance=self.guidance)
        n, h, w, _ = images.shape
        rows = images.reshape(len(self.ids), self.per_id, h, w, 3).transpose(0, 2, 1, 3, 4)
        grid = rows.reshape(len(self.ids) * h, self.per_id * w, 3)
        atomic_write(png, _png(grid), overwrite=True)
        return self._similarity(images, ids)

    def _similarity(self, images: np.ndarray, ids: np.ndarray) -> float:
        if self.analyzer is None:
            return math.nan
        sims = []
        for img, target in zip(images, ids):
            try:
                emb = self.analyzer.embed_image(np.ascontiguousarray(img), "validation image")[0]
            except SKIPPABLE:           # no face found in a generated image: similarity 0
                emb = np.zeros_like(target)
            sims.append(float(emb @ (target / np.linalg.norm(target))))
        return float(np.mean(sims))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class RunLog:
    """metrics.csv (always) and TensorBoard (when installed). On resume, rows after the resumed step
    (logged by a run that stopped before its next checkpoint) are dropped, so the file tells one story."""

    def __init__(self, run: Path, start_step: int):
        self.path = run / "metrics.csv"
        rows = []
        if self.path.is_file():
            try:
                with open(self.path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
            except (ValueError, KeyError, TypeError, csv.Error):      # UnicodeDecodeError is a ValueError
                raise InvalidInputError(f"--resume: {self.path} is damaged; move it away (the run keeps training, "
                                        "only the metrics before this step are lost) or start a new --out") from None
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, METRICS)
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self.tb = None

    def write(self, step: int, **metrics: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRICS).writerow({"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}})
        if self.tb is not None:
            for k, v in metrics.items():
                if not math.isnan(v):
                    self.tb.add_scalar(f"train/{k}" if k != "id_similarity" else "val/id_similarity", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
