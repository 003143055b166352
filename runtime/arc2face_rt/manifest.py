"""engines/<name>/manifest.json: what was built, from what, with which libraries, and how well it validated.

Layout (format 1):
    {
      "format": "arc2face-rt-engines", "format_version": 1, "spec_revision": 1,
      "precision": "fp32" | "fp16", "opset": 18, "created": ISO-8601,
      "source": {"model_dir": str, "files": {...}, "random_weights": bool},
      "libraries": {"torch": ..., "diffusers": ..., "onnx": ..., "onnxruntime": ...},
      "scheduler_config": {...},
      "stages": {name: {"file": "step_cfg.onnx", "files": {relpath: {"sha256": hex, "bytes": n}},
                        "inputs": [[name, dtype, shape], ...], "outputs": [...],
                        "validation": {"metric": str, "value": float, "tolerance": float}}},
      "face_stages": {"detector" | "arcface": {"files": {...}, "io": {...}, "batch_range": [lo, opt, hi], ...}},
      "quantized": {"step_cfg" | "step": {"file": ..., "files": {...}, ...}},   # int8 Q/DQ graphs
      "quantized_fp8": {"step_cfg" | "step": {...}},                            # FP8 Q/DQ graphs, same layout
      "openvino_int8": {"step_cfg" | "step": {"file": ..., "files": {...}, "source": {...}, ...}},  # NNCF IR
      "ort_cuda": {"step_cfg" | "step" | "vae_decoder": {"file": ..., "files": {...}, "fused": {...}, ...}},
                                                     # fp16 graphs with ONNX Runtime's CUDA fusions (onnx --ort-cuda)
      "ort_cuda_skipped": {stage: {"recipe": n, "reason": str, "onnxruntime": version}},  # fused graphs left out
      "plans": {name: {"file", "sha256", "bytes", "library", "build", ...}},    # TensorRT (build-engines)
      "lora": {"file": name, "sha256": hex, "bytes": n, "scale": float}         # a LoRA fused before export
    }
Stage names: the base stages, and `step_cfg_control`/`step_control` in folders exported from a model
with controlnet/ (specs.ALL_STAGES).
`load_manifest` checks this structure before anything reads it (`check_manifest`): types, known
stages and precisions, a size and sha256 per file, the `file` each record loads (a face stage: its
one file), the `io` rows ([name, dtype, shape]) of face stages and plans, and paths that stay inside
the folder. File content is checked against the recorded hashes by `integrity.verify_records`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import stat
from pathlib import Path

from .atomic import atomic_write
from .errors import EngineMismatchError
from .exits import os_error_reason
from .fileio import loads_json, read_regular_file
from .specs import ALL_STAGES, CONTROL_STAGES, PRECISIONS, SPEC_REVISION, STEP, STEP_CFG, VAE_DECODER

MANIFEST = "manifest.json"
FORMAT = "arc2face-rt-engines"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20
PLAN_PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# The Q/DQ step graphs of each quantised plan precision (arc2face_export.quantize).
QUANT_SECTIONS = {"int8": "quantized", "fp8": "quantized_fp8"}
FACE_STAGES = ("detector", "arcface")
# Manifest sections whose records name files, and the stage names each may hold.
FILE_SECTIONS = {
    "stages": tuple(ALL_STAGES),
    "face_stages": FACE_STAGES,
    "plans": tuple(ALL_STAGES) + FACE_STAGES,
    "quantized": (STEP_CFG.name, STEP.name),
    "quantized_fp8": (STEP_CFG.name, STEP.name),
    "openvino_int8": (STEP_CFG.name, STEP.name),
    "ort_cuda": (STEP_CFG.name, STEP.name, VAE_DECODER.name),
}


def reexport_advice(engines_dir: str | Path, controlnet: bool = False, precision: str | None = None,
                    then: str | None = None) -> str:
    """How to write an engines folder again: the whole `arc2face-export onnx` command, with the options
    its manifest records (precision, or `precision` where another is needed; a fused LoRA and its scale,
    --ort-cuda graphs; a model folder with controlnet/ for the ControlNet graphs, or when `controlnet`
    asks for them), then what makes again what the manifest records beyond the graphs, or `then`. The manifest is read
    best-effort (this is advice for a folder that failed a check): from a damaged one, the command
    says which options to repeat. Paths are shell-quoted, so the command runs as written."""
    d = shlex.quote(str(engines_dir))
    m = read_best_effort(engines_dir)
    if m is None:                     # missing, unreadable, not JSON: the generic command
        return (f"re-export the folder (`arc2face-export onnx --model-dir MODEL --out {d} --force`, with the "
                f"--precision and --lora options of its first export{', MODEL with controlnet/' if controlnet else ''}"
                "; then build-engines if you use plans)")
    model = (m.get("source") or {}).get("model_dir") if isinstance(m.get("source"), dict) else None
    model = shlex.quote(model) if isinstance(model, str) and os.path.isdir(model) else "MODEL"
    opts, notes = "", []
    precision = precision or m.get("precision")
    if precision in PRECISIONS and precision != "fp32":
        opts += f" --precision {precision}"
    if _lora_ok(m.get("lora")):
        opts += f" --lora LORA --lora-scale {m['lora']['scale']:g}"
        notes.append(f"LORA: the LoRA it fused, {m['lora']['file']} (sha256 {m['lora']['sha256'][:12]}...)")
    if precision == "fp16" and any(isinstance(m.get(k), dict) and m[k] for k in ("ort_cuda", "ort_cuda_skipped")):
        opts += " --ort-cuda"
    if controlnet or any(isinstance(m.get(k), dict) and any(n in m[k] for n in CONTROL_STAGES)
                         for k in ("stages", "plans")):
        notes.append(f"{model}: the model folder with its controlnet/")
    note = "; " + ", ".join(notes) if notes else ""
    return f"re-export the folder (`arc2face-export onnx --model-dir {model} --out {d}{opts} --force`{note}; " \
           f"then {then or _rebuild_after(m, d)})"


def read_best_effort(engines_dir: str | Path) -> dict | None:
    """The folder's manifest as JSON, unchecked, or None: for advice about a folder that failed a check."""
    try:
        m = loads_json(read_regular_file(Path(engines_dir) / MANIFEST, MAX_MANIFEST_BYTES))
    except Exception:
        return None
    return m if isinstance(m, dict) else None


