"""TensorRT plans from an engines folder's ONNX graphs (the library behind `arc2face-export build-engines`,
whose command line is build_cli.py).

One code path for full TensorRT (`tensorrt`, 10.x/11.x) and TensorRT-RTX (`tensorrt_rtx`), written
against the API both share. Both are built *strongly typed*: precision comes from the ONNX types (an
fp16 graph gives an fp16 engine, Q/DQ nodes give int8 or FP8), so there are no precision builder flags.

Each stage's `<stage>.onnx` becomes `<stage>.plan` in the same folder, with static shapes except the
batch axis and one optimisation profile (min, opt, max batch). A plan is rebuilt only when its cache
key changes: sha256 of the ONNX files (from the manifest's file records) + build config + library
name and version + target compute capabilities; everything that went into the key is recorded in
manifest["plans"][stage], which the runtime checks before it loads a plan.

Target compute capability:
  * full TensorRT builds for the GPU it runs on (its plans are device specific): a GPU is required;
  * TensorRT-RTX builds ahead of time without a GPU. "auto" picks the GPU present, else the explicit
    portable set 8.0, 8.6, 8.9, 12.0 (RTX's documented default, written out so the manifest says what
    the plan runs on); `--compute-capability 7.5` (Turing is never in the portable set), `8.9,12.0`
    or `current` choose otherwise. A GPU TensorRT-RTX cannot target (Hopper 9.0, Jetson Orin 8.7) is
    refused for "auto"/"current": it needs full TensorRT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from arc2face_rt import exits
from arc2face_rt import manifest as mf
from arc2face_rt import specs
from arc2face_rt.atomic import atomic_write, remove_stale_temps
from arc2face_rt.backends import cuda
from arc2face_rt.backends.trt.plan import is_rtx, library_info, rtx_compute_capabilities, unsupported_gpu_reason
from arc2face_rt.errors import BackendUnavailableError, BuildFailedError, EngineMismatchError, InvalidInputError

from .engines_folder import refuse_folders_at
from .face_plans import face_stage_specs
from .trt_network import check_network_against_spec, import_trt, network_io, parse_onnx, progress_monitor

log = logging.getLogger(__name__)

PLAN_FORMAT = 1                       # bump when the plan record layout or the build recipe changes
PORTABLE_RTX_CCS = ("8.0", "8.6", "8.9", "12.0")
FP8_MIN_CC = (8, 9)
# TensorRT reserves activation memory for a profile's largest batch: beyond this no GPU holds the step
# graphs (and TensorRT-RTX builds, with only a warning, plans whose profile it cannot serve).
MAX_BATCH = 256
MAX_WORKSPACE_MIB = 1 << 24           # 16 TiB: more than any GPU's memory
TIMING_CACHE = "timing.cache"         # full TensorRT only; TensorRT-RTX's timing cache is a no-op


@dataclass(frozen=True)
class BuildOptions:
    """How plans are built. Each field is one `build-engines` flag."""
    batch: tuple[int, int, int] | None = None    # (min, opt, max); None: each spec's batch_range
    opt_batch: int | None = None                 # opt of the per-image stages; None: --batch's, else DEFAULT_BATCH
    opt_level: int = 3                           # builder optimisation level 0..5 (TensorRT default 3)
    compute_capability: str = "auto"             # "auto" | "current" | "8.6,8.9" (TensorRT-RTX only)
    timing_cache: bool = True                    # keep <out>/timing.cache (full TensorRT only)
    workspace_mib: int | None = None             # workspace pool limit; None: the library's default
    detailed_profile: bool = False               # layer precisions in the engine inspector (benchmarks)


def parse_batch(text: str) -> tuple[int, int, int]:
    """'8' -> (1, 8, 8); '1,4' -> (1, 4, 4); '1,4,8' -> (1, 4, 8): min, opt, max of the batch axis."""
    try:
        vals = [int(v) for v in text.split(",")]      # an empty field ('1,,4') is an error, not skipped
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = [1, vals[0], vals[0]]
    elif len(vals) == 2:
        vals = [vals[0], vals[1], vals[1]]
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2] <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"wants MAX, MIN,OPT or MIN,OPT,MAX with 1 <= min <= opt <= max <= "
                                         f"{MAX_BATCH}, got {text!r}")
    return tuple(vals)


def parse_compute_capability(text: str) -> str:
    """'auto', 'current', or a comma-separated list of compute capabilities such as '8.9,12.0'."""
    value = text.strip().lower()
    if value in ("auto", "current"):
        return value
    ccs = [c.strip() for c in value.split(",") if c.strip()]
    if not ccs or not all(re.fullmatch(r"\d{1,2}\.\d", c) for c in ccs):
        raise argparse.ArgumentTypeError(f"wants auto, current or compute capabilities such as 8.9 or 8.6,12.0; "
                                         f"got {text!r}")
    return ",".join(ccs)


# ----------------------------------------------------------------------------- compute capability

def resolve_compute_capabilities(trt, requested: str = "auto", precision: str | None = None) -> tuple[str, ...]:
    """The compute capabilities ('8.9', ...) a build targets; see the module docstring. FP8 plans
    need compute capability >= 8.9 (Ada, Hopper, Blackwell): "auto" without a GPU then targets the
    portable set's FP8-capable members, and any older target is refused."""
    ccs = _resolve_ccs(trt, requested)
    if precision == "fp8":
        if requested.strip().lower() == "auto" and cuda.device_count() == 0:
            ccs = tuple(c for c in ccs if _cc_tuple(c) >= FP8_MIN_CC)
        old = [c for c in ccs if _cc_tuple(c) < FP8_MIN_CC]
        if old:
            err = BackendUnavailableError if requested.strip().lower() in ("auto", "current") else InvalidInputError
            raise err(f"--precision fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell), and the "
                      f"target is {', '.join(old)}; use --precision int8 or fp16, or target e.g. "
                      "--compute-capability 8.9,12.0")
    return ccs


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _resolve_ccs(trt, requested: str) -> tuple[str, ...]:
    requested = requested.strip().lower()
    have_gpu = cuda.device_count() > 0
    if not is_rtx(trt):
        if not have_gpu:
            raise BackendUnavailableError(
                f"{trt.__name__} {trt.__version__} builds plans for the GPU it runs on and there is none here; "
                "build on the target GPU, or install tensorrt-rtx, which builds without one")
        cc = cuda.compute_capability()
        if requested not in ("auto", "current", cc):
            raise InvalidInputError(f"--compute-capability {requested}: {trt.__name__} builds only for the GPU it "
                                    f"runs on ({cc}); pass --compute-capability auto, or build on the target GPU "
                                    "(or with tensorrt-rtx, which builds for others)")
        return (cc,)
    if requested in ("auto", "current"):
        if not have_gpu:
            if requested == "auto":
                return PORTABLE_RTX_CCS
            raise BackendUnavailableError("--compute-capability current needs a GPU; name one, e.g. 8.9")
        reason = unsupported_gpu_reason(trt, cuda.compute_capability(), cuda.device_name())
        if reason:
            raise BackendUnavailableError(f"{reason}. To build TensorRT-RTX plans here for other GPUs, name their "
                                          f"compute capabilities, e.g. --compute-capability {','.join(PORTABLE_RTX_CCS)}")
        return (cuda.compute_capability(),)
    ccs = tuple(c.strip() for c in requested.split(",") if c.strip())
    for c in ccs:
        _rtx_cc_enum(trt, c)  # validate early
    return ccs


