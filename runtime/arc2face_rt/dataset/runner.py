"""Running a dataset: the output folder checked and claimed (`dataset.json`, `identities.npy`),
committed shards skipped on `--resume`, the rest made in-process or by Ray actors, and
`summary.json` written from the shard manifests.

Layout of DIR: dataset.json (spec + backend, precision, engines id), identities.npy [N, 512], shards/shard-NNNNNN.json
(one per committed shard: every image's identity, index, similarity, kept, file), the images
(`id_NNNNNN/IIII.png`, or `shard-NNNNNN.tar`), summary.json (counts, similarity statistics, throughput).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_write, is_stale_temp, remove_stale_temps, temp_writer, undo_new_folders
from ..errors import InvalidInputError, OutputExistsError
from ..exits import resumable
from ..fileio import loads_json, read_regular_file
from ..npyio import read_npy, save_npy_atomic
from ..outputs import check_output_dir
from ..provenance import RUN_KEYS, as_current
from .spec import DatasetSpec
from .worker import SHARD_FORMAT, SHARDS_DIR, ShardWorker, WorkerConfig, manifest_path

DATASET_FILE, IDENTITIES_FILE, SUMMARY_FILE = "dataset.json", "identities.npy", "summary.json"
DATASET_FORMAT = "arc2face-rt-dataset"
_MAX_JSON = 256 << 20


def _read_json(path: Path, what: str) -> dict:
    try:
        d = loads_json(read_regular_file(path, _MAX_JSON, what=what, fix="move it away or choose another --out"))
    except ValueError:
        d = None
    if not isinstance(d, dict):
        raise InvalidInputError(f"{path}: is not a {what} arc2face-rt wrote; move it away or choose another --out")
    return d


def _differences(got, want, where: str = "") -> list[str]:
    """Every recorded setting that differs, as "key: X there, Y now", nested keys dotted."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [d for k in sorted(set(got) | set(want))
                for d in _differences(got.get(k), want.get(k), f"{where}.{k}" if where else k)]
    return [] if got == want else [f"{where}: {got!r} there, {want!r} now"]


def _comparable(there: dict, now: dict) -> tuple[dict, dict]:
    """Two records as a --resume compares them: the spec's image format named where it is PNG
    (`DatasetSpec.to_json` leaves it out, so a refusal says "'png' there, 'jpg' now", not None), and
    settings that take no effect left out (the JPEG quality where either side is PNG; --on-reject and
    --max-tries without --min-similarity, --max-tries without regenerate, which older versions
    accepted and recorded and this one refuses)."""
    if not ("face_models" in there and "face_models" in now):   # recorded since; read before the models open
        there, now = ({k: v for k, v in r.items() if k != "face_models"} for r in (there, now))
    specs = [r.get("spec") for r in (there, now)]
    if not all(isinstance(s, dict) for s in specs):
        return there, now
    specs = [{"image_format": "png", **s} for s in specs]
    png = any(s["image_format"] == "png" for s in specs)

    def kept(spec: dict) -> dict:
        moot = {"jpeg_quality"} if png else set()
        if spec.get("min_similarity") is None:
            moot |= {"on_reject", "max_tries"}
        elif spec.get("on_reject") != "regenerate":
            moot.add("max_tries")
        return {k: v for k, v in spec.items() if k not in moot}
    return {**there, "spec": kept(specs[0])}, {**now, "spec": kept(specs[1])}


def dataset_record(spec: DatasetSpec, run: dict) -> dict:
    """What dataset.json holds: the spec and how the pixels are made and scored (`ShardWorker.record`:
    backend, precision, engine id and, ONNX Runtime on a GPU, device, fused graphs, TF32; with --models
    the face models' `face_models`)."""
    return {"format": DATASET_FORMAT, "format_version": 1, "spec": spec.to_json(), **run}


def recorded_run(out: Path) -> dict | None:
    """The run record (`provenance.RUN_KEYS`) of the dataset in `out`, None where there is none yet."""
    meta = out / DATASET_FILE
    there = _read_json(meta, "dataset description") if meta.exists() else {}
    return {k: there[k] for k in RUN_KEYS if k in there} or None


