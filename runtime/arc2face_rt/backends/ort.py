"""ONNX Runtime backend: CPU everywhere, CUDA execution provider when onnxruntime-gpu is installed."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineMismatchError


def ort_providers(device: str = "auto") -> list[str]:
    """Execution providers for `device` in {"auto", "cpu", "cuda"}; "auto" takes CUDA when present."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in have:
        raise BackendUnavailableError(
            "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu "
            "(instead of onnxruntime) or use --device cpu")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSession:
    """One ONNX graph in an onnxruntime InferenceSession."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise EngineMismatchError(f"{path}: ONNX file missing; run `arc2face-export onnx` to write it")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads or os.environ.get("ARC2FACE_ORT_THREADS"):
            opts.intra_op_num_threads = int(threads or os.environ["ARC2FACE_ORT_THREADS"])
        self.providers = ort_providers(device)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineMismatchError(f"{path}: ONNX Runtime cannot load it ({e}); "
                                      "re-export it with `arc2face-export onnx`") from e
        self.path = path
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.inputs = {i.name: i for i in self._sess.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self._sess = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
