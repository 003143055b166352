"""`python -m benchmarks dataset`: images/s of `arc2face-rt dataset` against `generate` on the same
engines, in one process with warm sessions, so the difference is the dataset's own overhead
(sharding, batching across identities, PNG/tar writing, manifests, the similarity filter).

- generate: for each of N random identities, K images written as `arc2face-rt generate` writes
  them (`FolderRun.write`: one `generate` call per batch, PNGs).
- dataset-folders, dataset-wds: the same N x K images (other identities and seeds, same work) as an
  ImageFolder tree / WebDataset tars, in-process.
- dataset-filter: dataset-folders with the face models: every image detected, aligned, embedded
  and its cosine recorded (`--models`, no threshold, so the same number of images is written).
Each mode runs `repeats` times, interleaved; the fastest run of each is compared (the machine is
shared, so the fastest is the least disturbed). Per-image latency = 1 / images/s of the best run.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .export_bench import CACHE

MODES = ("generate", "dataset-folders", "dataset-wds", "dataset-filter")


def _generate(pipe, out: Path, n: int, k: int, opts) -> float:
    from arc2face_rt.folder_run import FolderRun
    from arc2face_rt.pipeline import random_identity

    t0 = time.perf_counter()
    for j in range(n):
        FolderRun(out=out / f"id_{j:06d}", count=k).write(pipe, random_identity(j), opts, {}, log=lambda m: None)
    return time.perf_counter() - t0


def _dataset(pipe, engines: Path, out: Path, n: int, k: int, opts, fmt: str, models: Path | None) -> float:
    from arc2face_rt.dataset.identities import random_identities
    from arc2face_rt.dataset.runner import open_output, run_dataset
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.dataset.worker import WorkerConfig

    spec = DatasetSpec(identities=n, per_identity=k, options=opts, format=fmt, shard_size=max(1, n // 2),
                       score=models is not None)
    config = WorkerConfig(out=out, spec=spec, engines=engines, backend="ort", device="cpu", models=models)
    t0 = time.perf_counter()
    ids = random_identities(n, opts.seed)
    open_output(out, spec, ids, pipe.engine_id, False, log=lambda m: None)
    run_dataset(config, ids, list(range(spec.shards)), pipe=pipe, log=lambda m: None)
    return time.perf_counter() - t0


def bench_dataset(size: str = "tiny", identities: int = 8, per_identity: int = 4, steps: int = 25, batch: int = 4,
                  repeats: int = 2, say=print) -> dict:
    from arc2face_export.onnx_export import export_all
    from arc2face_ref.random_ckpt import write_random_checkpoint
    from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

    model_dir = CACHE / f"model-{size}"
    if not (model_dir / "arc2face").is_dir():
        say(f"writing a random-weight {size} checkpoint to {model_dir}")
        write_random_checkpoint(model_dir, size=size, seed=0, force=model_dir.exists())
    engines = CACHE / f"engines-{size}-fp32"
    export_all(model_dir, engines, precision="fp32", progress=say)
    opts = GenerationOptions(steps=steps, batch_size=batch)
    images = identities * per_identity
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    with Arc2FacePipeline(engines, backend="ort", device="cpu") as pipe, \
            tempfile.TemporaryDirectory(prefix="arc2face-dataset-bench-") as tmp:
        pipe.generate(random_identity(0), 1, opts)                        # warm-up, untimed
        for r in range(repeats):
            for mode in MODES:
                out = Path(tmp) / f"{mode}-{r}"
                if mode == "generate":
                    s = _generate(pipe, out, identities, per_identity, opts)
                else:
                    s = _dataset(pipe, engines, out, identities, per_identity, opts, mode.split("-")[1].replace(
                        "filter", "folders"), model_dir if mode == "dataset-filter" else None)
                runs[mode].append(round(s, 3))
                say(f"{mode} run {r + 1}/{repeats}: {images} images in {s:.1f} s = {images / s:.3f} images/s")
                shutil.rmtree(out)
    best = {m: min(v) for m, v in runs.items()}
    base = best["generate"]
    rows = {m: {"seconds": v, "best_s": best[m], "images_per_s": round(images / best[m], 4),
                "latency_per_image_s": round(best[m] / images, 4),
                "overhead_vs_generate_pct": round((best[m] / base - 1) * 100, 2)} for m, v in runs.items()}
    return {"kind": "dataset", "size": size, "identities": identities, "per_identity": per_identity,
            "images": images, "steps": steps, "batch": batch, "guidance": opts.guidance, "repeats": repeats,
            "backend": "ort (CPU, fp32)", "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file(),
            "modes": rows, "max_overhead_pct": max(r["overhead_vs_generate_pct"] for m, r in rows.items()
                                                   if m != "generate")}