def check_output(out: Path, spec: DatasetSpec, identities: np.ndarray, run: dict | None, resume: bool,
                 legacy_engines: str | None = None) -> None:
    """Refuse what `open_output` would refuse about a dataset already in `out`, reading only: `dataset`
    calls it before any graph is opened. A dataset.json from before backend and precision were recorded
    is refused with the fields to add once its images (`read_params`) show they match; its engine id may
    be the older name of the same graphs (`legacy_engines`: `provenance.legacy_engine_id`). `run` None
    (`--ray`: the driver opens no graph, its actors resolve the record): everything but the record. A
    `run` without `face_models` (the check before they are open) leaves them out of the comparison."""
    check_output_dir(out)
    meta, ids_file = out / DATASET_FILE, out / IDENTITIES_FILE
    if not meta.exists():
        return
    if not resume:
        raise OutputExistsError(f"{out}: holds a dataset already; pass --resume to finish it, or choose another --out")
    there = _read_json(meta, "dataset description")
    if not isinstance(there.get("spec"), dict):
        raise InvalidInputError(f"{meta}: is not a dataset description arc2face-rt wrote (it records no spec: "
                                "damaged); move it away or choose another --out")
    if run is None and "backend" not in there:
        raise InvalidInputError(f"{meta}: does not record the backend and precision its images were made with (an "
                                "older arc2face-rt), which --ray actors cannot be checked against: --resume it once "
                                "without --ray (which says what to add), or use another --out")
    record = dataset_record(spec, run if run is not None else {k: there[k] for k in RUN_KEYS if k in there})
    there = as_current(there, record, legacy_engines)
    if "backend" not in there and there.get("engines") != record["engines"]:
        raise InvalidInputError(f"{meta}: was made by an older arc2face-rt with other graphs than this run loads "
                                f"(engines: {there.get('engines')!r} there, {record['engines']!r} now), and does not "
                                "record enough to continue it: use another --out")
    if "backend" not in there:
        fields = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in record.items() if k in RUN_KEYS and k != "engines")
        raise InvalidInputError(f"{meta}: does not record the backend and precision its images were made with (an "
                                "older arc2face-rt); if its images' read_params show this run's backend and precision "
                                "and they were made on this kind of machine (older images record no device), add "
                                f"these fields to it: {fields}, and --resume again; otherwise use another --out")
    diffs = _differences(*_comparable(there, record))
    if diffs:
        raise InvalidInputError(f"{meta}: this dataset was made with other settings ({'; '.join(diffs)}); --resume only "
                                "continues the same run: use the same flags, engines and machine kind, or another --out")
    if not ids_file.exists() and committed_shards(out, spec, check_files=False):
        raise InvalidInputError(f"{ids_file}: is missing, and shards are committed: the identities their images were "
                                "made from cannot be checked against this run's; put it back, or use another --out")
    if ids_file.exists() and not np.array_equal(read_npy(ids_file, identities.nbytes + 4096), identities):
        raise InvalidInputError(f"{ids_file}: other identities than this run's; --resume only continues "
                                "the same run: use the same --identities, --seed and --max-id-similarity (or "
                                "--identities-from file), or another --out")


def open_output(out: Path, spec: DatasetSpec, identities: np.ndarray, run: dict, resume: bool,
                log: Callable[[str], None], legacy_engines: str | None = None) -> set[int]:
    """Claim `out` for this dataset (or check that it holds this very dataset, with --resume) and
    return the shards already committed. `run`: the workers' `ShardWorker.record`. Every check comes
    before the first write: a refused command leaves `out` as it was (absent if it was absent)."""
    check_output(out, spec, identities, run, resume, legacy_engines)
    meta, ids_file = out / DATASET_FILE, out / IDENTITIES_FILE
    if meta.exists():
        done = committed_shards(out, spec)
        if not ids_file.exists():
            save_npy_atomic(ids_file, identities)
    else:
        if out.is_dir():
            _refuse_occupied(out)
        done = set()
        with undo_new_folders(out):         # a failure here (a full disk) leaves no folder and no dataset behind
            atomic_write(meta, json.dumps(dataset_record(spec, run), indent=1).encode())    # the claim: written once
            try:
                save_npy_atomic(ids_file, identities)
                (out / SHARDS_DIR).mkdir(exist_ok=True)
            except BaseException:
                meta.unlink(missing_ok=True)    # else a rerun is told to --resume a dataset without identities
                raise
    removed = remove_stale_temps(out) + remove_stale_temps(out / SHARDS_DIR)
    if removed:
        log(f"removed {removed} unfinished shard file(s) an interrupted run left in {out}")
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    return done


