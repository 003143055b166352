"""`arc2face-export demo`: the whole job on the built-in default, offline, on a CPU.

random-weight checkpoint -> ONNX export (validated) -> `arc2face-rt generate` with ONNX Runtime ->
PNG files. Re-running reuses the checkpoint and the export and writes a new numbered run folder.
Random weights give random-looking images: this shows the machinery, not faces.
"""
from __future__ import annotations

from pathlib import Path


def run_demo(out: Path, size: str = "tiny", num_images: int = 4, seed: int = 0, steps: int = 25,
             say=print) -> Path:
    from arc2face_ref.random_ckpt import write_random_checkpoint
    from arc2face_rt.cli import main as rt_main
    from arc2face_rt.errors import InvalidInputError
    from arc2face_rt.outputs import check_output_dir
    from arc2face_rt.pipeline import GenerationOptions

    from .onnx_export import export_all

    if num_images < 1:
        raise InvalidInputError(f"-n must be >= 1 (got {num_images})")
    GenerationOptions(steps=steps, seed=seed).check()
    out = check_output_dir(out)
    model, engines = out / f"model-{size}", out / f"engines-{size}-fp32"
    if not (model / "RANDOM_WEIGHTS.txt").is_file():
        say(f"writing a random-weight {size} checkpoint to {model}")
        write_random_checkpoint(model, size=size, seed=seed, force=model.exists())
    export_all(model, engines, precision="fp32", progress=say)
    runs = out / "images"
    runs.mkdir(parents=True, exist_ok=True)
    k = 1 + max((int(p.name[4:]) for p in runs.glob("run-[0-9][0-9][0-9]")), default=0)
    run_dir = runs / f"run-{k:03d}"
    rc = rt_main(["generate", "--engines", str(engines), "--random-id", "-n", str(num_images), "--seed", str(seed),
                  "--steps", str(steps), "--device", "cpu", "--out", str(run_dir)])
    if rc != 0:
        raise SystemExit(rc)
    return run_dir
