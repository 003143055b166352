"""`arc2face-rt embed` and `arc2face-rt score`: flags and the commands; the library pieces they use
(model resolution and loading, photos -> identity) live in `face.models`.

Each run_* returns an exit code and raises Arc2FaceError subclasses for fatal problems (the main CLI
prints those). Progress and summaries go to stderr; `score` writes its table to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import argtypes
from ..errors import Arc2FaceError, InvalidInputError, OutputExistsError
from ..folder_setup import check_backend_device
from ..npyio import save_npy_atomic
from ..outputs import check_output_file
from ..pipeline import load_identity
from .detector import DETECTOR_FILE, SCORE_THRESHOLD
from .identity import SKIPPABLE, EmbedReport, FaceAnalyzer, FileResult, combine_embeddings
from .flags import add_max_pixels, limits_from
from .image_io import check_image_file, expand_paths
from .models import DEFAULT_MODELS_DIR, describe_report, load_face_models
from .recognizer import RECOGNIZER_FILE


def _face_choice(s: str) -> str | int:
    if s == "largest":
        return s
    try:
        i = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--face takes 'largest' or a face index, not {s!r}") from None
    if i < 0:
        raise argparse.ArgumentTypeError(f"--face takes 'largest' or a face index >= 0, not {s}")
    return i


# the detection flags' defaults: `--aligned` (no detection) refuses any other value
_DETECTION = {"detector": None, "face": "largest", "min_score": SCORE_THRESHOLD, "min_size": 0.0}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("face models")
    g.add_argument("--models", metavar="DIR", type=argtypes.path, default=None,
                   help=f"folder with {DETECTOR_FILE} and {RECOGNIZER_FILE} (also looked for in DIR/antelopev2); "
                        f"default $ARC2FACE_MODELS or ./{DEFAULT_MODELS_DIR}")
    g.add_argument("--detector", metavar="FILE", type=argtypes.path, default=_DETECTION["detector"], help=f"SCRFD ONNX file (default DIR/{DETECTOR_FILE})")
    g.add_argument("--recognizer", metavar="FILE", type=argtypes.path, default=None,
                   help=f"ArcFace ONNX file (default DIR/{RECOGNIZER_FILE}, Arc2Face's own, not glintr100.onnx)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime device (auto: CUDA when onnxruntime-gpu has it)")
    g.add_argument("--engines", metavar="DIR", type=argtypes.path, default=None,
                   help="engines folder whose detector.plan / arcface.plan run the face models on TensorRT")
    g.add_argument("--backend", choices=("auto", "ort", "trt", "openvino"), default="auto",
                   help="auto: TensorRT when --engines has face plans and a GPU is present, else OpenVINO (f32) "
                        "when installed and no GPU is usable, else ONNX Runtime")
    g.add_argument("--no-verify", action="store_true",
                   help="with --engines: check the plans' sizes only, not their content (sha256)")
    f = p.add_argument_group("face choice")
    f.add_argument("--face", type=_face_choice, default=_DETECTION["face"], metavar="largest|INDEX",
                   help="which face of a photo with several: the largest (Arc2Face's choice) or the INDEX-th "
                        "in detection order (best score first)")
    f.add_argument("--min-score", type=argtypes.number(0.0, 1.0, "a score"), default=_DETECTION["min_score"],
                   metavar="S",
                   help=f"detection score threshold (default {SCORE_THRESHOLD})")
    f.add_argument("--min-size", type=argtypes.number(0.0, name="a size in pixels"), default=_DETECTION["min_size"],
                   metavar="PX",
                   help="ignore faces whose box is narrower or shorter than PX pixels")
    add_max_pixels(f)
    f.add_argument("--aligned", action="store_true",
                   help="inputs are already aligned 112x112 ArcFace crops: skip detection")
    f.add_argument("--recursive", action="store_true", help="folders: include subfolders")


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed", help="photos of one person -> ArcFace identity embedding (.npy)",
        description="Detect, align and embed the face in each photo; write the normalised mean embedding "
                    "[512] float32. Unreadable photos and photos without a face are skipped and reported.")
    p.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH", type=argtypes.path,
                   help="image files, folders or glob patterns (repeatable)")
    p.add_argument("--out", required=True, type=argtypes.path, metavar="FILE.npy",
                   help="output embedding (never overwritten)")
    p.add_argument("--force", action="store_true", help="replace an existing --out identity file (nothing else)")
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
    p.add_argument("--identity", required=True, type=argtypes.path, metavar="FILE.npy", help="identity embedding [512]")
    p.add_argument("images", nargs="+", metavar="IMAGE", type=argtypes.path, help="image files, folders or glob patterns")
    _add_model_args(p)
    p.set_defaults(func=run_score)
    return p


def _check_where(args) -> None:
    """Refuse the model flags that cannot be honoured (as `generate` refuses them), before any file is read."""
    check_backend_device(args.backend, args.device)
    detection = [f"--{k.replace('_', '-')}" for k, default in _DETECTION.items() if getattr(args, k) != default]
    if args.aligned and detection:
        raise InvalidInputError(f"{', '.join(detection)}: detection settings, and --aligned inputs are not detected "
                                "(drop them, or drop --aligned)")
    if args.no_verify and args.engines is None:
        raise InvalidInputError("--no-verify skips checking the --engines folder's face plans; without --engines "
                                "there are none (drop it)")
    if args.engines is not None and args.backend in ("ort", "openvino"):
        raise InvalidInputError(f"--engines {args.engines}: its face models' TensorRT plans are for --backend trt or "
                                f"auto; --backend {args.backend} runs the ONNX files (drop --engines)")


def _embed_files(args, paths: list[Path]) -> EmbedReport:
    """Every file's result. Files that stat() already refuses (missing, a folder or pipe, empty, over
    the size limit) are found before the face models load, and when no file is left the models never
    load at all."""
    limits = limits_from(args)
    early = []
    for p in paths:
        try:
            check_image_file(p, limits)
        except SKIPPABLE as e:
            early.append(FileResult(Path(p), error=str(e), error_type=type(e).__name__))
    if len(early) == len(paths):
        return EmbedReport(early)
    return _analyzer(args).embed_files(paths, aligned=args.aligned)


def _analyzer(args) -> FaceAnalyzer:
    det, rec = load_face_models(args.models, args.detector, args.recognizer, device=args.device,
                                min_score=args.min_score, need_detector=not args.aligned,
                                engines=args.engines, backend=args.backend, verify=not args.no_verify,
                                file_flags=True)
    return FaceAnalyzer(det, rec, face=args.face, min_size=args.min_size, limits=limits_from(args))


def run_embed(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        raise InvalidInputError(f"--out {out}: must end in .npy")
    _check_where(args)
    if os.path.lexists(out) and (not args.force or out.is_dir()):  # fail before the slow part
        raise OutputExistsError(f"--out {out}: exists{' as a folder' if out.is_dir() else ''}; choose another "
                                f"--out{'' if out.is_dir() else ' or pass --force to replace it'}")
    if os.path.lexists(out) and args.force:    # --force replaces only what embed writes: an identity file
        try:
            load_identity(out)
        except Arc2FaceError:
            raise OutputExistsError(f"--out {out}: exists and is not an identity file (a [512] float .npy, what "
                                    "embed writes); --force replaces only those: move it away or choose another "
                                    "--out") from None
    check_output_file(out)
    paths = expand_paths(args.image, recursive=args.recursive)
    report = _embed_files(args, paths)
    log = _stderr
    if len(paths) == 1:
        report.require_some()       # one photo: its error line alone, not a 'skipped' line before it
    describe_report(report, args.face, log)
    report.require_some()
    ident = combine_embeddings(report.embeddings(), args.combine)
    for r, c in zip(report.succeeded, ident.cosines):
        log(f"  cos {c:+.3f}  {r.path}")
    save_npy_atomic(out, ident.embedding, force=args.force)
    log(f"wrote {out}: identity from {report.n_ok} of {len(paths)} image(s) ({ident.method}); "
        f"{len(report.failed)} skipped")
    return 0


def run_score(args) -> int:
    if sys.stdout is None:
        raise InvalidInputError("standard output is closed; `score` prints its table there (redirect it to a file)")
    _check_where(args)
    ident = load_identity(args.identity)
    paths = expand_paths(args.images, recursive=args.recursive)
    report = _embed_files(args, paths)
    describe_report(report, args.face, _stderr)
    for r in report.results:
        cos = float(r.embedding @ ident) if r.ok else float("nan")
        _write_out(f"{cos:.4f}\t{_cell(r.path)}\n")
    _stderr(f"scored {report.n_ok} of {len(paths)} image(s)")
    return 0 if report.n_ok == len(paths) else 1


def _cell(path) -> str:
    """A file name as one cell of the table: a backslash, tab, newline or carriage return in it escaped
    (\\\\, \\t, \\n, \\r, as `ls -b` shows them), so each image stays one row, told apart."""
    return str(path).translate({92: "\\\\", 9: "\\t", 10: "\\n", 13: "\\r"})


def _write_out(line: str) -> None:
    """A line of the table on stdout. A file name that is not valid UTF-8 (held as surrogates) goes out
    as its own bytes where the stream allows it, else escaped (\\udcNN) as the messages on stderr show it."""
    try:
        sys.stdout.write(line)
    except UnicodeEncodeError:
        enc = sys.stdout.encoding or "utf-8"
        sys.stdout.write(line.encode(enc, "backslashreplace").decode(enc))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
