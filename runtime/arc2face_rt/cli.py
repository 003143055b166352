"""`arc2face-rt`: generate faces from an identity with exported engines (and embed/score photos)."""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from . import __version__
from .errors import Arc2FaceError, InvalidInputError, OutputExistsError
from .face.cli import add_embed_parser, add_score_parser
from .pipeline import BACKENDS, GenerationOptions
from .schedulers import SCHEDULERS
from .specs import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS

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
    p.add_argument("--batch", type=int, default=4, help="images per graph call (default 4)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT when a GPU and plans are present, else ONNX Runtime")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--prefix", default="arc2face", help="file names: PREFIX_SEED_INDEX.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .images import save_png
    from .pipeline import Arc2FacePipeline, load_identity, random_identity

    opts = GenerationOptions(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                             seed=args.seed, batch_size=args.batch)
    opts.check()
    if args.num_images < 1:
        raise InvalidInputError(f"-n must be >= 1 (got {args.num_images})")
    names = [args.out / f"{args.prefix}_{args.seed}_{i:04d}.png" for i in range(args.num_images)]
    clash = [p for p in names if p.exists()]
    if clash and not args.overwrite:
        raise OutputExistsError(f"{clash[0]} (and {len(clash) - 1} more) exist; choose another --out, "
                                "--seed or --prefix, or pass --overwrite")
    if args.embedding:
        identity, who = load_identity(args.embedding), str(args.embedding)
    elif args.random_id:
        identity, who = random_identity(args.seed), f"random (seed {args.seed})"
    else:
        from .face.models import identity_from_images
        identity = identity_from_images(args.image, models_dir=args.models, device=args.device,
                                        log=lambda msg: print(msg, file=sys.stderr),
                                        engines=args.engines, backend=args.backend)
        who = f"from {len(args.image)} photo path(s)"
    pipe = Arc2FacePipeline(args.engines, backend=args.backend, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rnd = pipe.manifest.get("source", {}).get("random_weights")
    print(f"arc2face-rt {__version__}: {args.num_images} image(s) of identity {who}, {opts.steps} "
          f"{opts.scheduler} steps, guidance {opts.guidance}, backend {pipe.backend} "
          f"({pipe.manifest.get('precision')})", file=sys.stderr)
    if rnd:
        print("note: these engines come from a RANDOM-WEIGHT checkpoint: images will look like noise, "
              "not faces", file=sys.stderr)
    batches = math.ceil(args.num_images / opts.batch_size)
    written, timings = 0, {}
    t0 = time.perf_counter()
    with pipe, tqdm(total=batches * opts.steps, unit="step", desc="denoise", file=sys.stderr,
                    disable=None) as bar:
        try:
            for b in range(batches):
                first = b * opts.batch_size
                n = min(opts.batch_size, args.num_images - first)
                res = pipe.generate(identity, n, opts, on_step=bar.update, first_index=first)
                for img, params, path in zip(res.images, res.params, names[first:first + n]):
                    save_png(path, img, params, overwrite=args.overwrite)
                    written += 1
                for k, v in res.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {written} image(s) were written to {args.out}, none half-written",
                  file=sys.stderr)
            return 130
    total = time.perf_counter() - t0
    per_step = timings.get("denoise", 0.0) / max(1, batches * opts.steps)
    print(f"wrote {written} image(s) to {args.out} in {total:.1f} s (project {timings.get('project', 0):.2f} s, "
          f"denoise {timings.get('denoise', 0):.1f} s = {per_step * 1000:.0f} ms/step at batch "
          f"{min(opts.batch_size, args.num_images)}, decode {timings.get('decode', 0):.1f} s)", file=sys.stderr)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an engines folder and check its files")
    p.add_argument("--engines", required=True, type=Path)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (slow for big graphs)")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .manifest import load_manifest, record_files, verify_files

    m = load_manifest(args.engines)
    print(f"{args.engines}: spec revision {m['spec_revision']}, precision {m['precision']}, "
          f"created {m.get('created')}, random weights: {m.get('source', {}).get('random_weights')}")
    for section in ("stages", "face_stages", "plans"):
        for name, rec in m.get(section, {}).items():
            files = record_files(rec)
            verify_files(args.engines, files, hashes=args.verify)
            size = sum(r["bytes"] for r in files.values()) / 2**20
            val = rec.get("validation")
            extra = f", {val['metric']} {val['value']:.3g} <= {val['tolerance']}" if val else ""
            print(f"  {section[:-1].replace('_', ' ')} {name}: {size:.1f} MiB{extra}")
    print("files ok" + (" (sha256 verified)" if args.verify else " (sizes checked)"))
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
    try:
        return args.func(args)
    except Arc2FaceError as e:
        print(f"arc2face-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arc2face-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
