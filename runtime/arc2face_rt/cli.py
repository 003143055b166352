"""`arc2face-rt`: generate faces from an identity with exported engines (and datasets of many; embed/score
photos; manage the per-user cache)."""
from __future__ import annotations

import argparse
import math
import sys

from . import __version__, argtypes
from .backends.openvino import CPU_PRECISIONS
from .cache_cli import add_cache_parser
from .dataset.cli import add_dataset_parser
from .errors import InvalidInputError
from .exits import cli_main
from .face.cli import add_embed_parser, add_score_parser
from .face.flags import add_max_pixels, limits_from
from .face.image_io import DEFAULT_LIMITS
from .folder_setup import BACKENDS, check_folder_scheduler, folder_defaults, sampling_options
from .pipeline import GenerationOptions
from .schedulers import SCHEDULERS
from .specs import (DEFAULT_BATCH, DEFAULT_CONTROL_SCALE, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS,
                    LCM_LORA_DEFAULTS as LCM)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate face images of one identity",
                       description="Generate 512x512 faces of one identity with an engines folder "
                                   "written by `arc2face-export onnx` / `build-engines`.")
    p.add_argument("--engines", required=True, type=argtypes.path, help="engines folder (manifest.json + graphs)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--embedding", type=argtypes.path, help="ArcFace embedding .npy, shape (512,) or (1, 512)")
    who.add_argument("--random-id", action="store_true", help="a random unit vector: a new identity")
    who.add_argument("--image", nargs="+", action="extend", metavar="PATH", type=argtypes.path,
                     help="photos, folders or globs of one person (detect, align, ArcFace, average)")
    p.add_argument("--models", type=argtypes.path, help="folder with scrfd_10g_bnkps.onnx and arcface.onnx, for --image "
                   "(default: $ARC2FACE_MODELS, else ./models)")
    p.add_argument("-n", "--num-images", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i uses numpy default_rng([seed, i]) (default 0)")
    # None: the folder's default (Arc2Face's; LCM's on folders with an LCM-LoRA fused in)
    p.add_argument("--steps", type=int,
                   help=f"denoising steps (default {DEFAULT_STEPS}; {LCM['steps']} with an LCM-LoRA)")
    p.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance; <= 1 disables CFG (default {DEFAULT_GUIDANCE}; {LCM['guidance']:g} "
                        "with an LCM-LoRA)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help=f"sampler (default {DEFAULT_SCHEDULER}: DPM-Solver++ 2M, as Arc2Face; {LCM['scheduler']} on "
                        "engines exported with --lora)")
    p.add_argument("--control-image", nargs="+", action="extend", type=argtypes.path, metavar="POSE.png",
                   help="ControlNet pose: a normal-map rendering of the head pose (square, RGB; resized to 512x512 as "
                        "diffusers does); one for all images or one per image (README: ControlNet pose)")
    p.add_argument("--control-scale", type=argtypes.number(0, 10, "a control scale"), default=None,
                   help=f"ControlNet conditioning scale, with --control-image (default {DEFAULT_CONTROL_SCALE:g})")
    add_max_pixels(p)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"images per graph call (default {DEFAULT_BATCH}; TensorRT plans are tuned for it)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT when a GPU and plans are present, ONNX Runtime on another usable GPU, "
                        "else OpenVINO when installed (CPU), else ONNX Runtime")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default="auto",
                   help="OpenVINO: auto = bf16 where the CPU has AMX-BF16/AVX512-BF16, else fp32; int8 runs the "
                        "step graphs `arc2face-export openvino-int8` wrote (default auto)")
    p.add_argument("--out", required=True, type=argtypes.path, help="output folder (created if missing)")
    p.add_argument("--prefix", default="arc2face", help="file names: PREFIX_SEED_INDEX.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: keep the images already made with the same parameters "
                        "and make only the missing ones")
    p.add_argument("--no-verify", action="store_true",
                   help="check the engines' file sizes only, not their content (sha256; after the first "
                        "run this costs a stat() per file)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .folder_run import FolderRun
    from .outputs import check_not_in_engines
    from .pipeline import Arc2FacePipeline, load_identity, random_identity

    # Everything a user can get wrong is checked before any model is loaded, and everything the
    # engines folder can get wrong before the output folder is made.
    if args.models is not None and not args.image:
        raise InvalidInputError(f"--models {args.models}: the face models make an identity from --image photos; "
                                "with --embedding or --random-id they are not used (drop --models)")
    if args.max_pixels != DEFAULT_LIMITS.max_pixels and not (args.image or args.control_image):
        raise InvalidInputError(f"--max-pixels {args.max_pixels}: limits the photos of --image and --control-image, "
                                "and this run reads none (drop it)")
    if args.control_scale is not None and not args.control_image:
        raise InvalidInputError("--control-scale needs --control-image (the pose it scales); without one the "
                                "images are made without pose control")
    sampling, note = sampling_options(args.engines, {k: getattr(args, k) for k in ("scheduler", "steps", "guidance")})
    opts = GenerationOptions(**sampling, seed=args.seed, batch_size=args.batch)
    opts.check()
    if note:
        _stderr(note)
    control = None
    if args.control_image:
        from .control import Control
        scale = DEFAULT_CONTROL_SCALE if args.control_scale is None else args.control_scale
        control = Control.from_files(args.control_image, scale, count=args.num_images, limits=limits_from(args))
    check_not_in_engines(args.out, args.engines)
    run = FolderRun(out=args.out, count=args.num_images, prefix=args.prefix, resume=args.resume,
                    overwrite=args.overwrite, again=getattr(args, "again", None))   # demo sets `again`
    existing = run.check(args.seed)
    if args.embedding:
        identity, who = load_identity(args.embedding), str(args.embedding)
    elif args.random_id:
        identity, who = random_identity(args.seed), f"random (seed {args.seed})"
    else:
        from .face.models import identity_from_images
        identity = identity_from_images(args.image, models_dir=args.models, device=args.device,
                                        log=_stderr, limits=limits_from(args), engines=args.engines, backend=args.backend,
                                        verify=not args.no_verify)
        who = f"from {len(args.image)} photo path(s)"
    with Arc2FacePipeline(args.engines, backend=args.backend, device=args.device, verify=not args.no_verify,
                          cpu_precision=args.cpu_precision) as pipe:
        run.check_resume(pipe, identity, opts, existing, control)   # a changed setting: refused before graphs load
        pipe.prepare(opts, control=control is not None)
        _stderr(f"arc2face-rt {__version__}: {args.num_images} image(s) of identity {who}, {opts.steps} "
                f"{opts.scheduler} steps, guidance {opts.guidance}, backend {pipe.backend} ({pipe.precision}"
                + (f"; CPU {pipe.openvino.isa.summary()}" if pipe.openvino else "") + ")")
        if pipe.manifest.get("source", {}).get("random_weights"):
            _stderr("note: these engines come from a RANDOM-WEIGHT checkpoint: images will look like noise, not faces")
        s = run.write(pipe, identity, opts, existing, log=_stderr, progress=_progress_bar, control=control)
    t = s.timings
    steps_run = max(1, math.ceil(max(s.written, 1) / opts.batch_size) * opts.steps)
    batch = min(opts.batch_size, max(s.written, 1))       # the largest batch this run made
    _stderr(f"wrote {s.written} image(s) to {args.out} in {s.seconds:.1f} s"
            + (f", {s.skipped} already there" if s.skipped else "")
            + (f", {s.made_elsewhere} written meanwhile by another process" if s.made_elsewhere else "")
            + f" (project {t.get('project', 0):.2f} s, denoise {t.get('denoise', 0):.1f} s = "
            f"{t.get('denoise', 0) / steps_run * 1000:.0f} ms/step at batch {batch}, "
            f"decode {t.get('decode', 0):.1f} s)")
    return 0


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="denoise", file=sys.stderr, disable=None)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an engines folder and check its files")
    p.add_argument("--engines", required=True, type=argtypes.path)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (slow for big graphs)")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .integrity import verify_records
    from .manifest import load_manifest, ov_int8_advice, record_files

    m = load_manifest(args.engines)
    check_folder_scheduler(args.engines, m, folder_defaults(m)["scheduler"])   # what generate refuses
    print(f"{args.engines}: spec revision {m['spec_revision']}, precision {m['precision']}, "
          f"created {m.get('created')}, random weights: {m.get('source', {}).get('random_weights')}")
    if m.get("lora"):
        lr = m["lora"]
        print(f"  LoRA fused: {lr['file']} (sha256 {lr['sha256']}, {lr['bytes'] / 2**20:.1f} MiB) at scale "
              f"{lr['scale']:g}; generate defaults: " + " ".join(f"--{k} {v:g}" if k != "scheduler" else f"--{k} {v}"
                                                                   for k, v in LCM.items()))
    for section in ("stages", "face_stages", "quantized", "quantized_fp8", "openvino_int8", "ort_cuda", "plans"):
        for name, rec in m.get(section, {}).items():
            files = record_files(rec)
            verify_records(args.engines, files, mode="full" if args.verify else "size",
                           fix=ov_int8_advice(args.engines) if section == "openvino_int8" else None)
            size = sum(r["bytes"] for r in files.values()) / 2**20
            val = rec.get("validation") or rec.get("source_validation")
            extra = f", {val.get('metric')} {val['value']:.3g} <= {val['tolerance']}" if val else ""
            label = {"quantized_fp8": "quantized fp8", "openvino_int8": "OpenVINO int8",
                     "ort_cuda": "ONNX Runtime CUDA"}.get(section, section[:-1].replace("_", " "))
            print(f"  {label} {name}: {size:.1f} MiB{extra}")
    print("files ok" + (" (sha256 verified)" if args.verify else " (sizes checked; --verify checks content)"))
    for note in _missing_stage_notes(m, args.engines):
        print(f"note: {note}")
    return 0


