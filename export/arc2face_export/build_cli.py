"""`arc2face-export build-engines`: export the ONNX graphs when the folder lacks them, add the face
stages, quantise for int8 / fp8, then build the TensorRT plans (`trt_build.build_engines`)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from arc2face_rt import argtypes
from arc2face_rt import manifest as mf
from arc2face_rt import specs
from arc2face_rt.errors import BackendUnavailableError, EngineMismatchError, InvalidInputError
from arc2face_rt.folder_setup import folder_defaults
from arc2face_rt.outputs import check_output_dir
from arc2face_rt.schedulers import make_schedule

from .engines_folder import refuse_folders_at, writing
from .face_plans import FACE_STAGES, add_face_stages, find_face_models
from .trt_build import (MAX_BATCH, MAX_WORKSPACE_MIB, TIMING_CACHE, BuildOptions, build_engines, import_trt,
                        is_rtx, parse_batch, parse_compute_capability, resolve_compute_capabilities,
                        stage_profile)

log = logging.getLogger("arc2face_export.trt_build")


# The quantisation flags (int8/fp8 only) and the defaults of those that have one; None in the parser, so
# that one given with --precision fp16/fp32 is refused instead of ignored.
# (--calib-steps' default is the folder's: 25, or 4 where an LCM-LoRA is fused.)
QUANT_DEFAULTS = {"calib_identities": 8, "calib_percentile": 99.99, "quant_level": 3.0}
QUANT_FLAGS = ("calib_data", "calib_identities", "calib_steps", "calib_method", "calib_percentile", "smoothquant_alpha",
               "residual_qdq", "quant_level")                                         # in --help's order


def _onnx_precision(precision: str) -> str:
    return "fp32" if precision == "fp32" else "fp16"   # int8 and fp8 quantise the fp16 graphs


def _exported(out: Path, onnx_precision: str) -> dict | None:
    """The manifest of the export in `out`; None when there is none yet (a damaged one, or one of another
    precision, is refused)."""
    if not os.path.lexists(out / mf.MANIFEST):
        return None
    m = mf.load_manifest(out)
    if m.get("precision") != onnx_precision:
        raise EngineMismatchError(
            f"{out}: holds {m.get('precision')} graphs, and this build needs {onnx_precision} ones; choose another "
            f"--out, or {mf.reexport_advice(out, precision=onnx_precision, then='this build-engines command again')}")
    return m


def _lacking(out: Path, m: dict, stages: list[str] | None) -> list[str]:
    """The generation stages wanted (`stages`; without, those the manifest records, or every base stage when
    it records none) whose ONNX graph the export in `out` lacks."""
    recorded = m.get("stages", {})
    names = [n for n in (stages or recorded) if n in specs.ALL_STAGES] or ([] if stages else list(specs.STAGES))
    return [n for n in names if n not in recorded or not (out / specs.ALL_STAGES[n].onnx_file).is_file()]


def _check_export(args, out: Path, m: dict | None, lacking: list[str], onnx_precision: str) -> None:
    """Refuse, before any work, an export that cannot happen: no --model-dir, an export in `out` that only
    --force may replace, or a LoRA one that build-engines would re-export without its LoRA."""
    if m is None:
        if args.model_dir is None:
            raise EngineMismatchError(f"{out} has no {onnx_precision} ONNX graphs; pass --model-dir to export them")
        return
    what = f"{out}: the {onnx_precision} ONNX graph(s) of {', '.join(lacking)} are not in this folder"
    skip = ", or leave them out of --stages" if args.stages and set(lacking) <= set(args.stages) else ""
    if m.get("lora"):
        raise EngineMismatchError(f"{what}, and build-engines would re-export it without its LoRA: "
                                  f"{mf.reexport_advice(out)}{skip}")
    if args.model_dir is None or not args.force:
        need = "--force" if args.model_dir is not None else "--model-dir MODEL --force"
        raise EngineMismatchError(f"{what}; pass {need} to re-export it (every stage){skip}")


def _other_source(model_dir: Path, m: dict) -> str:
    """Which of the model files the export in `m` was made from differ in `model_dir` (missing, other
    bytes), named; "" when none does, or the manifest records none (a hand-made folder)."""
    source = m.get("source")
    files = source.get("files") if isinstance(source, dict) else None
    if not isinstance(files, dict):             # none recorded, or a damaged record: nothing to compare
        return ""
    def same(p: Path, rec) -> bool:             # sizes first: a file of another size is never hashed
        return (isinstance(rec, dict) and p.is_file() and p.stat().st_size == rec.get("bytes")
                and mf.file_record(p) == rec)
    differ = [rel for rel, rec in sorted(files.items()) if not same(model_dir / rel, rec)]
    return ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")


def _check_source(args, out: Path, m: dict) -> bool:
    """Whether a complete export in `out` must be redone from --model-dir: it was made from other model
    files (a newer checkpoint of a run, say), whose plans would otherwise be built from the old graphs
    without a word. Without --force that is refused; a LoRA export is never redone here. The model files
    are hashed (seconds for SD1.5's 5 GB from the page cache) only where their sizes match."""
    differ = _other_source(Path(args.model_dir), m)
    if not differ:
        return False
    what = f"{out}: its graphs were exported from other model files than --model-dir {args.model_dir} ({differ} differ)"
    if m.get("lora"):
        raise EngineMismatchError(f"{what}, and build-engines would re-export it without its LoRA: "
                                  f"{mf.reexport_advice(out)}")
    if not args.force:
        raise EngineMismatchError(f"{what}; pass --force to re-export from it, or drop --model-dir to build the "
                                  "graphs there (with --face-models DIR for its face models)")
    return True


def _check_stages(args, m: dict | None, faces: dict) -> None:
    """Refuse, before any work, a --stages choice the folder will not have once exported (`m` None: it
    will be) and given its face stages."""
    if m is None:
        control = args.model_dir is None or (Path(args.model_dir) / "controlnet").is_dir()  # None: refused later
        m = {"stages": dict.fromkeys([*specs.STAGES, *(specs.CONTROL_STAGES if control else ())])}
    have = {*m.get("stages", {}), *faces, *m.get("face_stages", {})}
    why = {}
    for s in args.stages or ():
        if s in have:
            continue
        if s in specs.CONTROL_STAGES:
            why[s] = f"{args.model_dir} has no controlnet/, which the control step graphs need"
        elif args.no_face:
            why[s] = "--no-face leaves the face stages out"
        else:
            where = args.face_models or args.model_dir
            why[s] = (f"no face model for it in {where}" if where else "no --face-models or --model-dir to copy "
                      "it from") + "; pass --face-models DIR"
    if why:
        raise InvalidInputError(f"--stages: {'; '.join(f'{s}: {w}' for s, w in why.items())}; "
                                f"leave them out of --stages (the folder will have: {', '.join(sorted(have))})")


@contextlib.contextmanager
def _progress_shown():
    """Progress, build time and plan size are the point of build-engines: its loggers log INFO
    (stderr) even when the CLI's logging is at WARNING, until the command ends."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    loggers = [logging.getLogger(n) for n in (log.name, __package__ + ".quantize", __package__ + ".calib")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cmd_build_engines(args) -> int:
    with _progress_shown(), writing(args.out):
        return _build_engines(args)


def _build_engines(args) -> int:
    out = check_output_dir(args.out)
    options = BuildOptions(batch=args.batch, opt_batch=args.opt_batch, opt_level=args.opt_level,
                           compute_capability=args.compute_capability, timing_cache=not args.no_timing_cache,
                           workspace_mib=args.workspace_mib)
    # Refuse what cannot work before exporting or copying anything: the target GPUs, the batch profile
    # of every stage that runs at the served batch, the export (is one needed, may it happen), the face
    # models, the --stages the folder will not have, the calibration data.
    trt = import_trt()
    resolve_compute_capabilities(trt, args.compute_capability, args.precision)
    for name in args.stages or specs.ALL_STAGES:
        if name in specs.ALL_STAGES:
            stage_profile(specs.ALL_STAGES[name], options)
    if args.opt_batch is not None and args.stages and not set(args.stages) & set(specs.PER_IMAGE_STAGES):
        raise InvalidInputError(f"--opt-batch tunes the plans that run at the generation batch "
                                f"({', '.join(specs.PER_IMAGE_STAGES)}), and --stages builds none of them: drop it")
    quantized = args.precision in mf.QUANT_SECTIONS
    given = [f"--{k.replace('_', '-')}" for k in QUANT_FLAGS if getattr(args, k) not in (None, False)]
    if given and not quantized:
        raise InvalidInputError(f"{', '.join(given)}: quantisation options, for --precision int8 or fp8 only; "
                                f"drop them for {args.precision}")
    moot = [f for f in ("--calib-identities", "--calib-steps") if f in given]
    if args.calib_data is not None and moot:
        raise InvalidInputError(f"{', '.join(moot)}: settings of the pipeline's calibration run; --calib-data "
                                "calibrates on its recorded inputs instead: drop them")
    for k, default in QUANT_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    onnx_precision = _onnx_precision(args.precision)
    m = _exported(out, onnx_precision)
    lacking = _lacking(out, m, args.stages) if m is not None else list(specs.STAGES)
    export = m is None or bool(lacking) or (args.model_dir is not None and _check_source(args, out, m))
    faces = {} if args.no_face else find_face_models(args.face_models or args.model_dir,
                                                      explicit=args.face_models is not None)
    _check_stages(args, None if export else m, faces)
    refuse_folders_at([out / f"{n}.plan" for n in (args.stages or [*specs.ALL_STAGES, *FACE_STAGES])]
                     + ([out / TIMING_CACHE] if options.timing_cache and not is_rtx(trt) else []))
    if export:
        _check_export(args, out, m, lacking, onnx_precision)
    if quantized:
        from .quantize import QUANT_STAGES, QuantRecipe, load_calibration
        recipe = QuantRecipe(args.precision, args.calib_method, args.smoothquant_alpha, args.residual_qdq,
                             args.quant_level).resolved()
        if args.calib_data is not None:             # an export below writes every stage
            have = set(QUANT_STAGES) if export else set(m.get("stages", {}))
            load_calibration(args.calib_data, [s for s in (args.stages or QUANT_STAGES) if s in have])
        # the sampler the folder serves by default (an export here never fuses a LoRA: Arc2Face's)
        sampling = folder_defaults(m)
        if args.calib_steps is not None and args.calib_data is None:
            try:
                make_schedule(sampling["scheduler"], args.calib_steps, (m or {}).get("scheduler_config"))
            except InvalidInputError as e:
                raise InvalidInputError(f"--calib-steps {args.calib_steps}: {e}") from None
    if export:
        try:
            from .onnx_export import export_all
        except ImportError as e:
            raise BackendUnavailableError(f"ONNX export is unavailable ({e}); run `arc2face-export onnx` first") from e
        log.info("exporting %s ONNX graphs to %s first", onnx_precision, out)
        export_all(Path(args.model_dir), out, precision=onnx_precision, force=args.force)
    if not args.no_face:
        add_face_stages(out, args.face_models or args.model_dir, force=args.force,
                        explicit=args.face_models is not None)
    if quantized:
        from .calib import Calibration
        from .quantize import ensure_quant_graphs
        cal = Calibration(identities=args.calib_identities, steps=args.calib_steps or sampling["steps"],
                          scheduler=sampling["scheduler"], percentile=args.calib_percentile)
        ensure_quant_graphs(out, [recipe], cal, calib_path=args.calib_data, stages=args.stages, force=args.force)
    build_engines(out, stages=args.stages, precision=args.precision, options=options, force=args.force)
    return 0


def add_build_engines_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-engines", help="build TensorRT plans (<stage>.plan) next to the ONNX graphs",
        description="Build a TensorRT / TensorRT-RTX plan per stage. Exports the ONNX graphs first when the "
                    "folder lacks them. Plans are rebuilt only when the ONNX, the options, the library or the "
                    "target GPU changed (recorded in manifest.json under 'plans').")
    p.add_argument("--model-dir", type=argtypes.path, help="model folder to export from when --out lacks the ONNX graphs (or, with --force, holds another model's)")
    p.add_argument("--out", required=True, type=argtypes.path, help="engines folder (ONNX graphs + manifest.json)")
    p.add_argument("--face-models", default=None, type=argtypes.path,
                   help="folder with scrfd_10g_bnkps.onnx / arcface.onnx (default: --model-dir); each one found "
                        "becomes a 'detector' / 'arcface' stage and plan")
    p.add_argument("--no-face", action="store_true", help="do not add the face detector and recognizer stages")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "fp8"), default="fp16",
                   help="fp16 (default) / fp32 build from the graphs of that precision; int8 and fp8 (compute "
                        "capability >= 8.9) build the step stages from Q/DQ graphs placed as NVIDIA's SD recipe "
                        "places them, calibrated on the pipeline's own denoising steps")
    p.add_argument("--batch", type=parse_batch, default=None,
                   help="batch profile: MAX, MIN,OPT or MIN,OPT,MAX (e.g. 1,4,8: min 1, opt 4, max 8); "
                        "default: each stage spec's batch_range")
    p.add_argument("--opt-batch", type=argtypes.count(1, MAX_BATCH, "a batch size"), default=None, metavar="N",
                   help="the batch TensorRT tunes the step and decoder plans for: the --batch you will generate "
                        f"with (default: --batch's OPT, else {specs.DEFAULT_BATCH}, the default of arc2face-rt generate)")
    p.add_argument("--opt-level", type=int, choices=range(6), default=3, metavar="{0..5}",
                   help="builder optimisation level (default 3; higher builds longer)")
    p.add_argument("--compute-capability", default="auto", type=parse_compute_capability,
                   help="TensorRT-RTX target(s): auto (this GPU, else the portable set 8.0,8.6,8.9,12.0), "
                        "current, or a list such as 8.9,12.0 (7.5 for Turing)")
    p.add_argument("--workspace-mib", type=argtypes.count(1, MAX_WORKSPACE_MIB, "a size in MiB"), default=None,
                   help="workspace memory pool limit in MiB (default: the library's)")
    p.add_argument("--no-timing-cache", action="store_true", help="do not read/write <out>/timing.cache")
    p.add_argument("--calib-data", default=None, type=argtypes.path,
                   help="int8/fp8: .npz of step-graph inputs (one array per input, leading axis = sample); "
                        "default: run this folder's pipeline on --calib-identities random identities")
    p.add_argument("--calib-identities", type=argtypes.count(1, 4096, "a number of identities"), default=None,
                   metavar="K", help="int8/fp8: calibrate on K random identities x every step (default 8)")
    p.add_argument("--calib-steps", type=argtypes.count(1, 1000, "a number of steps"), default=None, metavar="N",
                   help="int8/fp8: steps of the schedule calibrated on, with the folder's sampler: the one you "
                        "serve (default the folder's: 25 DPM-Solver++, or 4 LCM with an LCM-LoRA)")
    p.add_argument("--calib-method", choices=("max", "percentile"), default=None,
                   help="int8/fp8: activation range per tensor: max |x| or a percentile of |x| over each step "
                        "(default: percentile for int8, max for fp8)")
    p.add_argument("--calib-percentile", type=argtypes.number(50.0, 100.0, "a percentile"), default=None, metavar="P",
                   help="the percentile --calib-method percentile reads (default 99.99)")
    p.add_argument("--smoothquant-alpha", type=argtypes.number(0.0, 1.0, "an alpha (0: off)"), default=None, metavar="A",
                   help="SmoothQuant migration strength on the MatMul inputs, 0 turns it off (default: 0.8 for "
                        "int8, 0 for fp8)")
    p.add_argument("--residual-qdq", action="store_true",
                   help="int8/fp8: also quantise the residual input of adds fed by a quantised conv, so TensorRT can "
                        "fuse conv + add in int8/FP8; costs accuracy (full size: 27 instead of 34 dB image PSNR vs "
                        "fp16), off by default")
    p.add_argument("--quant-level", type=float, choices=(1.0, 2.0, 2.5, 3.0), default=None, metavar="L",
                   help="int8/fp8: which layers are quantised, as ModelOpt's diffusers quant-level: 1 convs, 2 + "
                        "feed-forwards, 2.5 + attention q/k/v, 3 + every Linear (default 3); lower keeps more fp16")
    p.add_argument("--stages", nargs="+", action="extend", default=None, metavar="STAGE",
                   choices=[*specs.ALL_STAGES, *FACE_STAGES],
                   help=f"stages to build (default: all in the manifest): {' '.join([*specs.ALL_STAGES, *FACE_STAGES])}")
    p.add_argument("--force", action="store_true",
                   help="rebuild the plans and redo the int8/fp8 graphs even when up to date; lets an export that "
                        "--stages needs replace the folder's")
    p.set_defaults(func=cmd_build_engines)
    return p
