"""Photos → identity: detect, choose, align, embed each photo; combine several photos into one identity.

A bad file (unreadable, no face, face index out of range) is skipped and reported, never fatal to a
batch: results say per file what happened and how many succeeded. Library code here never prints.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import checks
from ..errors import ImageDecodeError, InvalidInputError, NoFaceError
from ..images import check_rgb8
from ..manifest import sha256_file
from ..specs import ID_DIM
from .align import CROP_SIZE, align_face
from .detector import Face, ScrfdDetector, check_detectable, choose_face
from .image_io import DEFAULT_LIMITS, ImageLimits, check_path, load_image
from .recognizer import ArcFaceRecognizer, l2_normalize

_CAUSES = {"ImageDecodeError": "unreadable", "NoFaceError": "without a usable face",
           "InvalidInputError": "unusable (missing, too small, or not an aligned crop)"}

# Per-file failures a batch skips; anything else (a broken model, a bug) still propagates.
SKIPPABLE = (ImageDecodeError, NoFaceError, InvalidInputError)


@dataclass(frozen=True, eq=False)
class FileResult:
    path: Path
    embedding: np.ndarray | None = None   # [512] float32, unit norm; None when skipped
    face: Face | None = None              # the chosen face (None for aligned input or when skipped)
    n_faces: int = 0                      # eligible faces found; > 1 means a choice was made
    error: str | None = None              # why the file was skipped
    error_type: str | None = None         # the exception class name, e.g. "NoFaceError"

    @property
    def ok(self) -> bool:
        return self.embedding is not None


@dataclass(frozen=True, eq=False)
class EmbedReport:
    results: list[FileResult] = field(default_factory=list)

    @property
    def succeeded(self) -> list[FileResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def n_ok(self) -> int:
        return len(self.succeeded)

    def failure_summary(self) -> str:
        """Why files were skipped: the one file's message, else a count per cause."""
        failed = self.failed
        if len(failed) == 1:
            return failed[0].error or "unknown problem"
        causes = Counter(_CAUSES.get(r.error_type, "unusable") for r in failed)
        return ", ".join(f"{n} {cause}" for cause, n in causes.most_common())

    def require_some(self) -> None:
        """Raise, naming the real causes, when no file gave an embedding."""
        if self.n_ok:
            return
        if {r.error_type for r in self.failed} == {"NoFaceError"}:
            raise NoFaceError(f"none of the {len(self.results)} image(s) shows a usable face "
                              f"({self.failure_summary()}); use clear, frontal photos, or lower --min-score / "
                              "--min-size")
        raise InvalidInputError(f"none of the {len(self.results)} image(s) could be used ({self.failure_summary()}); "
                                "fix or replace them")

    def embeddings(self) -> np.ndarray:
        """[n_ok, 512] float32 of the files that succeeded, in order."""
        ok = self.succeeded
        return np.stack([r.embedding for r in ok]) if ok else np.zeros((0, ID_DIM), np.float32)


@dataclass(frozen=True, eq=False)
class Identity:
    embedding: np.ndarray     # [512] float32, unit norm
    cosines: np.ndarray       # [N] cosine of each photo's embedding to `embedding`
    method: str


def combine_embeddings(embeddings: np.ndarray, method: str = "mean") -> Identity:
    """Several photos' embeddings [N, 512] → one identity: the normalised mean (or element-wise
    median) of the normalised embeddings, and each photo's cosine similarity to it. Refused: NaN or
    infinite entries, an all-zero embedding, and embeddings whose mean (median) is zero, such as v
    and -v: a zero vector has no direction, so it is no identity."""
    e = np.asarray(embeddings)
    if e.size == 0:
        raise NoFaceError("no embeddings to combine: no photo gave a usable face")
    if e.dtype.kind not in "fiu" or e.ndim < 1 or e.shape[-1] != ID_DIM:   # [N, 1, 512] (stacked [1, 512]s) too
        raise InvalidInputError(f"embeddings: {e.dtype} {e.shape}, expected float [N, {ID_DIM}] ArcFace features")
    e = e.reshape(-1, ID_DIM).astype(np.float64)
    if not np.all(np.isfinite(e)):
        raise InvalidInputError("embeddings: contain NaN or infinity; not ArcFace features")
    zero = np.flatnonzero(~np.any(e, axis=1))
    if len(zero):
        raise InvalidInputError(f"embedding {zero[0]} (of {len(e)}) is all zeros; not an identity")
    e = l2_normalize(e / np.abs(e).max(axis=1, keepdims=True))    # the largest entry first: 1e30s would overflow
    if method == "mean":
        centre = e.mean(axis=0)
    elif method == "median":
        centre = np.median(e, axis=0)
    else:
        raise InvalidInputError(f"identity combine method must be 'mean' or 'median', got {method!r}")
    if np.linalg.norm(centre) < 1e-6:
        raise InvalidInputError(f"the {len(e)} embeddings cancel out (their {method} is zero): they are not one "
                                "person's; combine photos of one identity")
    ident = l2_normalize(centre)
    return Identity(embedding=ident.astype(np.float32), cosines=(e @ ident).astype(np.float32), method=method)