def built_precision(m: dict, default: str | None = None) -> str | None:
    """The --precision the folder's plans were built with, read best-effort: the quantised one (int8,
    fp8) of its step plans wins over the fp16 its projector and decoder plans record (rebuilding at
    fp16 would make the step plans unquantised); `default` when no plan records one."""
    plans = m.get("plans") if isinstance(m.get("plans"), dict) else {}
    built = [(r.get("build") or {}).get("precision") for r in plans.values()
             if isinstance(r, dict) and isinstance(r.get("build"), dict)]
    return next((p for p in QUANT_SECTIONS if p in built), default)


def _rebuild_after(m: dict, d: str) -> str:
    """The commands that make again what a re-export replaces and the manifest records: its plans (at
    the precision they were built; the face plans from the folder their models came from) and the
    OpenVINO int8 graphs. Read best-effort, like `reexport_advice`."""
    plans = m.get("plans") if isinstance(m.get("plans"), dict) else {}
    steps = []
    if plans:
        prec = built_precision(m, m.get("precision"))
        opts = f" --precision {prec}" if prec in PRECISIONS + tuple(QUANT_SECTIONS) and prec != "fp16" else ""
        if any(n in plans for n in FACE_STAGES):
            face = m.get("face_stages") if isinstance(m.get("face_stages"), dict) else {}
            dirs = {os.path.dirname(r["source"]).removesuffix("/antelopev2") for r in face.values()
                    if isinstance(r, dict) and isinstance(r.get("source"), str)}
            folder = next(iter(dirs)) if len(dirs) == 1 else ""
            opts += f" --face-models {shlex.quote(folder) if folder and os.path.isdir(folder) else 'DIR'}"
        steps.append(f"`arc2face-export build-engines --out {d}{opts}`")
    if isinstance(m.get("openvino_int8"), dict) and m["openvino_int8"]:
        steps.append(f"`arc2face-export openvino-int8 --engines {d}`")
    return " and ".join(steps) or "build-engines if you use plans"