def _refuse_occupied(out: Path) -> None:
    """OutputExistsError unless `out` (a folder without a dataset) is empty but for temporary files whose
    writer is gone. Another host's is only known gone after a day: until then it is named, with its writer."""
    left = sorted(e.name for e in os.scandir(out) if not (e.name.endswith(".tmp") and is_stale_temp(Path(e.path))))
    if not left:
        return
    writers = [temp_writer(name) for name in left]
    if all(writers):
        writers = sorted(set(writers))
        raise OutputExistsError(f"--out {out}: holds {left[0]}{f' and {len(left) - 1} more' if len(left) > 1 else ''}, "
                                f"unfinished output of {'a run' if len(writers) == 1 else 'runs'} "
                                f"({'; '.join(writers)}) still writing or stopped; if none runs, delete them (a run "
                                "here removes another host's a day after their last change) or choose a new --out")
    raise OutputExistsError(f"--out {out}: is not empty and holds no arc2face-rt dataset; choose a new or "
                            "empty folder")


def pending_shards(out: Path, spec: DatasetSpec, resume: bool) -> int:
    """How many shards a run on `out` has left to make (read only: `open_output` checks the rest)."""
    done = committed_shards(out, spec, check_files=False) if resume and (out / DATASET_FILE).exists() else ()
    return spec.shards - len(done)


def committed_shards(out: Path, spec: DatasetSpec, check_files: bool = True) -> set[int]:
    """Shards whose manifest exists (written last, after the images were in place); with `check_files`,
    each one's images must still be there (see `_check_shard_files`)."""
    done = set()
    names = set(os.listdir(out / SHARDS_DIR)) if (out / SHARDS_DIR).is_dir() else set()
    for s in range(spec.shards):
        p = manifest_path(out, s)
        if p.name not in names:
            continue
        m = _read_json(p, "shard manifest")
        if m.get("format") != SHARD_FORMAT or m.get("shard") != s:
            raise InvalidInputError(f"{p}: is not shard {s}'s manifest; move it away or choose another --out")
        if check_files:
            _check_shard_files(out, spec, s, p, m)
        done.add(s)
    return done


def _check_shard_files(out: Path, spec: DatasetSpec, s: int, p: Path, m: dict) -> None:
    """Refuse a committed shard whose images are gone or damaged: its tar missing or of another size
    than the manifest records, or (folders) a file the manifest lists missing or of another size (a
    manifest from before sizes were recorded: missing only); one directory scan per identity folder, no
    file is read. Such a shard is not redone behind the user's back: the message says what to move away
    so that --resume makes it again (the shard's intact identity folders can stay: the redone shard's
    commit finds them byte-identical and keeps them)."""
    again = "and run with --resume to make the shard again"
    not_manifest = InvalidInputError(f"{p}: is not shard {s}'s manifest; move it away or choose another --out")
    if spec.format == "wds":
        tar, size = m.get("tar"), m.get("bytes")
        if not isinstance(tar, str) or isinstance(size, bool) or not isinstance(size, int):
            raise not_manifest
        try:
            got = (out / tar).stat().st_size
        except FileNotFoundError:
            raise InvalidInputError(f"{out / tar}: is missing, though {p} records it; move {p} away {again}") from None
        if got != size:
            raise InvalidInputError(f"{out / tar}: has {got} bytes, its manifest records {size}; move it and {p} "
                                    f"away {again}")
        return
    files, sizes = m.get("files"), m.get("bytes", None)
    if not isinstance(files, list) or not all(isinstance(f, str) and f.count("/") == 1 for f in files):
        raise not_manifest
    if sizes is None:
        sizes = [None] * len(files)
    elif not (isinstance(sizes, list) and len(sizes) == len(files) and
              all(isinstance(n, int) and not isinstance(n, bool) for n in sizes)):
        raise not_manifest
    by_dir: dict[str, dict[str, int | None]] = {}
    for f, size in zip(files, sizes):
        d, name = f.split("/")
        by_dir.setdefault(d, {})[name] = size
    first, damaged = None, []
    for d, wanted in by_dir.items():
        try:
            with os.scandir(out / d) as it:
                there = {e.name: e for e in it}
        except (FileNotFoundError, NotADirectoryError):
            there = {}
        bad = []
        for name, size in wanted.items():
            if name not in there:
                bad.append(f"{out / d / name}: is missing, though {p} lists it")
            elif size is not None and (got := there[name].stat(follow_symlinks=False).st_size) != size:
                bad.append(f"{out / d / name}: has {got} bytes, {p} records {size} (truncated or replaced)")
        if bad:
            first = first or bad[0]
            damaged.append(d if there else None)
    if first:
        folders = [d for d in damaged if d]
        also = f" and {', '.join(str(out / d) for d in folders)}" if folders else ""
        raise InvalidInputError(f"{first} ({len(damaged)} identity folder(s) of shard {s} lack files or hold "
                                f"damaged ones); move {p}{also} away {again}")


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, np.float64)
    q = np.percentile(v, [5, 50, 95])
    return {"count": len(v), "mean": round(float(v.mean()), 6), "std": round(float(v.std()), 6),
            "min": round(float(v.min()), 6), "p05": round(float(q[0]), 6), "p50": round(float(q[1]), 6),
            "p95": round(float(q[2]), 6), "max": round(float(v.max()), 6)}


