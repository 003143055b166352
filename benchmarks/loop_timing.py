"""Timing one device-resident denoise loop the same way for every GPU phase (`ort`, `quant`)."""
from __future__ import annotations

import statistics
import time

import numpy as np


def time_denoise_loop(sess, sched, cond_one: np.ndarray, batch: int, guidance: float, repeats: int):
    """Run `sess.denoise_loop` on `batch` images of seed-0 noise with `cond_one` repeated: the first
    loop (warm-up and any graph capture included), then `repeats` warm loops, each ending in its one
    host sync. Returns (the first loop's latents, {"first_loop_s", "loop_median_s", "per_step_ms"})."""
    x, cond, table = loop_inputs(sched, cond_one, batch)
    t = time.perf_counter()
    lat = sess.denoise_loop(x, cond, table, guidance)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.denoise_loop(x, cond, table, guidance)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return lat, {"first_loop_s": first, "loop_median_s": med, "per_step_ms": med / len(table) * 1e3}


def loop_inputs(sched, cond_one: np.ndarray, batch: int):
    """(seed-0 noise for images 0..batch-1, `cond_one` repeated, the schedule's coefficient table)."""
    from arc2face_rt.pipeline import image_noise

    x = np.stack([image_noise(0, i, sched)[0] for i in range(batch)])
    return x, np.repeat(cond_one, batch, axis=0), sched.table()


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))
