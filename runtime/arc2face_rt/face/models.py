"""Finding and opening the face models, and photos -> identity in one call.

The detector and recognizer run from their ONNX files on ONNX Runtime, or from an engines folder's
TensorRT plans (`detector.plan` / `arcface.plan`). `arc2face-rt embed/score/generate --image` and the
exporter's face-plan builder use these; the CLI modules only parse flags.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import checks
from ..argtypes import env_path
from ..errors import EngineMismatchError, InvalidInputError, MissingWeightsError
from ..folder_setup import BACKENDS, DEVICES, pick_backend
from ..integrity import verify_records
from ..manifest import load_manifest, record_files, resolve_inside
from .detector import DETECTOR_FILE, SCORE_THRESHOLD, ScrfdDetector
from .identity import EmbedReport, FaceAnalyzer, check_face_choice, combine_embeddings
from .image_io import DEFAULT_LIMITS, ImageLimits, expand_paths
from .recognizer import RECOGNIZER_FILE, ArcFaceRecognizer

# Where a models folder may hold each file: Arc2Face's README puts arcface.onnx next to antelopev2's
# files (models/antelopev2/), antelopev2 names the detector scrfd_10g_bnkps.onnx, buffalo_l det_10g.onnx.
_DETECTOR_NAMES = (DETECTOR_FILE, "det_10g.onnx")
_SUBDIRS = (".", "antelopev2")
DEFAULT_MODELS_DIR = "models"


class FaceWarning(UserWarning):
    """A photo was skipped or had several faces (identity_from_images without a `log` callback)."""


def resolve_model(kind: str, explicit: str | Path | None, models_dir: str | Path | None,
                  file_flags: bool = False, models_flag: str = "--models") -> Path:
    """The detector ("detector") or recognizer ("recognizer") file: explicit path, else found in models_dir
    (else $ARC2FACE_MODELS, else ./models). The error names only flags the command has: `models_flag`
    for the folder, and --detector/--recognizer FILE only with `file_flags` (`embed`, `score`; not
    `generate` or `dataset`)."""
    if explicit:
        return Path(explicit)
    root = Path(models_dir or env_path("ARC2FACE_MODELS") or DEFAULT_MODELS_DIR)
    if root.exists() and not root.is_dir():
        named = f"{models_flag} {root}" if models_dir else (
            f"$ARC2FACE_MODELS={root}" if env_path("ARC2FACE_MODELS") else f"./{DEFAULT_MODELS_DIR}")
        raise MissingWeightsError(f"{named}: is a file, not a folder of face models; name the folder that holds "
                                  f"{DETECTOR_FILE} and {RECOGNIZER_FILE}")
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
    where = f"{models_flag} DIR" + (" or set $ARC2FACE_MODELS" if models_dir is None else "")
    advice = f"pass --{kind} FILE or {where}" if file_flags else f"pass {where}"
    raise MissingWeightsError(f"{root}: no {what}; download it there, or {advice} "
                              "(`arc2face-export random-checkpoint` writes random test models)")


def face_plan(engines: str | Path | None, backend: str, name: str, verify: bool = True) -> tuple[Path, dict] | None:
    """(plan path, its face-stage record) when face stage `name` ("detector" / "arcface") runs on
    TensorRT: `backend` "trt", or "auto" with a plan for it, a GPU and TensorRT; else None (ONNX Runtime).
    The plan's content is checked against the manifest (`verify`; sizes only when False)."""
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
    stage = m.get("face_stages", {}).get(name)
    if stage is None:
        raise EngineMismatchError(f"{engines}: a plan for the face stage '{name}' but no face_stages record; "
                                  f"rebuild with `arc2face-export build-engines --out {engines} --face-models DIR --force`")
    rec = m["plans"][name]
    verify_records(engines, record_files(rec), mode="stamp" if verify else "size")
    return resolve_inside(engines, rec["file"]), stage


def file_backend(engines: str | Path | None, backend: str, device: str = "auto") -> str:
    """"openvino" or "ort": what runs a face model from its ONNX file (no TensorRT plan) for `backend`."""
    if backend in ("ort", "openvino"):
        return backend
    m = load_manifest(engines) if engines is not None else {}
    return "openvino" if pick_backend(Path(engines or "."), m, "auto", device) == "openvino" else "ort"


