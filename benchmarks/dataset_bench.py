"""`python -m benchmarks dataset`: images/s of `arc2face-rt dataset` against `generate` on the same
engines, in one process with warm sessions, so the difference is the dataset's own overhead
(sharding, batching across identities, PNG/tar writing, manifests, the similarity filter).

- pipeline: the same N x K images generated and kept in memory (`pipeline.generate` per identity,
  nothing encoded or written): what the writing modes would reach if writing cost nothing.
- generate: for each of N random identities, K images written as `arc2face-rt generate` writes
  them (`FolderRun.write`: one `generate` call per batch, PNGs encoded and written by a background
  thread while the next batch is generated).
- dataset-folders, dataset-wds: the same N x K images (other identities and seeds, same work) as an
  ImageFolder tree / WebDataset tars, in-process.
- dataset-filter: dataset-folders with the face models: every image detected, aligned, embedded
  and its cosine recorded (`--models`, no threshold, so the same number of images is written); the
  models are opened and run once before the clock starts.
Each mode runs `repeats` times, interleaved, after an untimed warm-up of up to 4 batches. Two clocks:
wall time (images/s) and this process's CPU time (all threads). On a shared machine the wall time of
one run swings with the other processes' load (recorded), while the CPU time the work itself needs
barely moves, so the overhead is reported on both, from the fastest run of each mode. Per-image
latency = wall seconds / images of the best run.

By default it exports a random-weight checkpoint's fp32 graphs and runs them on the CPU; gpu-check's
`write` phase passes its own export (`engines`, `model_dir`) and `device="cuda"`, where the question is
how close writing gets to `pipeline` once the GPU, not the CPU, sets the pace.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from .export_bench import CACHE, checkpoint

MODES = ("pipeline", "generate", "dataset-folders", "dataset-wds", "dataset-filter")
DATASET_MODES = ("dataset-folders", "dataset-wds", "dataset-filter")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """This process's threads: native id -> (name, CPU seconds so far); {} where psutil or /proc is missing."""
    try:
        import psutil

        threads = psutil.Process().threads()
    except Exception:
        return {}
    main = threading.main_thread().native_id
    out = {}
    for t in threads:
        try:
            name = Path(f"/proc/self/task/{t.id}/comm").read_text().strip()
        except OSError:
            name = "?"
        out[t.id] = ("main" if t.id == main else name, t.user_time + t.system_time)
    return out


def _threads_used(before: dict, after: dict, cpu_s: float) -> list:
    """Where a mode's `cpu_s` of process CPU time went between two `_thread_cpu` snapshots, by thread
    name (ONNX Runtime's and CUDA's threads often share one): [name, threads alive at the end, CPU
    seconds] for the names that used at least 0.05 s, busiest first, then ["(other)", None, the rest]:
    smaller groups and threads that ended in between."""
    groups: dict[str, tuple[int, float]] = {}
    for tid, (name, cpu) in after.items():
        n, used = groups.get(name, (0, 0.0))
        groups[name] = (n + 1, used + cpu - before.get(tid, (name, 0.0))[1])
    rows = [[name, n, round(used, 3)] for name, (n, used) in sorted(groups.items(), key=lambda g: -g[1][1])
            if used >= 0.05]
    return rows + [["(other)", None, round(max(cpu_s - sum(r[2] for r in rows), 0.0), 3)]]


def _pipeline(pipe, n: int, k: int, opts) -> tuple[float, float]:
    from arc2face_rt.pipeline import random_identity

    t0 = _clocks()
    for j in range(n):
        pipe.generate(random_identity(j), k, opts)
    return _since(t0)


def _generate(pipe, out: Path, n: int, k: int, opts) -> tuple[float, float]:
    from arc2face_rt.folder_run import FolderRun
    from arc2face_rt.pipeline import random_identity

    t0 = _clocks()
    for j in range(n):
        FolderRun(out=out / f"id_{j:06d}", count=k).write(pipe, random_identity(j), opts, {}, log=lambda m: None)
    return _since(t0)