def refused(engines_dir: str | Path, what: str) -> EngineMismatchError:
    """The error for an engines folder that failed a check: `what`, then the command that writes it
    again (`reexport_advice`)."""
    return EngineMismatchError(f"{what}; {reexport_advice(engines_dir)}")


def ov_int8_advice(engines_dir: str | Path) -> str:
    """How to write a folder's OpenVINO int8 step graphs (section "openvino_int8") again: their own
    command, not a re-export of the folder."""
    d = shlex.quote(str(engines_dir))
    return f"write the int8 step graphs again with `arc2face-export openvino-int8 --engines {d} --force`"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Replace `path` with `data` as JSON; readers never see half a file."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(path, text, overwrite=True)


def load_manifest(engines_dir: str | Path) -> dict:
    """Read an engines folder's manifest and check its schema; raise EngineMismatchError naming the fix."""
    engines_dir = Path(engines_dir)
    path = engines_dir / MANIFEST
    write = f"`arc2face-export onnx --model-dir MODEL --out {engines_dir}`"
    try:
        st = os.stat(engines_dir)
    except FileNotFoundError:
        raise EngineMismatchError(f"{engines_dir}: no such engines folder; write one with {write}") from None
    except (OSError, ValueError) as e:   # unreadable parent, a file as a parent, a NUL byte in the name
        raise EngineMismatchError(f"{engines_dir}: cannot open the engines folder: {os_error_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "a special file"
        raise EngineMismatchError(f"{engines_dir}: is {kind}, not an engines folder (a folder holding {MANIFEST} and "
                                  f"the graphs); give the folder, or write one with {write}")
    try:
        os.lstat(path)
    except FileNotFoundError:
        if any(os.path.isfile(engines_dir / sub / "config.json") for sub in ("arc2face", "unet")):
            raise EngineMismatchError(f"{engines_dir}: is a model folder (weights), not an engines folder; export it "
                                      f"with `arc2face-export onnx --model-dir {engines_dir} --out ENGINES` and pass "
                                      "--engines ENGINES") from None
        if os.path.isfile(engines_dir / "dataset.json"):
            raise EngineMismatchError(f"{engines_dir}: is a dataset that `arc2face-rt dataset` made, not an engines "
                                      "folder; pass the engines folder it was made with") from None
        raise EngineMismatchError(f"{engines_dir}: no {MANIFEST}; write this folder with {write}") from None
    except OSError as e:                 # a folder we may not search: say so, not that it lacks a manifest
        raise EngineMismatchError(f"{engines_dir}: cannot read the engines folder: "
                                  f"{os_error_reason(e)}") from None
    try:
        raw = read_regular_file(path, MAX_MANIFEST_BYTES, what="manifest", error=EngineMismatchError)
    except EngineMismatchError as e:
        raise refused(engines_dir, str(e)) from None
    try:
        m = loads_json(raw)
    except ValueError as e:
        raise refused(engines_dir, f"{path}: unreadable manifest ({' '.join(str(e).split())})") from None
    check_manifest(m, engines_dir)
    return m


def check_manifest(m, engines_dir: str | Path) -> None:
    """Refuse a manifest whose structure this version cannot trust: wrong types, missing keys, unknown
    stages or precisions, or a file path that leaves the engines folder."""
    engines_dir = Path(engines_dir)
    where = engines_dir / MANIFEST
    if not isinstance(m, dict):
        raise refused(engines_dir, f"{where}: holds {_kind(m)}, not an engines manifest")
    if m.get("format") != FORMAT:
        raise EngineMismatchError(f"{where}: not an arc2face-rt engines manifest (format {m.get('format')!r})")
    version = m.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION or version < 1:
        raise refused(engines_dir, f"{where}: format_version {version!r}; this arc2face-rt reads version "
                      f"{FORMAT_VERSION}")
    rev = m.get("spec_revision")
    if not _is_int(rev):
        raise refused(engines_dir, f"{where}: spec_revision is {rev!r}, not a whole number")
    if rev != SPEC_REVISION:
        raise EngineMismatchError(
            f"{engines_dir}: written for spec revision {rev}, this arc2face-rt reads revision {SPEC_REVISION}; "
            f"re-export with `arc2face-export onnx --model-dir MODEL --out {engines_dir} --force`")
    if m.get("precision") not in PRECISIONS:
        raise refused(engines_dir, f"{where}: precision {m.get('precision')!r} is not one of "
                      f"{', '.join(PRECISIONS)}")
    for key in ("source", "libraries", "scheduler_config"):
        if key in m and not isinstance(m[key], dict):
            raise refused(engines_dir, f"{where}: '{key}' is {_kind(m[key])}, expected an object")
    for section, known in FILE_SECTIONS.items():
        recs = m.get(section, {})
        if not isinstance(recs, dict):
            raise refused(engines_dir, f"{where}: '{section}' is {_kind(recs)}, expected an object")
        for name, rec in recs.items():
            if name not in known:
                raise refused(engines_dir, f"{where}: unknown entry '{name}' in '{section}' "
                              f"(known: {', '.join(known)})")
            problem = _record_problem(rec, section, engines_dir)
            if problem:
                raise refused(engines_dir, f"{where}: {section}.{name}: {problem}")
    if "lora" in m and not _lora_ok(m["lora"]):
        raise refused(engines_dir, f"{where}: 'lora' is not {{file, sha256, bytes, scale}}")


def _lora_ok(rec) -> bool:
    """A fused LoRA's record: where the weights came from (not a file of the folder)."""
    return (isinstance(rec, dict) and isinstance(rec.get("file"), str) and _is_finite(rec.get("scale"))
            and _is_int(rec.get("bytes")) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64)


def _record_problem(rec, section: str, engines_dir: Path) -> str | None:
    if not isinstance(rec, dict):
        return f"is {_kind(rec)}, expected an object"
    if section != "face_stages" and "file" not in rec:       # every reader of these records loads rec["file"]
        return "names no 'file' to load"
    if not isinstance(rec.get("file", ""), str):
        return f"'file' is {rec.get('file')!r}, not a file name"
    if section == "face_stages" and "io" not in rec:
        return "lacks its 'io' record (the graph's inputs and outputs)"
    if "io" in rec:                 # face_stages: the stage spec the plan is built to; plans: checked on load
        problem = _io_problem(rec["io"])
        if problem:
            return f"'io' {problem}"
    if section == "plans":
        files = {rec.get("file"): rec}
        if not isinstance(rec.get("library"), dict) or not isinstance(rec.get("build"), dict):
            return "lacks its 'library' or 'build' record"
        if rec["build"].get("precision") not in PLAN_PRECISIONS:
            return f"build precision {rec['build'].get('precision')!r} is not one of {', '.join(PLAN_PRECISIONS)}"
        if not isinstance(rec.get("compute_capabilities", []), list):
            return "compute_capabilities is not a list"
    else:
        files = rec.get("files")
        if not isinstance(files, dict) or not files:
            return "lacks its 'files' record"
    val = rec.get("validation")
    if val is not None and not (isinstance(val, dict) and all(_is_finite(val.get(k)) for k in ("value", "tolerance"))):
        return "validation record is not {metric, value, tolerance} with finite numbers"
    if section == "face_stages":
        br = rec.get("batch_range")
        if not (isinstance(br, list) and len(br) == 3 and all(_is_int(b) and b >= 1 for b in br)):
            return f"batch_range {br!r} is not three whole numbers >= 1"
        if "graph_normalises" in rec and not isinstance(rec["graph_normalises"], bool):
            return "graph_normalises is not true/false"
    for rel, frec in files.items():
        if not isinstance(rel, str):
            return f"file name {rel!r} is not a string"
        problem = _path_problem(engines_dir, rel)
        if problem:
            return f"{rel!r}: {problem}"
        if not isinstance(frec, dict) or not _is_int(frec.get("bytes")) or frec["bytes"] < 0:
            return f"{rel!r}: 'bytes' is {frec.get('bytes') if isinstance(frec, dict) else frec!r}, not a size"
        sha = frec.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            return f"{rel!r}: 'sha256' is {sha!r}, not a sha256 hex digest"
    if section != "plans":
        if "file" in rec and rec["file"] not in files:
            return f"loads {rec['file']!r}, which is not among its checked files {sorted(files)}"
        if "file" not in rec and len(files) != 1:
            return "names no 'file' to load among several files"
    return None


def _io_problem(io) -> str | None:
    """Why `io` is not {"inputs": [[name, dtype, shape], ...], "outputs": [...]} with each shape a
    list of sizes and "B" (the batch axis), as `face_stages` and `plans` record a graph's tensors."""
    if not isinstance(io, dict):
        return f"is {_kind(io)}, expected {{inputs, outputs}}"
    for kind in ("inputs", "outputs"):
        rows = io.get(kind)
        if not isinstance(rows, list) or not rows:
            what = "missing" if rows is None and kind not in io else "empty" if rows == [] else _kind(rows)
            return f"{kind} is {what}, expected a list of [name, dtype, shape]"
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                    and isinstance(row[2], list)
                    and all(d == "B" or (_is_int(d) and d >= 0) for d in row[2])):
                return f"{kind} row {row!r:.80} is not [name, dtype, shape] (shape: sizes and \"B\")"
    return None


