"""What CUDA-graph capture costs and saves, measured with the simulated TensorRT engine on a GPU.

The simulated engine of tests/ (`sim_trt.fake_trt` with `sim_cupy.CupyKernels`: small elementwise
kernels, so the loop is launch-bound) runs under the real TrtStepSession. For each batch this times
the first loop of a signature (warm-up enqueue + stream capture + graph instantiation), graph replays
and plain enqueues of the same N steps, each to the host sync that ends it. It measures our loop
machinery, not a UNet: the numbers bound the per-step launch overhead that the graph removes.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import env


def measure_sim_loop(steps: int = 25, batches=(1, 4, 16), repeats: int = 20) -> dict:
    sys.path.insert(0, str(env.REPO / "tests"))
    from sim_cupy import CupyKernels
    from sim_trt import fake_trt, make_sim_engines

    from arc2face_rt.backends import cuda
    from arc2face_rt.backends.trt import TrtStepSession
    from arc2face_rt.backends.trt import plan as trt_plan

    cc = cuda.compute_capability()
    trt = fake_trt(CupyKernels(), name="tensorrt", version="simulated", ccs=(cc,))
    real_import, trt_plan.import_trt = trt_plan.import_trt, lambda: trt
    out = {"steps": steps, "repeats": repeats, "gpu": cuda.device_name(), "compute_capability": cc, "batches": {}}
    try:
        with tempfile.TemporaryDirectory() as d:
            engines = make_sim_engines(Path(d), trt, ccs=(cc,))
            graph = TrtStepSession(engines / "step_cfg.plan", mode="graph")
            plain = TrtStepSession(engines / "step_cfg.plan", mode="plain")
            rng = np.random.default_rng(0)
            for b in batches:
                x = rng.standard_normal((b, 4, 64, 64)).astype(np.float32)
                cond = rng.standard_normal((b, 77, 768)).astype(np.float32)
                table = np.tile(np.array([[500, 1, 1, -0.2, 0.6, 0.4, 0.05, 0]], np.float32), (steps, 1))
                res = {}
                for name, sess in (("graph", graph), ("plain", plain)):
                    st, stream = sess.loop_state(b, steps, False), sess.loop_stream
                    sess.upload_inputs(st, stream, x=x, cond=cond, table=sess.padded_table(table),
                                       guidance=np.array([3.0], np.float32))
                    t = time.perf_counter()
                    sess.enqueue_loop(st, stream)
                    cuda.synchronize(stream)
                    first = time.perf_counter() - t
                    times = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        sess.enqueue_loop(st, stream)
                        cuda.synchronize(stream)
                        times.append(time.perf_counter() - t)
                    res[name] = {"first_loop_s": first, "loop_median_s": statistics.median(times),
                                 "loop_min_s": min(times)}
                res["graph"]["capture_included_in_first_loop"] = True
                res["plain_minus_graph_per_step_us"] = (res["plain"]["loop_median_s"]
                                                        - res["graph"]["loop_median_s"]) / steps * 1e6
                out["batches"][str(b)] = res
            graph.close()
            plain.close()
    finally:
        trt_plan.import_trt = real_import
    return out
