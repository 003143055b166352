"""The face models as engines-folder stages: `detector` (SCRFD) and `arcface` (IResNet-100).

Unlike the generation stages these graphs are not exported by us: they are the released ONNX files
(`scrfd_10g_bnkps.onnx`, `arcface.onnx`). `add_face_stages` copies each into the engines folder with
its input pinned to what the runtime feeds (detector [1,3,640,640], the letterboxed image; recognizer
[B,3,112,112]), so TensorRT sees static shapes, and records in manifest.json under `face_stages`: the
source file and its sha256, the graph's I/O, the recognizer's input convention (decided from the
source graph exactly as the ONNX Runtime path decides it) and the batch profile. `build_engines`
then builds `detector.plan` and `arcface.plan` like any other stage.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import temp_prefix, usual_mode
from arc2face_rt.errors import EngineMismatchError, MissingWeightsError, ModelFormatError
from arc2face_rt.face.detector import INPUT_SIZE
from arc2face_rt.face._onnx import first_nodes
from arc2face_rt.face.align import CROP_SIZE
from arc2face_rt.face.recognizer import _HEAD_NODES, graph_normalises
from arc2face_rt.specs import StageSpec, TensorSpec

from .engines_folder import refuse_folders_at
from .trt_network import import_trt, network_io, parse_onnx

log = logging.getLogger("arc2face_export")

# name -> (role for resolve_model, pinned input shape, batch profile)
FACE_STAGES = {
    "detector": ("detector", (1, 3, INPUT_SIZE, INPUT_SIZE), (1, 1, 1)),
    "arcface": ("recognizer", ("B", 3, CROP_SIZE, CROP_SIZE), (1, 1, 16)),
}
_REDOWNLOAD = "download it again, or build without the face stages (--no-face)"


def _load_model(src: Path, role: str):
    """The ONNX model in `src`; a file that does not parse as one (damaged, truncated, not ONNX) is
    refused in one line naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(src))
    except (DecodeError, ValueError, onnx.checker.ValidationError) as e:   # OSError: exits words it
        raise MissingWeightsError(f"{src}: the {role} is not a readable ONNX model ({' '.join(str(e).split())}); "
                                  f"the file is damaged or truncated: {_REDOWNLOAD}") from None


