"""TensorRT's view of an ONNX graph: parsing into a strongly typed network, and its inputs/outputs
written as the stage specs write them (batch axis "B"), and the builder's progress monitor. No GPU
needed; used by the plan builder (`trt_build`) and by the face stages (`face_plans`).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from arc2face_rt import exits
from arc2face_rt.backends.trt.plan import dtype_name, import_trt as _import_trt, make_logger
from arc2face_rt.errors import EngineMismatchError

log = logging.getLogger("arc2face_export.trt_build")     # the build's progress lines, under its name


def import_trt():
    """The TensorRT library for building plans; without one, the error says what works without plans."""
    return _import_trt(otherwise="or go without plans: `generate --backend ort` (or openvino) runs the ONNX graphs "
                                 "that `arc2face-export onnx` writes")


def parse_onnx(trt, onnx_path: Path, logger=None):
    """(builder, network, parser, logger) for a strongly typed network parsed from `onnx_path`; keep
    all four alive together (TensorRT holds pointers between them). External data (`*.onnx.data`)
    is read from the ONNX file's folder."""
    logger = logger or make_logger(trt)
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineMismatchError(f"{onnx_path}: TensorRT's ONNX parser failed ({errors}); re-export it with `arc2face-export onnx`")
    return builder, network, parser, logger


def network_io(network) -> dict:
    """{"inputs": [[name, dtype, shape]], "outputs": [...]} with -1 written as "B" on axis 0, as the specs do."""
    def rec(t):
        shape = [("B" if (d == -1 and i == 0) else int(d)) for i, d in enumerate(t.shape)]
        return [t.name, dtype_name(t.dtype), shape]
    return {"inputs": [rec(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [rec(network.get_output(i)) for i in range(network.num_outputs)]}


def onnx_io(onnx_path: str | Path) -> dict:
    """The I/O of an ONNX graph as TensorRT's parser sees it (no GPU needed); see `network_io`."""
    trt = import_trt()
    _, network, _, _ = parse_onnx(trt, Path(onnx_path))
    return network_io(network)


def spec_io(spec) -> dict:
    def rec(t):
        return [t.name, t.dtype, list(t.shape)]
    return {"inputs": [rec(t) for t in spec.inputs], "outputs": [rec(t) for t in spec.outputs]}


def check_network_against_spec(network, spec, onnx_path: Path) -> None:
    """Names, dtypes and shapes of the parsed network must be the spec's (order-insensitive)."""
    got, want = network_io(network), spec_io(spec)
    for kind in ("inputs", "outputs"):
        g = {r[0]: r for r in got[kind]}
        w = {r[0]: r for r in want[kind]}
        if g != w:
            raise EngineMismatchError(
                f"{onnx_path}: {kind} {sorted(g.values())} differ from stage spec '{spec.name}' {sorted(w.values())}; "
                "re-export the folder with `arc2face-export onnx --force`")


def progress_monitor(trt):
    """An IProgressMonitor that logs phase starts/ends (indented by depth) to the build's logger, and
    cancels the build once a Ctrl-C or SIGTERM has arrived (see `exits.holding_stops`)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._depth: dict[str, int] = {}
            self._t0: dict[str, float] = {}
            self._lock = threading.Lock()   # TensorRT may call from several threads

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                d = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._t0[phase_name] = d, time.perf_counter()
                log.log(logging.INFO if d <= 1 else logging.DEBUG, "%s%s (%d steps)", "  " * (d + 1), phase_name, num_steps)

        def step_complete(self, phase_name, step):
            return not exits.stop_requested()      # False cancels the build: Ctrl-C stops it at once

        def phase_finish(self, phase_name):
            with self._lock:
                d = self._depth.pop(phase_name, 0)
                dt = time.perf_counter() - self._t0.pop(phase_name, time.perf_counter())
                if dt > 1.0:
                    log.info("%s%s done in %.1f s", "  " * (d + 1), phase_name, dt)

    return Monitor()
