"""`arc2face-rt`: generate faces from an identity with exported engines (and embed/score photos)."""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import InvalidInputError, OutputExistsError, OutputWriteError
from .exits import Terminated, run_cli, user_error_message
from .face.cli import add_embed_parser, add_score_parser
from .pipeline import BACKENDS, GenerationOptions
from .schedulers import SCHEDULERS
from .specs import DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS

log = logging.getLogger("arc2face_rt")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate face images of one identity",
                       description="Generate 512x512 faces of one identity with an engines folder "
                                   "written by `arc2face-export onnx` / `build-engines`.")
    p.add_argument("--engines", required=True, type=Path, help="engines folder (manifest.json + graphs)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--embedding", type=Path, help="ArcFace embedding .npy, shape (512,) or (1, 512)")
    who.add_argument("--random-id", action="store_true", help="a random unit vector: a new identity")
    who.add_argument("--image", nargs="+", metavar="PATH",
                     help="photos, folders or globs of one person (detect, align, ArcFace, average)")
    p.add_argument("--models", type=Path, help="folder with scrfd_10g_bnkps.onnx and arcface.onnx, for --image "
                   "(default: $ARC2FACE_MODELS, else ./models)")
    p.add_argument("-n", "--num-images", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i uses numpy default_rng([seed, i]) (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance; <= 1 disables CFG (default {DEFAULT_GUIDANCE})")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                   help=f"sampler (default {DEFAULT_SCHEDULER}: DPM-Solver++ 2M, as Arc2Face)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"images per graph call (default {DEFAULT_BATCH}; TensorRT plans are tuned for it)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT when a GPU and plans are present, else ONNX Runtime")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--prefix", default="arc2face", help="file names: PREFIX_SEED_INDEX.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: keep the images already made with the same parameters "
                        "and make only the missing ones")
    p.add_argument("--no-verify", action="store_true",
                   help="check the engines' file sizes only, not their content (sha256; after the first "
                        "run this costs a stat() per file)")
    p.set_defaults(func=cmd_generate)


def _batches(count: int, batch: int, done: set[int]) -> Iterator[list[int]]:
    """Indices 0..count-1 in batches aligned to multiples of `batch`, leaving out batches whose
    images are all `done`; lazy, so a huge -n costs nothing up front. A partly done batch is made
    whole again (only its missing images are written), so every image comes from the same batch
    as in an uninterrupted run: a resumed run gives the same bytes."""
    for start in range(0, count, batch):
        idx = range(start, min(start + batch, count))
        if not all(i in done for i in idx):
            yield list(idx)