def _pin_input(model, src: Path, dst: Path, shape: tuple, role: str = "face model") -> dict:
    """Write `model` (read from `src`) to `dst` with its one input's dims set to `shape` ("B" stays
    symbolic); return its I/O (TensorRT's view after parsing, batch axis as "B"). A model whose input
    cannot take `shape` is another model than the `role` it was given as, refused in one line."""
    import onnx

    wrong = (f"; is it the {role}? The face models are scrfd_10g_bnkps.onnx (detector) and arcface.onnx "
             "(recognizer); give their folder, or build without the face stages (--no-face)")
    if len(model.graph.input) != 1:
        names = [i.name for i in model.graph.input]
        raise ModelFormatError(f"{src}: expected one input, found {names}{wrong}")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ModelFormatError(f"{src}: input has {len(dims)} dims, expected {len(shape)} ({shape}){wrong}")
    given = [x.dim_value or x.dim_param for x in dims]      # before any is pinned
    for d, want in zip(dims, shape):
        if want == "B":
            d.dim_param = "B"
        elif d.HasField("dim_value") and d.dim_value not in (0, want):
            raise ModelFormatError(f"{src}: input dims {given} cannot take {shape}{wrong}")
        else:
            d.dim_value = want
    for out in model.graph.output:      # output dims follow from the input: let the parser infer them
        out.type.tensor_type.ClearField("shape")
    with tempfile.NamedTemporaryFile(dir=dst.parent, prefix=temp_prefix(dst.name), suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        os.chmod(tmp, usual_mode())             # NamedTemporaryFile makes it private; this becomes dst
        onnx.save(model, str(tmp))
        try:
            io = _parsed_io(tmp, batch_dynamic="B" in shape)
        except EngineMismatchError:        # its advice (re-export) and file (the temporary copy) do not fit here
            raise ModelFormatError(f"{src}: TensorRT's ONNX parser cannot read it (its errors are logged above); "
                                   f"{_REDOWNLOAD}") from None
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return io


def _parsed_io(path: Path, batch_dynamic: bool) -> dict:
    trt = import_trt()
    _b, network, _p, _l = parse_onnx(trt, path)
    io = network_io(network)
    for kind in ("inputs", "outputs"):
        for rec in io[kind]:
            if batch_dynamic and rec[2] and rec[2][0] == -1:
                rec[2][0] = "B"
            if -1 in rec[2]:
                raise ModelFormatError(f"{path}: {kind[:-1]} {rec[0]} keeps a dynamic axis {rec[2]} after pinning the input")
    return io


def find_face_models(models_dir: str | Path | None, detector: str | Path | None = None,
                     recognizer: str | Path | None = None, explicit: bool = False) -> dict[str, Path]:
    """{stage name: source file} of the face models found (explicit paths, else in `models_dir`).

    A folder the user named on purpose (`explicit`, e.g. --face-models) must exist and hold at least
    one of them; a folder that is only the default (--model-dir) may hold none."""
    from arc2face_rt.face.models import DETECTOR_FILE, RECOGNIZER_FILE, resolve_model

    if explicit and models_dir is not None and not Path(models_dir).is_dir():
        raise MissingWeightsError(f"--face-models {models_dir}: no such folder; name the folder holding "
                                  "scrfd_10g_bnkps.onnx / arcface.onnx, or pass --no-face")
    found = {}
    for name, (role, _shape, _batch) in FACE_STAGES.items():
        path = detector if role == "detector" else recognizer
        if path is None and models_dir is None:
            continue
        try:
            src = resolve_model(role, path, models_dir)
        except MissingWeightsError as e:
            log.info("%s: no TensorRT stage (%s)", name, e)
            continue
        if not src.is_file():
            raise MissingWeightsError(f"{src}: {role} not found")
        found[name] = src
    if explicit and not found:
        raise MissingWeightsError(f"--face-models {models_dir}: holds neither face model ({DETECTOR_FILE} or "
                                  f"det_10g.onnx, {RECOGNIZER_FILE}); name the folder that holds them, or pass --no-face")
    return found


def add_face_stages(engines_dir: str | Path, models_dir: str | Path | None = None, detector: str | Path | None = None,
                    recognizer: str | Path | None = None, force: bool = False, explicit: bool = False) -> list[str]:
    """Copy the face models found (`find_face_models`) into the engines folder as `detector.onnx` /
    `arcface.onnx`; return the names added or kept. A model that cannot be found is skipped with a
    log line (unless `explicit`); one whose source sha256 is unchanged is kept as it is. Every model
    to copy is read before any is written, so a damaged one (MissingWeightsError) leaves the folder as it was."""
    engines_dir = Path(engines_dir)
    sources = find_face_models(models_dir, detector, recognizer, explicit)
    m = mf.load_manifest(engines_dir)
    face = m.setdefault("face_stages", {})
    todo = {}
    for name, src in sources.items():         # read every model to copy before writing any
        src_sha = mf.sha256_file(src)
        old = face.get(name)
        dst = engines_dir / f"{name}.onnx"
        if force or not (old and old.get("source_sha256") == src_sha and dst.is_file()):
            refuse_folders_at([dst])
            todo[name] = (src_sha, _load_model(src, FACE_STAGES[name][0]))
    for name, (src_sha, model) in todo.items():
        src = sources[name]
        _role, shape, batch = FACE_STAGES[name]
        dst = engines_dir / f"{name}.onnx"
        log.info("%s: %s -> %s (input pinned to %s)", name, src, dst.name, list(shape))
        io = _pin_input(model, src, dst, shape, f"face {_role}")
        rec = {"files": {dst.name: mf.file_record(dst)}, "source": str(src), "source_sha256": src_sha,
               "io": io, "batch_range": list(batch)}
        if name == "arcface":
            rec["graph_normalises"] = graph_normalises(first_nodes(src, _HEAD_NODES))
        face[name] = rec
        mf.write_json_atomic(engines_dir / mf.MANIFEST, m)
    return list(sources)


def face_stage_specs(manifest: dict) -> dict[str, StageSpec]:
    """StageSpecs for the face stages a manifest records (their I/O is the released graphs')."""
    def tensors(recs):
        return tuple(TensorSpec(n, dt, tuple(shape)) for n, dt, shape in recs)
    return {name: StageSpec(name, tensors(r["io"]["inputs"]), tensors(r["io"]["outputs"]), tolerance={},
                            batch_range=tuple(r["batch_range"]))
            for name, r in manifest.get("face_stages", {}).items()}