def _path_problem(engines_dir: Path, rel: str) -> str | None:
    """Why `rel` may not be read as a file of the engines folder (None when it may)."""
    pure = Path(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or "\x00" in rel:
        return "not a plain relative path inside the engines folder"
    if pure.name in (MANIFEST, ""):
        return "not a file of its own"
    return None


def stage_file(rec: dict) -> str:
    """The file a (validated) record's backend loads: `file`, or the only file of a face stage."""
    return rec["file"] if "file" in rec else next(iter(rec["files"]))


def resolve_inside(engines_dir: str | Path, rel: str) -> Path:
    """`engines_dir / rel`, refusing a path that leaves the folder once symbolic links are resolved."""
    engines_dir = Path(engines_dir)
    p = engines_dir / rel
    root = engines_dir.resolve()
    try:
        real = p.resolve()
    except (OSError, RuntimeError) as e:     # a symlink loop
        raise refused(engines_dir, f"{p}: cannot be resolved ({e})") from None
    if real != root and root not in real.parents:
        raise EngineMismatchError(f"{p}: points outside the engines folder (to {real}); copy the file into "
                                  f"{engines_dir} or {reexport_advice(engines_dir)}")
    return p


def record_files(rec: dict) -> dict:
    """{relative path: {"sha256", "bytes"}} of a stage record (several files) or a plan record (one)."""
    return rec["files"] if "files" in rec else {rec["file"]: rec}


def verify_files(engines_dir: str | Path, records: dict, hashes: bool = False) -> None:
    """Check each recorded file: inside the folder, present, its size, and its sha256 when `hashes`
    (hashing everything; `integrity.verify_records` is the general form, with stamps)."""
    from .integrity import verify_records

    verify_records(engines_dir, records, mode="full" if hashes else "size")


def _is_finite(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    except OverflowError:
        return False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "true/false"}.get(
        type(v), "a number")
