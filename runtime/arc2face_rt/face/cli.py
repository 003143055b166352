"""`arc2face-rt embed` and `arc2face-rt score`, for the main CLI to register, and identity_from_images()
for `arc2face-rt generate --image`.

Each run_* returns an exit code and raises Arc2FaceError subclasses for fatal problems (the main CLI
prints those). Progress and summaries go to stderr; `score` writes its table to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..atomic import atomic_write
from ..errors import EngineMismatchError, InvalidInputError, MissingWeightsError, NoFaceError, OutputExistsError
from ..manifest import load_manifest
from ..pipeline import load_identity, pick_backend
from .detector import DETECTOR_FILE, SCORE_THRESHOLD, ScrfdDetector
from .identity import EmbedReport, FaceAnalyzer, combine_embeddings
from .image_io import DEFAULT_LIMITS, ImageLimits, expand_paths
from .recognizer import RECOGNIZER_FILE, ArcFaceRecognizer

# Where a models folder may hold each file: Arc2Face's README puts arcface.onnx next to antelopev2's
# files (models/antelopev2/), antelopev2 names the detector scrfd_10g_bnkps.onnx, buffalo_l det_10g.onnx.
_DETECTOR_NAMES = (DETECTOR_FILE, "det_10g.onnx")
_SUBDIRS = (".", "antelopev2")
DEFAULT_MODELS_DIR = "models"


class FaceWarning(UserWarning):
    """A photo was skipped or had several faces (identity_from_images without a `log` callback)."""


def _face_choice(s: str) -> str | int:
    if s == "largest":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--face takes 'largest' or a face index, not {s!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("face models")
    g.add_argument("--models", metavar="DIR", default=None,
                   help=f"folder with {DETECTOR_FILE} and {RECOGNIZER_FILE} (also looked for in DIR/antelopev2); "
                        f"default $ARC2FACE_MODELS or ./{DEFAULT_MODELS_DIR}")
    g.add_argument("--detector", metavar="FILE", default=None, help=f"SCRFD ONNX file (default DIR/{DETECTOR_FILE})")
    g.add_argument("--recognizer", metavar="FILE", default=None,
                   help=f"ArcFace ONNX file (default DIR/{RECOGNIZER_FILE}, Arc2Face's own, not glintr100.onnx)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime device (auto: CUDA when onnxruntime-gpu has it)")
    g.add_argument("--engines", metavar="DIR", type=Path, default=None,
                   help="engines folder whose detector.plan / arcface.plan run the face models on TensorRT")
    g.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto",
                   help="auto: TensorRT when --engines has face plans and a GPU is present, else ONNX Runtime")
    f = p.add_argument_group("face choice")
    f.add_argument("--face", type=_face_choice, default="largest", metavar="largest|INDEX",
                   help="which face of a photo with several: the largest (Arc2Face's choice) or the INDEX-th "
                        "in detection order (best score first)")
    f.add_argument("--min-score", type=float, default=SCORE_THRESHOLD, metavar="S",
                   help=f"detection score threshold (default {SCORE_THRESHOLD})")
    f.add_argument("--min-size", type=float, default=0.0, metavar="PX",
                   help="ignore faces whose box is narrower or shorter than PX pixels")
    f.add_argument("--max-pixels", type=lambda s: int(float(s)), default=DEFAULT_LIMITS.max_pixels, metavar="N",
                   help=f"refuse images with more than N pixels, checked before decoding "
                        f"(default {DEFAULT_LIMITS.max_pixels / 1e6:g}e6)")
    f.add_argument("--aligned", action="store_true",
                   help="inputs are already aligned 112x112 ArcFace crops: skip detection")
    f.add_argument("--recursive", action="store_true", help="folders: include subfolders")


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed", help="photos of one person -> ArcFace identity embedding (.npy)",
        description="Detect, align and embed the face in each photo; write the normalised mean embedding "
                    "[512] float32. Unreadable photos and photos without a face are skipped and reported.")
    p.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH",
                   help="image files, folders or glob patterns (repeatable)")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="output embedding (never overwritten)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--combine", choices=("mean", "median"), default="mean",
                   help="how several photos combine (normalised mean or element-wise median)")
    _add_model_args(p)
    p.set_defaults(func=run_embed)
    return p


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score", help="ArcFace cosine similarity of images to an identity",
        description="Print 'cosine<TAB>path' per image (nan when it has no usable face). Exit 1 if any "
                    "image could not be scored.")
    p.add_argument("--identity", required=True, metavar="FILE.npy", help="identity embedding [512]")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    _add_model_args(p)
    p.set_defaults(func=run_score)
    return p


def resolve_model(kind: str, explicit: str | Path | None, models_dir: str | Path | None) -> Path:
    """The detector ("detector") or recognizer ("recognizer") file: explicit path, else found in models_dir."""
    if explicit:
        return Path(explicit)
    root = Path(models_dir or os.environ.get("ARC2FACE_MODELS") or DEFAULT_MODELS_DIR)
    names = _DETECTOR_NAMES if kind == "detector" else (RECOGNIZER_FILE,)
    for sub in _SUBDIRS:
        for name in names:
            if (root / sub / name).is_file():
                return root / sub / name
    if kind == "recognizer" and any((root / sub / "glintr100.onnx").is_file() for sub in _SUBDIRS):
        raise MissingWeightsError(
            f"{root}: has antelopev2's glintr100.onnx but no {RECOGNIZER_FILE}; Arc2Face was trained on the "
            f"identity space of its own {RECOGNIZER_FILE} (FoivosPar/Arc2Face): download it into {root}")
    what = (f"{DETECTOR_FILE} (insightface antelopev2; non-commercial licence)" if kind == "detector"
            else f"{RECOGNIZER_FILE} (FoivosPar/Arc2Face)")
    raise MissingWeightsError(f"{root}: no {what}; download it there, pass --{kind} FILE or --models DIR "
                              "(`arc2face-export random-checkpoint` writes random test models)")


def face_plan(engines: str | Path | None, backend: str, name: str) -> tuple[Path, dict] | None:
    """(plan path, its face-stage record) when face stage `name` ("detector" / "arcface") runs on
    TensorRT: `backend` "trt", or "auto" with a plan for it, a GPU and TensorRT; else None (ONNX Runtime)."""
    if engines is None or backend == "ort":
        if backend == "trt":
            raise InvalidInputError("--backend trt needs --engines DIR (a folder `arc2face-export build-engines` wrote)")
        return None
    engines = Path(engines)
    m = load_manifest(engines)
    if name not in m.get("plans", {}):
        if backend == "trt":
            raise EngineMismatchError(f"{engines}: no TensorRT plan for the face stage '{name}'; build it with "
                                      f"`arc2face-export build-engines --out {engines} --face-models DIR`")
        return None
    if pick_backend(engines, m, backend) != "trt":
        return None
    return engines / m["plans"][name]["file"], m.get("face_stages", {}).get(name, {})


def load_face_models(models_dir: str | Path | None = None, detector_path: str | Path | None = None,
                     recognizer_path: str | Path | None = None, *, device: str = "auto",
                     min_score: float = SCORE_THRESHOLD, need_detector: bool = True,
                     engines: str | Path | None = None, backend: str = "ort",
                     ) -> tuple[ScrfdDetector | None, ArcFaceRecognizer]:
    """Open the detector (unless need_detector is False) and the recognizer: from their ONNX files on
    ONNX Runtime, or from the engines folder's `detector.plan` / `arcface.plan` on TensorRT."""
    from ..backends.trt import open_session as open_plan   # imports no TensorRT until a plan is opened

    det = None
    if need_detector:
        plan = face_plan(engines, backend, "detector")
        if plan:
            det = ScrfdDetector(open_plan(plan[0]), score_threshold=min_score, name=str(plan[0]))
        else:
            det = ScrfdDetector.from_file(resolve_model("detector", detector_path, models_dir), device=device,
                                          score_threshold=min_score)
    plan = face_plan(engines, backend, "arcface")
    if plan:
        rec = ArcFaceRecognizer(open_plan(plan[0]), plan[1]["graph_normalises"], name=str(plan[0]),
                                max_batch=plan[1]["batch_range"][2])
    else:
        rec = ArcFaceRecognizer.from_file(resolve_model("recognizer", recognizer_path, models_dir), device=device)
    return det, rec


