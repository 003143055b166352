"""`arc2face-export`: random-weight checkpoints, ONNX export with validation, TensorRT engines,
OpenVINO int8 step graphs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arc2face_rt import argtypes
from arc2face_rt.exits import cli_main
from arc2face_rt.specs import ALL_STAGES, PRECISIONS


PROG = "arc2face-export"


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def cmd_random_checkpoint(args) -> int:
    from arc2face_ref.random_ckpt import write_random_checkpoint

    write_random_checkpoint(args.out, size=args.size, seed=args.seed, force=args.force,
                            face_models=not args.no_face_models, controlnet=args.controlnet, lcm_lora=args.lcm_lora,
                            say=_say)       # after its checks: a refused --out is the only line
    _say(f"done: {args.out} (random weights: generated images will look like noise)")
    return 0


def cmd_onnx(args) -> int:
    from .engines_folder import writing
    from .onnx_export import export_all

    with writing(args.out):
        m = export_all(args.model_dir, args.out, precision=args.precision, force=args.force,
                       stages=tuple(args.stages) if args.stages else None, validate=not args.no_validate,
                       progress=_say, lora=args.lora, lora_scale=args.lora_scale, ort_cuda=args.ort_cuda)
    lora = f", LoRA {m['lora']['file']} fused at {m['lora']['scale']:g}" if m.get("lora") else ""
    fused = f", {len(m['ort_cuda'])} ONNX Runtime CUDA graphs" if m.get("ort_cuda") else ""
    _say(f"manifest: {Path(args.out) / 'manifest.json'} ({len(m['stages'])} stages, {m['precision']}{lora}{fused})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run = run_demo(args.out, size=args.size, num_images=args.num_images, seed=args.seed, steps=args.steps, say=_say)
    _say(f"demo images: {run} (random weights: expect noise, not faces)")
    return 0


def cmd_openvino_int8(args) -> int:
    from .ov_int8 import ensure_ov_int8

    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        _say(f"openvino-int8 needs openvino and nncf ({e}); pip install 'arc2face-rt[openvino,export]'")
        return 2
    from .engines_folder import writing

    with writing(args.engines):
        ensure_ov_int8(args.engines, stages=tuple(args.stages) if args.stages else None, identities=args.identities,
                       steps=args.steps, per_run=args.per_run, force=args.force, say=_say)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog=PROG, description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("random-checkpoint", help="write a seeded random-weight model folder (released layout)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: fast tests and demo; full: exact SD1.5/CLIP-L architectures (3.4 GB UNet)")
    p.add_argument("--out", required=True, type=argtypes.path)
    p.add_argument("--seed", type=argtypes.seed, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--no-face-models", action="store_true", help="skip the detector/ArcFace ONNX files")
    p.add_argument("--controlnet", action="store_true",
                   help="also write controlnet/ (the pose ControlNet, released config's architecture)")
    p.add_argument("--lcm-lora", action="store_true",
                   help="also write lcm-lora/pytorch_lora_weights.safetensors (random, with the SD1.5 LCM-LoRA's "
                        "keys and ranks)")
    p.set_defaults(func=cmd_random_checkpoint)

    p = sub.add_parser("onnx", help="export, validate against torch, and write an engines folder")
    p.add_argument("--model-dir", required=True, type=argtypes.path, help="arc2face/, encoder/, vae/, scheduler/")
    p.add_argument("--out", required=True, type=argtypes.path, help="engines folder to write")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--stages", nargs="+", action="extend", choices=list(ALL_STAGES),
                   help="export only these (default: all; the control step graphs when MODEL has controlnet/)")
    p.add_argument("--lora", type=argtypes.path, metavar="FILE.safetensors",
                   help="fuse this LoRA (LCM-LoRA for SD1.5; diffusers or kohya keys) into the UNet before export; "
                        "generate then defaults to --scheduler lcm --steps 4 --guidance 1")
    p.add_argument("--lora-scale", type=argtypes.number(0, 10, "a LoRA scale"), metavar="S",
                   help="fuse the --lora at this scale (default 1.0)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-torch check")
    p.add_argument("--ort-cuda", action="store_true",
                   help="also write fp16 step and VAE graphs with ONNX Runtime's fused CUDA kernels "
                        "(<stage>.ort-cuda.onnx; used by --backend ort on a GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.set_defaults(func=cmd_onnx)

    p = sub.add_parser("demo", help="random checkpoint -> ONNX -> generate PNGs on the CPU, all offline")
    p.add_argument("--out", type=argtypes.path, default=Path("demo"), help="working folder (default ./demo)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("-n", "--num-images", type=int, default=4)
    p.add_argument("--seed", type=argtypes.seed, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("openvino-int8", help="int8 step graphs for `--backend openvino --cpu-precision int8` (NNCF)",
                       description="Quantise the step graphs of an fp32 engines folder with NNCF post-training "
                                   "quantisation, calibrated on step inputs the pipeline records; writes "
                                   "<stage>.ov-int8.xml/.bin and manifest['openvino_int8'].")
    p.add_argument("--engines", required=True, type=argtypes.path, help="fp32 engines folder (`arc2face-export onnx`)")
    p.add_argument("--stages", nargs="+", action="extend", choices=("step_cfg", "step"), default=None,
                   help="step graphs to quantise (default: those of step_cfg and step the folder has)")
    p.add_argument("--identities", type=argtypes.count(1, 4096, "a number of identities"), default=4,
                   help="random identities to calibrate on (default 4)")
    p.add_argument("--steps", type=argtypes.count(1, 1000, "a number of steps"), default=None,
                   help="steps per calibration run, with the folder's sampler (default the folder's: 25 "
                        "DPM-Solver++, or 4 LCM with an LCM-LoRA)")
    p.add_argument("--per-run", type=argtypes.count(1, 1000, "a number of steps"), default=4,
                   help="steps kept per run, evenly spaced (default 4)")
    p.add_argument("--force", action="store_true", help="quantise again even when current")
    p.set_defaults(func=cmd_openvino_int8)

    from .build_cli import add_build_engines_parser      # TensorRT itself is imported when it builds
    add_build_engines_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