def _rtx_cc_enum(trt, cc: str):
    if cc not in rtx_compute_capabilities(trt):
        raise InvalidInputError(f"--compute-capability {cc}: {trt.__name__} {trt.__version__} cannot target it; "
                                f"choose among {', '.join(rtx_compute_capabilities(trt))}")
    return getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""))


def _apply_compute_capabilities(trt, config, ccs: tuple[str, ...]) -> None:
    if not is_rtx(trt):
        return  # full TensorRT: the current device, implicitly
    enums = [_rtx_cc_enum(trt, c) for c in ccs]
    config.num_compute_capabilities = len(enums)
    for i, e in enumerate(enums):
        if not config.set_compute_capability(e, i):
            raise BuildFailedError(f"{trt.__name__} refused compute capability {ccs[i]}; choose others with "
                                   "--compute-capability")


def stage_profile(spec, options: BuildOptions) -> tuple[tuple[int, int, int], str]:
    """(min, opt, max) of a stage's batch profile, and where its opt comes from.

    TensorRT tunes kernels for the opt batch, so for the stages that run at the generation batch
    (specs.PER_IMAGE_STAGES) it is the batch that will be served: --opt-batch, else --batch's OPT,
    else the runtime's default --batch (specs.DEFAULT_BATCH)."""
    lo, opt, hi = options.batch or spec.batch_range
    if spec.name not in specs.PER_IMAGE_STAGES:
        return (lo, opt, hi), "--batch" if options.batch else "the stage's batch range"
    if options.opt_batch is not None:
        opt, why = options.opt_batch, "--opt-batch"
    elif options.batch:
        why = "--batch"
    else:
        opt, why = specs.DEFAULT_BATCH, f"the default --batch of arc2face-rt generate ({specs.DEFAULT_BATCH})"
    if not lo <= opt <= hi:
        raise InvalidInputError(f"--opt-batch {opt} is outside the batch profile {lo}..{hi}; widen --batch")
    return (lo, opt, hi), why