def _analyzer(args) -> FaceAnalyzer:
    det, rec = load_face_models(args.models, args.detector, args.recognizer, device=args.device,
                                min_score=args.min_score, need_detector=not args.aligned,
                                engines=args.engines, backend=args.backend)
    limits = ImageLimits(max_bytes=DEFAULT_LIMITS.max_bytes, max_pixels=args.max_pixels)
    return FaceAnalyzer(det, rec, face=args.face, min_size=args.min_size, limits=limits)


def _describe(report: EmbedReport, face: str | int, log: Callable[[str], None]) -> None:
    for r in report.results:
        if not r.ok:
            log(f"skipped: {r.error}")   # the message starts with the path
        elif r.n_faces > 1:
            which = "the largest" if face == "largest" else f"face {face}"
            log(f"{r.path}: {r.n_faces} faces found, used {which} (--face INDEX picks another)")


def save_npy_atomic(path: str | Path, array: np.ndarray, force: bool = False) -> None:
    """np.save to a temporary file beside `path`, then rename: no half-written or clobbered output."""
    atomic_write(path, lambda f: np.save(f, array), overwrite=force,
                 hint="choose another --out or pass --force to replace it")


def run_embed(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        raise InvalidInputError(f"--out {out}: must end in .npy")
    if out.exists() and not args.force:  # fail before the slow part
        raise OutputExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    paths = expand_paths(args.image, recursive=args.recursive)
    report = _analyzer(args).embed_files(paths, aligned=args.aligned)
    log = _stderr
    _describe(report, args.face, log)
    if report.n_ok == 0:
        raise NoFaceError(f"none of the {len(paths)} image(s) gave a usable face (see above); "
                          "use clear, frontal photos, or lower --min-score / --min-size")
    ident = combine_embeddings(report.embeddings(), args.combine)
    for r, c in zip(report.succeeded, ident.cosines):
        log(f"  cos {c:+.3f}  {r.path}")
    save_npy_atomic(out, ident.embedding, force=args.force)
    log(f"wrote {out}: identity from {report.n_ok} of {len(paths)} image(s) ({ident.method}); "
        f"{len(report.failed)} skipped")
    return 0


def run_score(args) -> int:
    ident = load_identity(args.identity)
    paths = expand_paths(args.images, recursive=args.recursive)
    report = _analyzer(args).embed_files(paths, aligned=args.aligned)
    _describe(report, args.face, _stderr)
    for r in report.results:
        cos = float(r.embedding @ ident) if r.ok else float("nan")
        sys.stdout.write(f"{cos:.4f}\t{r.path}\n")
    _stderr(f"scored {report.n_ok} of {len(paths)} image(s)")
    return 0 if report.n_ok == len(paths) else 1


def identity_from_images(paths: Iterable[str | Path], models_dir: str | Path | None = None, *,
                         detector_path: str | Path | None = None, recognizer_path: str | Path | None = None,
                         face: str | int = "largest", min_score: float = SCORE_THRESHOLD, min_size: float = 0.0,
                         limits: ImageLimits = DEFAULT_LIMITS, device: str = "auto", method: str = "mean",
                         aligned: bool = False, log: Callable[[str], None] | None = None,
                         engines: str | Path | None = None, backend: str = "ort") -> np.ndarray:
    """Photos (files, folders, globs) of one person → unit identity embedding [512] float32.

    Skipped photos and multi-face photos are reported through `log` (default: warnings.warn with
    FaceWarning). Raises NoFaceError when no photo gives a usable face."""
    if log is None:
        def log(msg: str) -> None:
            warnings.warn(msg, FaceWarning, stacklevel=3)
    files = expand_paths([paths] if isinstance(paths, (str, Path)) else paths)
    det, rec = load_face_models(models_dir, detector_path, recognizer_path, device=device,
                                min_score=min_score, need_detector=not aligned, engines=engines, backend=backend)
    report = FaceAnalyzer(det, rec, face, min_size, limits).embed_files(files, aligned=aligned)
    _describe(report, face, log)
    if report.n_ok == 0:
        raise NoFaceError(f"none of the {len(files)} image(s) gave a usable face; use clear, frontal photos")
    return combine_embeddings(report.embeddings(), method).embedding


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