def _dataset(pipe, engines: Path, out: Path, n: int, k: int, opts, fmt: str, models: Path | None,
             device: str, warm_image) -> tuple[float, float]:
    """The face models (with `models`) are opened and run once on `warm_image` before the clock starts:
    a run opens them once, not per batch."""
    from arc2face_rt.dataset.identities import random_identities
    from arc2face_rt.dataset.runner import open_output, run_dataset
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.dataset.worker import ShardWorker, WorkerConfig

    spec = DatasetSpec(identities=n, per_identity=k, options=opts, format=fmt, shard_size=max(1, n // 2),
                       score=models is not None)
    config = WorkerConfig(out=out, spec=spec, engines=engines, backend="ort", device=device, models=models)
    ids = random_identities(n, opts.seed)
    worker = ShardWorker(config, ids, pipe=pipe)
    if worker.face is not None:
        worker.similarity(warm_image, 0)
    t0 = _clocks()
    open_output(out, spec, ids, pipe.run_params(), False, log=lambda m: None)
    run_dataset(config, ids, list(range(spec.shards)), worker=worker, log=lambda m: None)
    return _since(t0)


def bench_dataset(size: str = "tiny", identities: int = 8, per_identity: int = 4, steps: int = 25, batch: int = 4,
                  repeats: int = 2, say=print, engines: Path | None = None, model_dir: Path | None = None,
                  device: str = "cpu", guidance: float = 3.0) -> dict:
    """`engines` None: a random-weight `size` checkpoint (or `model_dir`) exported to fp32 in the benchmark
    cache. Given, `engines` runs as it is, with `model_dir`'s face models for the filter mode."""
    from arc2face_rt.manifest import load_manifest
    from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity

    model_dir = checkpoint(model_dir, size, say)
    if engines is None:
        from arc2face_export.onnx_export import export_all
        engines = CACHE / f"engines-{size}-fp32"
        export_all(model_dir, engines, precision="fp32", progress=say)
    precision = load_manifest(engines)["precision"]
    opts = GenerationOptions(steps=steps, guidance=guidance, batch_size=batch)
    images = identities * per_identity
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    threads: list[list] = []                    # per pipeline run: the threads' CPU seconds
    load = {"start": [round(v, 2) for v in os.getloadavg()]}   # other processes on the machine skew wall times
    with Arc2FacePipeline(engines, backend="ort", device=device) as pipe, \
            tempfile.TemporaryDirectory(prefix="arc2face-dataset-bench-") as tmp:
        # warm-up, untimed: up to 4 batches, so that the first mode timed (pipeline) does not pay for the
        # sessions' first runs (memory arenas, kernel choices) more than the others do
        warm = pipe.generate(random_identity(0), min(images, 4 * batch), opts).images[0]
        if per_identity % batch:                                          # and an identity's last batch
            pipe.generate(random_identity(0), per_identity % batch, opts)
        run_params = pipe.run_params()                                     # which graphs ran, where
        for r in range(repeats):
            for mode in MODES:
                out = Path(tmp) / f"{mode}-{r}"
                if mode == "pipeline":
                    before = _thread_cpu()
                    wall, cpu = _pipeline(pipe, identities, per_identity, opts)
                    threads.append(_threads_used(before, _thread_cpu(), cpu))
                elif mode == "generate":
                    wall, cpu = _generate(pipe, out, identities, per_identity, opts)
                else:
                    fmt = "wds" if mode == "dataset-wds" else "folders"
                    wall, cpu = _dataset(pipe, engines, out, identities, per_identity, opts, fmt,
                                         model_dir if mode == "dataset-filter" else None, device, warm)
                runs[mode].append((round(wall, 3), round(cpu, 3)))
                say(f"{mode} run {r + 1}/{repeats}: {images} images in {wall:.1f} s wall, {cpu:.1f} s CPU "
                    f"= {images / wall:.3f} images/s")
                shutil.rmtree(out, ignore_errors=True)
    load["end"] = [round(v, 2) for v in os.getloadavg()]
    wall = {m: min(w for w, _ in v) for m, v in runs.items()}
    cpu = {m: min(c for _, c in v) for m, v in runs.items()}
    rows = {m: {"wall_s": [w for w, _ in v], "cpu_s": [c for _, c in v], "best_wall_s": wall[m],
                "best_cpu_s": cpu[m], "images_per_s": round(images / wall[m], 4),
                "latency_per_image_s": round(wall[m] / images, 4),
                "overhead_vs_generate_pct": {"wall": round((wall[m] / wall["generate"] - 1) * 100, 2),
                                             "cpu": round((cpu[m] / cpu["generate"] - 1) * 100, 2)},
                "images_per_s_vs_pipeline": round(wall["pipeline"] / wall[m], 4)}
            for m, v in runs.items()}
    return {"kind": "dataset", "size": size, "identities": identities, "per_identity": per_identity,
            "images": images, "steps": steps, "batch": batch, "guidance": opts.guidance, "repeats": repeats,
            "backend": f"ort ({device}, {precision})", "engines": str(engines), "run_params": run_params,
            "load_average_1_5_15min": load, "pipeline_threads_cpu_s": threads,
            "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file(), "modes": rows,
            "max_overhead_pct": {k: max(rows[m]["overhead_vs_generate_pct"][k] for m in DATASET_MODES)
                                 for k in ("wall", "cpu")}}