def _profile_shapes(spec, batch: tuple[int, int, int]) -> dict[str, tuple]:
    return {t.name: tuple(t.concrete(b) for b in batch) for t in spec.inputs if "B" in t.shape}


# ----------------------------------------------------------------------------- cache key

def onnx_files_digest(engines_dir: Path, onnx_file: str, stage_record: dict | None) -> dict[str, str]:
    """{relpath: sha256} of an ONNX graph and its external data.

    Taken from the manifest's file records when there are some (after checking sizes: hashing a
    multi-GB UNet at every run would be slow; `build_engines` hashes them before it builds a plan from
    them), else hashed here.
    """
    files = (stage_record or {}).get("files")
    if files:
        mf.verify_files(engines_dir, files)
        return {rel: rec["sha256"] for rel, rec in sorted(files.items())}
    out = {onnx_file: mf.sha256_file(engines_dir / onnx_file)}
    for data in sorted(engines_dir.glob(onnx_file + ".data")):
        out[data.name] = mf.sha256_file(data)
    return out


def cache_key(onnx_sha: dict, build: dict, library: dict, ccs: tuple[str, ...]) -> str:
    blob = json.dumps({"plan_format": PLAN_FORMAT, "spec_revision": specs.SPEC_REVISION, "onnx": onnx_sha,
                       "build": build, "library": library, "compute_capabilities": list(ccs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- building

def build_plan(onnx_path: str | Path, plan_path: str | Path, spec, options: BuildOptions = BuildOptions(),
               precision: str = "unknown", trt=None, ccs: tuple[str, ...] | None = None,
               onnx_sha: dict | None = None, timing_cache_path: Path | None = None) -> dict:
    """Build one plan from any ONNX graph and a spec-like description (name, inputs, outputs of
    TensorSpec, batch_range). Writes `plan_path` atomically and returns its manifest record."""
    trt = trt or import_trt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    ccs = ccs or resolve_compute_capabilities(trt, options.compute_capability, precision)
    batch, opt_from = stage_profile(spec, options)
    library = library_info(trt)
    build = _build_record(batch, opt_from, options, precision, trt)
    onnx_sha = onnx_sha or {onnx_path.name: mf.sha256_file(onnx_path)}
    t0 = time.perf_counter()

    with exits.holding_stops():          # TensorRT calls the logger from C++
        builder, network, _parser, _logger = parse_onnx(trt, onnx_path)
    check_network_against_spec(network, spec, onnx_path)
    io = network_io(network)
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    _apply_compute_capabilities(trt, config, ccs)
    if options.detailed_profile:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(spec, batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache_path is not None and not is_rtx(trt):
        data = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = progress_monitor(trt)
    config.progress_monitor = monitor

    log.info("building %s from %s (%s, batch %s, opt level %d, %s %s, cc %s)", plan_path.name, onnx_path.name,
             precision, batch, options.opt_level, library["name"], library["version"], ",".join(ccs))
    with exits.holding_stops():          # ... and the logger and progress monitor here
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildFailedError(
            f"{library['name']} could not build {plan_path} (its reason is in the log above; batch profile "
            f"{batch[0]}..{batch[2]}, workspace {options.workspace_mib or 'default'} MiB): try a smaller --batch, a "
            "larger --workspace-mib or none, or another --opt-level")
    data = memoryview(serialized)
    atomic_write(plan_path, data, overwrite=True)
    if cache is not None:
        atomic_write(timing_cache_path, memoryview(cache.serialize()), overwrite=True)
    seconds = time.perf_counter() - t0
    log.info("built %s: %.1f MiB in %.1f s", plan_path.name, len(data) / 2**20, seconds)
    del config, network, builder  # release TensorRT objects before the monitor/logger they point to
    return {
        "file": plan_path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "key": cache_key(onnx_sha, build, library, ccs),
        "library": library,
        "compute_capabilities": list(ccs),
        "build": build,
        "onnx": onnx_sha,
        "io": io,
        "build_seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _build_record(batch, opt_from: str, options: BuildOptions, precision: str, trt) -> dict:
    return {"precision": precision, "strongly_typed": True, "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
            "opt_batch_from": opt_from,
            "opt_level": options.opt_level, "workspace_mib": options.workspace_mib,
            "timing_cache": bool(options.timing_cache and not is_rtx(trt)),
            **({"detailed_profile": True} if options.detailed_profile else {})}


def plan_is_current(engines_dir: Path, record: dict | None, key: str) -> bool:
    """True when the recorded plan was built with `key` and its file is intact (size and sha256) and
    one the runtime loads: a symbolic link out of the folder is not (the build replaces the link)."""
    if not record or record.get("key") != key:
        return False
    try:
        p = mf.resolve_inside(engines_dir, record["file"])
    except EngineMismatchError as e:
        log.info("%s; rebuilding it in the folder", str(e).split("; ")[0])
        return False
    return p.is_file() and p.stat().st_size == record["bytes"] and mf.sha256_file(p) == record["sha256"]


def _stage_source(engines_dir: Path, m: dict, spec, precision: str | None) -> tuple[str, str, dict, dict]:
    """(ONNX file, precision, its record, {file: sha256}) that a stage's plan is built from: the Q/DQ
    graph for --precision int8/fp8 where there is one, else the stage's graph (sizes checked)."""
    name, face = spec.name, m.get("face_stages", {})
    onnx_file, record = spec.onnx_file, {**m.get("stages", {}), **face}.get(spec.name)
    stage_precision = "fp32" if name in face else m.get("precision", "unknown")   # the released face graphs: fp32
    quant = m.get(mf.QUANT_SECTIONS.get(precision, ""), {}).get(name)
    if quant:
        onnx_file, stage_precision, record = quant["file"], precision, quant
    if not (engines_dir / onnx_file).is_file():
        what = f"{engines_dir / onnx_file}: {'not a file' if (engines_dir / onnx_file).exists() else 'missing'}"
        if name in face and not quant:                         # `onnx` writes no face stage: copy it again
            again = f"--precision {precision or m.get('precision')}"      # else fp16, not the folder's
            raise EngineMismatchError(f"{what}; copy the face model in again: `arc2face-export build-engines "
                                      f"--out {shlex.quote(str(engines_dir))} {again} --face-models DIR`")
        raise mf.refused(engines_dir, what)
    return onnx_file, stage_precision, record, onnx_files_digest(engines_dir, onnx_file, record)


def build_engines(engines_dir: str | Path, stages: list[str] | None = None, precision: str | None = None,
                  options: BuildOptions = BuildOptions(), force: bool = False, stage_specs: dict | None = None) -> dict:
    """Build (or keep) `<stage>.plan` for each stage of an engines folder; return the updated manifest.

    Plans take the precision of the folder's ONNX graphs (strongly typed); `precision` only matters
    as "int8" or "fp8", which build the step stages from their Q/DQ graphs `<stage>.<precision>.onnx`
    (written by `arc2face_export.quantize.quantize_stage`) and every other stage from the folder's
    fp16/fp32 ONNX.
    """
    engines_dir = Path(engines_dir)
    trt = import_trt()
    m = mf.load_manifest(engines_dir)
    remove_stale_temps(engines_dir)          # what a killed build left behind
    stage_specs = stage_specs or {**specs.ALL_STAGES, **face_stage_specs(m)}
    recorded = {**m.get("stages", {}), **m.get("face_stages", {})}
    names = stages or [s for s in recorded if s in stage_specs]
    absent = [s for s in names if s not in stage_specs or s not in recorded]
    if absent:
        raise InvalidInputError(f"stage(s) {', '.join(absent)} not in {engines_dir} (it has: "
                                f"{', '.join(s for s in recorded if s in stage_specs)}); leave them out of --stages")
    ccs = resolve_compute_capabilities(trt, options.compute_capability, precision)
    library = library_info(trt)
    plans = m.setdefault("plans", {})
    tc_path = engines_dir / TIMING_CACHE if options.timing_cache else None
    refuse_folders_at([engines_dir / stage_specs[n].plan_file for n in names]
                     + ([tc_path] if tc_path and not is_rtx(trt) else []))
    sources = {n: _stage_source(engines_dir, m, stage_specs[n], precision) for n in names}   # all, before a build
    for name in names:
        spec = stage_specs[name]
        onnx_file, stage_precision, record, onnx_sha = sources[name]
        batch, opt_from = stage_profile(spec, options)
        key = cache_key(onnx_sha, _build_record(batch, opt_from, options, stage_precision, trt), library, ccs)
        if not force and plan_is_current(engines_dir, plans.get(name), key):
            log.info("%s: up to date (key %s), skipped", spec.plan_file, key[:12])
            continue
        if record and record.get("files"):   # a build reads every byte: a changed one must not slip in
            mf.verify_files(engines_dir, record["files"], hashes=True)
        rec = build_plan(engines_dir / onnx_file, engines_dir / spec.plan_file, spec, options, stage_precision,
                         trt=trt, ccs=ccs, onnx_sha=onnx_sha, timing_cache_path=tc_path)
        assert rec["key"] == key
        plans[name] = rec
        mf.write_json_atomic(engines_dir / mf.MANIFEST, m)
    return m
