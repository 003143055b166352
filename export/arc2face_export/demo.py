"""`arc2face-export demo`: the whole job on the built-in default, offline, on a CPU.

random-weight checkpoint -> ONNX export (validated) -> `arc2face-rt generate` on the CPU (ONNX Runtime, or
OpenVINO when installed: `--backend auto`) -> PNG files. Re-running reuses the checkpoint and the export and
writes a new numbered run folder. Random weights give random-looking images: this shows the machinery, not
faces.
"""
from __future__ import annotations

from pathlib import Path


def check_demo_options(size: str = "tiny", num_images: int = 4, seed: int = 0, steps: int = 25) -> None:
    """Refuse every option the demo's generation would refuse, before anything is written."""
    from arc2face_rt.errors import InvalidInputError
    from arc2face_rt.pipeline import GenerationOptions
    from arc2face_rt.schedulers import make_schedule
    from arc2face_rt.specs import DEFAULT_SCHEDULER

    if size not in ("tiny", "full"):
        raise InvalidInputError(f"--size must be tiny or full (got {size!r})")
    if num_images < 1:
        raise InvalidInputError(f"-n must be >= 1 (got {num_images})")
    GenerationOptions(steps=steps, seed=seed).check()
    try:
        make_schedule(DEFAULT_SCHEDULER, steps)         # the demo's checkpoint has the SD1.5 scheduler config
    except InvalidInputError as e:
        raise InvalidInputError(f"--steps {steps}: {e}") from None


def run_demo(out: Path, size: str = "tiny", num_images: int = 4, seed: int = 0, steps: int = 25,
             say=print) -> Path:
    """Write (or reuse) the checkpoint and the export under `out`, then generate into a new run folder.

    Every option is checked first; the generation itself runs `arc2face-rt generate`'s code without
    its exit-code wrapper, so a failure there reaches this command's own error handling."""
    from arc2face_ref.random_ckpt import MARKER, write_random_checkpoint
    from arc2face_rt.atomic import remove_stale_temps
    from arc2face_rt.cli import build_parser as rt_parser
    from arc2face_rt.errors import OutputExistsError
    from arc2face_rt.outputs import check_output_dir

    from .engines_folder import foreign_entry
    from .onnx_export import ExportExistsError, export_all

    check_demo_options(size, num_images, seed, steps)
    out = check_output_dir(out)
    model, engines = out / f"model-{size}", out / f"engines-{size}-fp32"
    remove_stale_temps(engines)                          # what a killed demo's export left there
    if engines.is_dir() and foreign_entry(engines):      # refuse before the checkpoint is written
        raise OutputExistsError(f"{engines}: holds {foreign_entry(engines)}, which arc2face-export does not write: "
                                "it is not an engines folder; choose another --out")
    if model.exists() and not (model / MARKER).is_file() and (not model.is_dir() or any(model.iterdir())):
        raise OutputExistsError(f"{model}: is not a random checkpoint written by arc2face-export (it has no "
                                f"{MARKER}), and the demo writes its model there; choose another --out")
    runs = check_output_dir(out / "images")              # a file there: refused before minutes of export
    if not (model / MARKER).is_file():
        say(f"writing a random-weight {size} checkpoint to {model}")
        write_random_checkpoint(model, size=size, seed=seed, force=model.exists())
    try:
        export_all(model, engines, precision="fp32", progress=say)
    except ExportExistsError:
        # the demo's own folder (anything foreign in it was refused above) holds an export of another
        # checkpoint (its model folder was written again): replaced, as `onnx --force` would
        say(f"{engines}: holds an export of another checkpoint: exporting again")
        export_all(model, engines, precision="fp32", progress=say, force=True)
    runs.mkdir(parents=True, exist_ok=True)
    k = 1 + max((int(p.name[4:]) for p in runs.glob("run-[0-9][0-9][0-9]")), default=0)
    run_dir = runs / f"run-{k:03d}"
    args = rt_parser().parse_args(["generate", "--engines", str(engines), "--random-id", "-n", str(num_images),
                                   "--seed", str(seed), "--steps", str(steps), "--device", "cpu",
                                   "--out", str(run_dir)])
    args.again = "run the demo again (it reuses the export and starts a new run folder)"
    args.func(args)
    return run_dir