def summarize(out: Path, spec: DatasetSpec, run: dict) -> dict:
    """summary.json from every committed shard's manifest plus this run's throughput."""
    counts, kept_per_id, sims, kept_sims = Counter(), Counter(), [], []
    done = sorted(committed_shards(out, spec, check_files=False))     # checked when the run began
    for s in done:
        m = _read_json(manifest_path(out, s), "shard manifest")
        counts.update(m["counts"])
        for r in m["images"]:
            kept_per_id[r["identity"]] += r["kept"]
            if r["similarity"] is not None:
                sims.append(r["similarity"])
                if r["kept"]:
                    kept_sims.append(r["similarity"])
    made = [j for s in done for j in spec.shard_identities(s)]
    summary = {"format": "arc2face-rt-dataset-summary", "complete": len(done) == spec.shards,
               "shards": {"committed": len(done), "total": spec.shards},
               "identities": {"total": spec.identities, "made": len(made),
                              "short": sum(kept_per_id[j] < spec.per_identity for j in made)},
               "images": {k: counts[k] for k in ("generated", "kept", "dropped", "no_face")},
               "similarity": {"all": _stats(sims), "kept": _stats(kept_sims), "min_similarity": spec.min_similarity},
               "this_run": run}
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=1).encode(), overwrite=True)
    return summary


def run_dataset(config: WorkerConfig, identities: np.ndarray, todo: list[int], pipe=None, ray: str | None = None,
                actors: list | None = None, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                progress=None, worker: ShardWorker | None = None, record: dict | None = None) -> dict:
    """Make the shards `todo` (in-process with `worker`, or a new one on `pipe`; or on the Ray `actors`
    of `ray_runner.ray_actors`, `ray` naming the address, each shard checked against the run `record`
    they resolved), then write summary.json; returns it.
    `progress(total_images)` returns a tqdm-like bar."""
    spec = config.spec
    bar = progress(sum(len(spec.shard_identities(s)) for s in todo) * spec.per_identity) if progress else None
    t0, made, per_worker = time.perf_counter(), 0, Counter()
    kept = lambda: f"committed shards are complete and kept in {config.out}, no unfinished one is visible"  # noqa: E731
    with resumable(kept, log, bar):
        if ray is None:
            worker = worker or ShardWorker(config, identities, pipe=pipe)
            for s in todo:
                if bar:
                    bar.set_postfix_str(f"shard {s} ({len(spec.shard_identities(s))} identities)", refresh=False)
                m = worker.run(s, progress=bar.update if bar else None)
                made += m["counts"]["generated"]
        else:
            from .ray_runner import run_on_ray

            for m in run_on_ray(actors, todo, record):
                made += m["counts"]["generated"]
                per_worker[m["run"]["worker"]] += 1
                if bar:
                    bar.update(m["counts"]["generated"])
                    bar.set_postfix_str(f"{len(per_worker)} worker(s), last: shard {m['shard']} by {m['run']['worker']}")
    seconds = time.perf_counter() - t0
    run = {"shards": len(todo), "images_generated": made, "seconds": round(seconds, 3),
           "images_per_s": round(made / seconds, 4) if seconds > 0 and made else None,
           "ray": ray, "workers": dict(per_worker) if ray else 1}
    return summarize(config.out, spec, run)
