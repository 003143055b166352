"""Cost of verifying an engines folder against its manifest (`arc2face_rt.integrity`).

- first: no stamps yet, every file hashed. Measured twice: with the files evicted from the page
  cache first (posix_fadvise DONTNEED, what a fresh boot sees) and with them cached.
- later: stamps present, each file only stat()ed: verify_records alone, and the whole
  `Arc2FacePipeline(...)` open (manifest read and schema check + verification; no graph loaded),
  with verification on and off. Medians over `repeats` runs.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def _evict(paths) -> bool:
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def _median_ms(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2), "repeats": repeats}


def bench_verify(engines: Path, repeats: int = 20, say=print) -> dict:
    from arc2face_rt.integrity import verify_records
    from arc2face_rt.manifest import load_manifest, record_files
    from arc2face_rt.pipeline import Arc2FacePipeline

    engines = Path(engines)
    m = load_manifest(engines)
    files = {rel: r for rec in m["stages"].values() for rel, r in record_files(rec).items()}
    total = sum(r["bytes"] for r in files.values())
    out = {"kind": "verify", "engines": str(engines), "precision": m["precision"],
           "random_weights": bool(m.get("source", {}).get("random_weights")), "files": len(files),
           "bytes": total}
    old = os.environ.get("ARC2FACE_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ARC2FACE_CACHE_DIR"] = cache
        try:
            first = {}
            for label in ("evicted", "cached"):
                for p in Path(cache).rglob("*.json"):
                    p.unlink()
                evicted = _evict(engines / rel for rel in files) if label == "evicted" else False
                t = time.perf_counter()
                rep = verify_records(engines, files, mode="stamp")
                s = time.perf_counter() - t
                first[label] = {"seconds": round(s, 2), "hashed_files": rep.hashed, "GB_per_s": round(total / 1e9 / s, 2)}
                if label == "evicted":
                    first[label]["page_cache_evicted"] = evicted
                say(f"first verification ({label}): {s:.1f} s for {total / 1e9:.2f} GB")
            out["first"] = first
            out["later_verify_records"] = _median_ms(lambda: verify_records(engines, files, mode="stamp"), repeats)
            out["later_pipeline_open"] = {
                "verify": _median_ms(lambda: Arc2FacePipeline(engines, backend="ort", device="cpu").close(), repeats),
                "no_verify": _median_ms(lambda: Arc2FacePipeline(engines, backend="ort", device="cpu",
                                                                 verify=False).close(), repeats)}
            say(f"later: verify_records {out['later_verify_records']['median_ms']} ms, pipeline open "
                f"{out['later_pipeline_open']['verify']['median_ms']} ms "
                f"(no verify {out['later_pipeline_open']['no_verify']['median_ms']} ms)")
        finally:
            if old is None:
                os.environ.pop("ARC2FACE_CACHE_DIR", None)
            else:
                os.environ["ARC2FACE_CACHE_DIR"] = old
    return out
