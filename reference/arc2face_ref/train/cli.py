"""`arc2face-train`: fine-tune Arc2Face on your own photos.

    arc2face-train prepare --images DIR... --models MODELS --out DATA      photos -> WebDataset shards
    arc2face-train fit --model-dir MODEL --data DATA --out RUN [options]   train; checkpoints in RUN
For several GPUs or nodes: `accelerate launch [--num_processes N] -m arc2face_ref.train.cli fit ...`
(or torchrun); see the README's "Fine-tuning".
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from arc2face_rt import argtypes
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.exits import cli_main

PROG = "arc2face-train"


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def cmd_prepare(args) -> int:
    from tqdm.auto import tqdm

    from arc2face_rt.face.flags import limits_from
    from arc2face_rt.face.identity import FaceAnalyzer
    from arc2face_rt.face.models import load_face_models

    from .prepare import SKIPPED_FILE, prepare

    def analyzer():
        det, rec = load_face_models(args.models, args.detector, args.recognizer, device=args.device,
                                    min_score=args.min_score, file_flags=True)
        return FaceAnalyzer(det, rec, "largest", args.min_size, limits_from(args))

    bars = []                  # made at the first photo: a refused command prints only its error line

    def progress(n: int) -> None:
        if not bars:
            bars.append(tqdm(unit="photo", disable=args.quiet, dynamic_ncols=True))
        bars[0].update(n)

    try:
        rep = prepare(args.images, args.out, analyzer, shard_size=args.shard_size, progress=progress, say=_say)
    finally:
        for bar in bars:
            bar.close()
    if not rep.written:                 # nothing to train on: a user error, with the reasons kept on disk
        raise InvalidInputError(f"no photo gave a usable face ({len(rep.skipped)} skipped, each with its reason in "
                                f"{Path(args.out) / SKIPPED_FILE}); fit needs at least one sample: fix or replace "
                                "the photos and run the same command again (it reads changed photos again), or "
                                "run it with other --images")
    _say(f"{rep.written} sample(s) in {rep.shards} shard(s) in {args.out}; {len(rep.skipped)} photo(s) skipped"
         + (f" (listed in {Path(args.out) / SKIPPED_FILE})" if rep.skipped else ""))
    return 0


def cmd_fit(args) -> int:
    from arc2face_rt.atomic import missing_folders, remove_empty_folders
    from arc2face_rt.exits import Terminated

    from .checkpoint import checkpoints
    from .config import FitConfig
    from .loop import fit

    fields = set(FitConfig.field_names())
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kw["train_unet"], kw["train_encoder"] = not args.freeze_unet, not args.freeze_encoder
    kw["adam_betas"] = tuple(args.adam_betas)
    cfg = FitConfig(**kw)
    new_out = not cfg.out.exists()
    made = missing_folders(cfg.out)             # --out and the parents this run makes
    try:
        res = fit(cfg, resume=args.resume, say=_say, progress=not args.quiet)
    except BaseException as e:
        # a run that failed before its first checkpoint leaves no folder it made (only its metrics log)
        if new_out and cfg.out.is_dir() and not any(cfg.out.glob("checkpoint-*")):
            shutil.rmtree(cfg.out, ignore_errors=True)
            remove_empty_folders(made)          # the parents it made, while empty
        kept = checkpoints(cfg.out)
        if isinstance(e, KeyboardInterrupt) and kept:           # Ctrl-C, SIGTERM: say how to go on
            _say(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}: the checkpoints in {cfg.out} are "
                 f"kept (the newest: {kept[max(kept)].name}); run the same command with --resume to continue")
            e.reported = True
        raise
    if res.checkpoints:
        _say(f"last checkpoint: {res.checkpoints[-1]} (export: arc2face-export onnx --model-dir "
             f"{res.checkpoints[-1]} --out ENGINES)")
    return 0


def _add_fit_parser(sub) -> None:
    from .config import MAX_VAL_STEPS, FitConfig, LR_SCHEDULES, PRECISIONS

    d = FitConfig.__dataclass_fields__
    p = sub.add_parser("fit", help="fine-tune UNet + ID encoder; checkpoints in the released layout",
                       description="Train on shards from `prepare`. Every option's default is shown with --help.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True, type=argtypes.path, help="model to start from (released layout)")
    p.add_argument("--data", required=True, type=argtypes.path, help="folder written by `prepare`")
    p.add_argument("--out", required=True, type=argtypes.path, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    pos, num = argtypes.count(1), argtypes.count(0)
    p.add_argument("--steps", type=pos, default=d["steps"].default, help="optimizer steps in all")
    p.add_argument("--batch-size", type=pos, default=d["batch_size"].default, help="per process")
    p.add_argument("--grad-accum", type=pos, default=d["grad_accum"].default, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=argtypes.number(0, 1), default=d["lr"].default, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d["lr_schedule"].default, help="after the warm-up")
    p.add_argument("--warmup-steps", type=num, default=d["warmup_steps"].default, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=argtypes.number(0, 10), default=d["weight_decay"].default,
                   help="AdamW weight decay")
    p.add_argument("--adam-betas", type=argtypes.number(0, 0.99999), nargs=2, default=list(d["adam_betas"].default),
                   metavar=("B1", "B2"), help="AdamW betas")
    # > 0: with 0, a weight whose gradient is still 0 gets 0/0 = NaN on the first step
    p.add_argument("--adam-eps", type=argtypes.number(1e-20, 1, "an epsilon"), default=d["adam_eps"].default,
                   help="AdamW epsilon")
    p.add_argument("--max-grad-norm", type=argtypes.number(0), default=d["max_grad_norm"].default,
                   help="0: no clipping")
    p.add_argument("--resolution", type=argtypes.count(64, 4096), default=d["resolution"].default,
                   help="training image size (px)")
    p.add_argument("--freeze-unet", action="store_true", help="train the ID encoder only")
    p.add_argument("--freeze-encoder", action="store_true", help="train the UNet only")
    p.add_argument("--id-dropout", type=argtypes.number(0, 0.999), default=d["id_dropout"].default,
                   help="probability of training a sample unconditionally: keeps CFG working, as the unconditional "
                        "embedding moves with a training encoder")
    p.add_argument("--mixed-precision", choices=PRECISIONS, default=d["mixed_precision"].default,
                   help="autocast precision (Accelerate)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute")
    p.add_argument("--ema-decay", type=argtypes.number(0, 0.99999), default=d["ema_decay"].default, help="0: off")
    p.add_argument("--lora-rank", type=num, default=d["lora_rank"].default, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=argtypes.number(0), default=d["lora_alpha"].default, help="0: the rank")
    p.add_argument("--seed", type=argtypes.seed, default=d["seed"].default, help="data order, noise and dropout")
    p.add_argument("--checkpoint-every", type=pos, default=d["checkpoint_every"].default,
                   help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=num, default=d["keep_checkpoints"].default, help="0: keep all")
    p.add_argument("--validate-every", type=num, default=d["validate_every"].default, help="0: off")
    p.add_argument("--val-ids", type=pos, default=d["val_ids"].default, help="validation identities")
    p.add_argument("--val-images", type=pos, default=d["val_images"].default, help="validation images per identity")
    p.add_argument("--val-steps", type=argtypes.count(1, MAX_VAL_STEPS, "a number of steps"),
                   default=d["val_steps"].default, help="sampling steps of a validation image")
    p.add_argument("--val-guidance", type=argtypes.number(0, 100), default=d["val_guidance"].default,
                   help="guidance of a validation image")
    p.add_argument("--face-models", type=argtypes.path, help="detector + arcface.onnx for the validation ID similarity")
    p.add_argument("--workers", type=num, default=d["workers"].default, help="data-loading processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)


def build_parser() -> argparse.ArgumentParser:
    from arc2face_rt.face.flags import add_max_pixels

    parser = argtypes.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="photos -> face crops + ArcFace ids in WebDataset shards (resumable)")
    p.add_argument("--images", required=True, nargs="+", action="extend", type=argtypes.path,
                   help="photos, folders (recursive), globs")
    p.add_argument("--models", type=argtypes.path, help="folder with scrfd_10g_bnkps.onnx and arcface.onnx")
    p.add_argument("--detector", type=argtypes.path, help="detector file (default: found in --models)")
    p.add_argument("--recognizer", type=argtypes.path, help="arcface.onnx (default: found in --models)")
    p.add_argument("--out", required=True, type=argtypes.path, help="data folder to write (new or empty) or to continue")
    p.add_argument("--shard-size", type=argtypes.count(1), default=1000, help="photos per shard (default 1000)")
    p.add_argument("--min-score", type=argtypes.number(0, 1), default=0.5, help="detector threshold (default 0.5)")
    p.add_argument("--min-size", type=argtypes.number(0), default=0.0, help="skip faces smaller than this (px)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="face models' device")
    add_max_pixels(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    _add_fit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