def _batches_to_run(count: int, batch: int, done: set[int]) -> int:
    full = Counter(i // batch for i in done)
    skipped = sum(1 for k, n in full.items() if n == min(batch, count - k * batch))
    return math.ceil(count / batch) - skipped


def cmd_generate(args) -> int:
    from .outputs import check_output_dir, check_prefix, existing_images
    from .pipeline import Arc2FacePipeline, load_identity, random_identity

    # Everything a user can get wrong is checked before any model is loaded.
    opts = GenerationOptions(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                             seed=args.seed, batch_size=args.batch)
    opts.check()
    if args.num_images < 1:
        raise InvalidInputError(f"-n must be >= 1 (got {args.num_images})")
    if args.resume and args.overwrite:
        raise InvalidInputError("--resume keeps finished images and --overwrite replaces them: pass one of them")
    check_prefix(args.prefix)
    out = check_output_dir(args.out)
    existing = existing_images(out, args.prefix, args.seed, args.num_images)
    if existing and not (args.overwrite or args.resume):
        first = existing[min(existing)]
        raise OutputExistsError(f"{first} (and {len(existing) - 1} more of this run's names) exist; pass --resume "
                                "to finish an interrupted run, --overwrite to replace them, or choose another "
                                "--out, --seed or --prefix")
    if args.embedding:
        identity, who = load_identity(args.embedding), str(args.embedding)
    elif args.random_id:
        identity, who = random_identity(args.seed), f"random (seed {args.seed})"
    else:
        from .face.models import identity_from_images
        identity = identity_from_images(args.image, models_dir=args.models, device=args.device,
                                        log=lambda msg: print(msg, file=sys.stderr),
                                        engines=args.engines, backend=args.backend, verify=not args.no_verify)
        who = f"from {len(args.image)} photo path(s)"
    pipe = Arc2FacePipeline(args.engines, backend=args.backend, device=args.device, verify=not args.no_verify)
    with pipe:
        return _generate_into(pipe, args, opts, identity, who, out, existing)


def _generate_into(pipe, args, opts: GenerationOptions, identity, who: str, out: Path, existing: dict) -> int:
    from tqdm import tqdm

    from .atomic import remove_stale_temps
    from .images import save_png
    from .outputs import image_name, plan_resume

    skip: set[int] = set()
    if args.resume and existing:
        plan = plan_resume(existing, lambda i: pipe.image_params(opts, i, identity))
        skip = plan.done
        if plan.redo:
            print(f"resume: {len(plan.redo)} unreadable or incomplete file(s) of this run will be made again",
                  file=sys.stderr)
    todo = args.num_images - len(skip)
    runs = _batches_to_run(args.num_images, opts.batch_size, skip)
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temps(out)
    print(f"arc2face-rt {__version__}: {args.num_images} image(s) of identity {who}, {opts.steps} "
          f"{opts.scheduler} steps, guidance {opts.guidance}, backend {pipe.backend} "
          f"({pipe.manifest.get('precision')})" + (f"; {len(skip)} already done, skipped" if skip else "")
          + (f"; removed {removed} abandoned temporary file(s)" if removed else ""), file=sys.stderr)
    if pipe.manifest.get("source", {}).get("random_weights"):
        print("note: these engines come from a RANDOM-WEIGHT checkpoint: images will look like noise, "
              "not faces", file=sys.stderr)
    written, timings = 0, {}
    t0 = time.perf_counter()
    with tqdm(total=runs * opts.steps, unit="step", desc="denoise", file=sys.stderr, disable=None) as bar:
        try:
            for idx in _batches(args.num_images, opts.batch_size, skip):
                res = pipe.generate(identity, options=opts, on_step=bar.update, indices=idx)
                for img, params, i in zip(res.images, res.params, idx):
                    if i in skip:
                        continue
                    # --resume replaces only the unfinished files of this run that it found
                    save_png(out / image_name(args.prefix, args.seed, i), img, params,
                             overwrite=args.overwrite or (args.resume and i in existing))
                    written += 1
                for k, v in res.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
        except KeyboardInterrupt as e:           # Ctrl-C, or SIGTERM (exits.Terminated)
            bar.close()
            print(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}: {written} image(s) were "
                  f"written to {out}, none half-written; run the same command with --resume to finish",
                  file=sys.stderr)
            e.reported = True
            raise
        except (OSError, MemoryError) as e:
            bar.close()
            raise OutputWriteError(f"{user_error_message(e)}; stopped after {written} of {todo} image(s), which "
                                   f"are kept in {out}: run the same command with --resume to finish") from e
    total = time.perf_counter() - t0
    per_step = timings.get("denoise", 0.0) / max(1, runs * opts.steps)
    print(f"wrote {written} image(s) to {out} in {total:.1f} s (project {timings.get('project', 0):.2f} s, "
          f"denoise {timings.get('denoise', 0):.1f} s = {per_step * 1000:.0f} ms/step at batch "
          f"{min(opts.batch_size, max(todo, 1))}, decode {timings.get('decode', 0):.1f} s)", file=sys.stderr)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an engines folder and check its files")
    p.add_argument("--engines", required=True, type=Path)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (slow for big graphs)")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .integrity import verify_records
    from .manifest import load_manifest, record_files

    m = load_manifest(args.engines)
    print(f"{args.engines}: spec revision {m['spec_revision']}, precision {m['precision']}, "
          f"created {m.get('created')}, random weights: {m.get('source', {}).get('random_weights')}")
    for section in ("stages", "face_stages", "quantized", "plans"):
        for name, rec in m.get(section, {}).items():
            files = record_files(rec)
            verify_records(args.engines, files, mode="full" if args.verify else "size")
            size = sum(r["bytes"] for r in files.values()) / 2**20
            val = rec.get("validation")
            extra = ""
            if isinstance(val, dict) and all(isinstance(val.get(k), (int, float)) for k in ("value", "tolerance")):
                extra = f", {val.get('metric')} {val['value']:.3g} <= {val['tolerance']}"
            print(f"  {section[:-1].replace('_', ' ')} {name}: {size:.1f} MiB{extra}")
    print("files ok" + (" (sha256 verified)" if args.verify else " (sizes checked; --verify checks content)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arc2face-rt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arc2face-rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    add_embed_parser(sub)
    add_score_parser(sub)
    _add_info(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return run_cli(lambda: args.func(args), "arc2face-rt", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