def _missing_stage_notes(m: dict, engines) -> list[str]:
    """What `generate` cannot do with this folder for want of a graph (the projector and the decoder serve
    every run; step_cfg serves guidance > 1, step guidance <= 1, and their ControlNet twins the same with
    --control-image), and the export that adds it."""
    from .manifest import reexport_advice

    have = m.get("stages", {})
    again = reexport_advice(engines)
    base = [s for s in ("projector", "vae_decoder") if s not in have]
    if base:
        return [f"no {' / '.join(base)} stage: `generate` cannot run with this folder; {again}"]
    notes = []
    guidance = folder_defaults(m)["guidance"]
    for pair, what in ((("step_cfg", "step"), ""), (("step_cfg_control", "step_control"), " with --control-image")):
        present = [s for s in pair if s in have]
        if not present:
            if not what:
                notes.append("no step graph without ControlNet: `generate` here needs --control-image"
                             if any(s in have for s in ("step_cfg_control", "step_control")) else
                             f"no step graph: `generate` cannot run with this folder; {again}")
            continue
        if len(present) == 1:
            takes = "guidance above 1" if present[0] == pair[0] else "guidance 1 or below"
            notes.append(f"no {pair[1] if present[0] == pair[0] else pair[0]} stage: `generate`{what} here takes "
                         f"{takes} only (the folder's default guidance: {guidance:g}); for the other, export "
                         f"every stage (no --stages): {again}")
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="arc2face-rt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arc2face-rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    add_dataset_parser(sub)
    add_embed_parser(sub)
    add_score_parser(sub)
    _add_info(sub)
    add_cache_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