def check_face_choice(face, min_size) -> None:
    """The face-choice policy's own ranges (`--face`, `--min-size`), refused with InvalidInputError
    before any photo is read: every photo would otherwise be skipped with the same error."""
    if face != "largest" and (isinstance(face, str) or checks.whole(face, "face (--face)") < 0):
        raise InvalidInputError(f"face (--face) must be 'largest' or a face index >= 0, got {face!r}")
    size = checks.real(min_size, "min_size (--min-size)")
    if not 0.0 <= size < float("inf"):
        raise InvalidInputError(f"min_size (--min-size) must be a size in pixels >= 0, got {min_size!r}")


class FaceAnalyzer:
    """Detector + recognizer + the face-choice policy (checked here); embeds images and files."""

    def __init__(self, detector: ScrfdDetector | None, recognizer: ArcFaceRecognizer,
                 face: str | int = "largest", min_size: float = 0.0, limits: ImageLimits = DEFAULT_LIMITS):
        check_face_choice(face, min_size)
        if detector is not None and not callable(getattr(detector, "detect", None)):
            raise InvalidInputError(f"detector must be a ScrfdDetector (load_face_models opens one) or None for "
                                    f"aligned crops, not {type(detector).__name__}")
        if not callable(getattr(recognizer, "embed", None)):
            raise InvalidInputError(f"recognizer must be an ArcFaceRecognizer (load_face_models opens one), "
                                    f"not {type(recognizer).__name__}")
        if not isinstance(limits, ImageLimits):
            raise InvalidInputError(f"limits must be an ImageLimits, not {type(limits).__name__}")
        self.detector, self.recognizer = detector, recognizer
        self.face, self.min_size, self.limits = face, min_size, limits

    def model_ids(self) -> dict[str, str]:
        """{"detector", "recognizer": 16 hex digits of the sha256 of the file each was opened from (its
        ONNX file or TensorRT plan)}: what a resumable run records, so that it never continues with
        other models (their scores and the faces they find differ)."""
        ids = {}
        for role, model in (("detector", self.detector), ("recognizer", self.recognizer)):
            path = Path(getattr(model, "name", "") or "")
            if model is not None and path.is_file():
                ids[role] = sha256_file(path)[:16]
        return ids

    def embed_image(self, image: np.ndarray, name: str = "image") -> tuple[np.ndarray, Face, int]:
        """image [H, W, 3] uint8 RGB → (unit embedding [512], chosen face, eligible face count)."""
        if self.detector is None:
            raise InvalidInputError("no face detector loaded; pass one, or use aligned 112x112 crops")
        check_rgb8(image, name, "load_image reads a file into one")
        check_detectable(image.shape[0], image.shape[1], self.detector.input_size, name)
        chosen, n = choose_face(self.detector.detect(image), self.face, self.min_size, name)
        return self.recognizer.embed(align_face(image, chosen.kps))[0], chosen, n

    def embed_aligned(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """An already aligned 112x112 RGB crop → unit embedding [512] (no detection)."""
        check_rgb8(image, name, "load_image reads a file into one")
        if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
            raise InvalidInputError(f"{name}: {image.shape[1]}x{image.shape[0]} is not an aligned "
                                    f"{CROP_SIZE}x{CROP_SIZE} face crop; drop --aligned to detect the face")
        return self.recognizer.embed(image)[0]

    def embed_file(self, path: str | Path, aligned: bool = False) -> FileResult:
        """One file → FileResult; raises the per-file errors (see embed_files for the skipping form)."""
        path = Path(check_path(path))
        checks.flag(aligned, "aligned")
        image = load_image(path, self.limits)
        if aligned:
            return FileResult(path, embedding=self.embed_aligned(image, str(path)), n_faces=1)
        emb, face, n = self.embed_image(image, str(path))
        return FileResult(path, embedding=emb, face=face, n_faces=n)

    def embed_files(self, paths: Iterable[str | Path], aligned: bool = False) -> EmbedReport:
        """Every file → a FileResult; unreadable files and photos without a usable face are recorded
        (error, error_type) and skipped."""
        results = []
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable):
            raise InvalidInputError(f"paths must be a list of image files, not {type(paths).__name__} "
                                    "(expand_paths turns folders and patterns into one)")
        paths = list(paths)          # arguments, not photos: refused for the whole call, never skipped per file
        checks.flag(aligned, "aligned")
        bad = [type(p).__name__ for p in paths if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise InvalidInputError(f"paths must hold file names (str or pathlib.Path), not {bad[0]}")
        for p in paths:
            try:
                results.append(self.embed_file(p, aligned))
            except SKIPPABLE as e:
                results.append(FileResult(Path(p), error=str(e), error_type=type(e).__name__))
        return EmbedReport(results)


def embed_images(paths: Iterable[str | Path], detector: ScrfdDetector | None, recognizer: ArcFaceRecognizer, *,
                 face: str | int = "largest", min_size: float = 0.0, limits: ImageLimits = DEFAULT_LIMITS,
                 aligned: bool = False) -> EmbedReport:
    """Embed each file (see FaceAnalyzer.embed_files); bad files are skipped and reported."""
    return FaceAnalyzer(detector, recognizer, face, min_size, limits).embed_files(paths, aligned)