def load_face_models(models_dir: str | Path | None = None, detector_path: str | Path | None = None,
                     recognizer_path: str | Path | None = None, *, device: str = "auto",
                     min_score: float = SCORE_THRESHOLD, need_detector: bool = True,
                     engines: str | Path | None = None, backend: str = "ort", verify: bool = True,
                     file_flags: bool = False, models_flag: str = "--models",
                     ) -> tuple[ScrfdDetector | None, ArcFaceRecognizer]:
    """Open the detector (unless need_detector is False) and the recognizer: from their ONNX files on
    ONNX Runtime or OpenVINO (f32), or from the engines folder's `detector.plan` / `arcface.plan` on TensorRT.
    `file_flags`, `models_flag`: the flags a missing model's error may suggest (see `resolve_model`)."""
    from ..backends.trt import open_session as open_plan   # imports no TensorRT until a plan is opened

    check_model_options(min_score, backend, device)
    checks.flag(verify, "verify")
    det = None
    on_file = "ort" if backend == "trt" else file_backend(engines, backend, device)
    if need_detector:
        plan = face_plan(engines, backend, "detector", verify)
        if plan:
            det = ScrfdDetector(open_plan(plan[0]), score_threshold=min_score, name=str(plan[0]))
        else:
            path = resolve_model("detector", detector_path, models_dir, file_flags, models_flag)
            det = ScrfdDetector.from_file(path, device=device, score_threshold=min_score, backend=on_file)
    plan = face_plan(engines, backend, "arcface", verify)
    if plan:
        rec = ArcFaceRecognizer(open_plan(plan[0]), plan[1]["graph_normalises"], name=str(plan[0]),
                                max_batch=plan[1]["batch_range"][2])
    else:
        path = resolve_model("recognizer", recognizer_path, models_dir, file_flags, models_flag)
        rec = ArcFaceRecognizer.from_file(path, device=device, backend=on_file)
    return det, rec


def describe_report(report: EmbedReport, face: str | int, log: Callable[[str], None]) -> None:
    """Log each skipped photo (its message starts with the path) and each choice among several faces."""
    for r in report.results:
        if not r.ok:
            log(f"skipped: {r.error}")   # the message starts with the path
        elif r.n_faces > 1:
            which = "the largest" if face == "largest" else f"face {face}"
            log(f"{r.path}: {r.n_faces} faces found, used {which} (--face INDEX picks another)")


def identity_from_images(paths: Iterable[str | Path], models_dir: str | Path | None = None, *,
                         detector_path: str | Path | None = None, recognizer_path: str | Path | None = None,
                         face: str | int = "largest", min_score: float = SCORE_THRESHOLD, min_size: float = 0.0,
                         limits: ImageLimits = DEFAULT_LIMITS, device: str = "auto", method: str = "mean",
                         aligned: bool = False, log: Callable[[str], None] | None = None,
                         engines: str | Path | None = None, backend: str = "ort", verify: bool = True) -> np.ndarray:
    """Photos (files, folders, globs) of one person → unit identity embedding [512] float32.

    Skipped photos and multi-face photos are reported through `log` (default: warnings.warn with
    FaceWarning). Raises NoFaceError (or InvalidInputError) when no photo gives a usable face; a single
    photo's problem is raised only, not also logged."""
    check_face_options(face, min_score, min_size, method, backend, device)
    checks.flag(aligned, "aligned")
    checks.flag(verify, "verify")
    if log is None:
        def log(msg: str) -> None:
            warnings.warn(msg, FaceWarning, stacklevel=3)
    files = expand_paths(paths)
    det, rec = load_face_models(models_dir, detector_path, recognizer_path, device=device,
                                min_score=min_score, need_detector=not aligned, engines=engines, backend=backend,
                                verify=verify)
    report = FaceAnalyzer(det, rec, face, min_size, limits).embed_files(files, aligned=aligned)
    if len(files) == 1:
        report.require_some()       # one photo: its error alone, not also a 'skipped' line
    describe_report(report, face, log)
    report.require_some()
    return combine_embeddings(report.embeddings(), method).embedding


def check_face_options(face, min_score, min_size, method: str = "mean", backend: str = "ort",
                       device: str = "auto") -> None:
    """Refuse a bad option before any model is loaded or photo read (InvalidInputError naming it): the
    flags' own ranges (`embed --face/--min-score/--min-size/--combine/--backend/--device`)."""
    checks.choice(method, "method (--combine)", ("mean", "median"))
    check_face_choice(face, min_size)
    check_model_options(min_score, backend, device)


def check_model_options(min_score, backend: str, device: str) -> None:
    """`load_face_models`' own options (`--min-score/--backend/--device`), refused with InvalidInputError."""
    checks.choice(backend, "backend (--backend)", BACKENDS)
    checks.choice(device, "device (--device)", DEVICES)
    score = checks.real(min_score, "min_score (--min-score)")
    if not 0.0 <= score <= 1.0:            # also NaN: no detection would pass it, blaming the photo
        raise InvalidInputError(f"min_score (--min-score) must be a detection score in 0..1, got {min_score!r}")
