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
        # Each session's CPU arena keeps its own peak. ARC2FACE_ORT_SHRINK_ARENA=1 gives it back after
        # every run: full size fp32, step + VAE decode peak at 6.1 GiB instead of 10.2 GiB, but each
        # denoise step is about 35% slower (2-core Xeon; benchmarks/README.md), so it is opt-in.
        self._run_options = ort.RunOptions()
        if self.providers[0] == "CPUExecutionProvider" and os.environ.get("ARC2FACE_ORT_SHRINK_ARENA") == "1":
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.path = path
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.inputs = {i.name: i for i in self._sess.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, feeds, self._run_options)
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self._sess = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OrtStepSession(OrtSession):
    """A step graph whose latents stay on the execution device for the whole loop (I/O binding).

    With the CUDA execution provider this keeps x, m_prev, cond and the noise on the GPU: each step
    binds the previous step's output OrtValues as inputs, and only the final latents come back. The
    pipeline uses it for step stages when CUDA is present (on a CPU the plain loop is as fast and
    reports progress per step); it works on any provider, which is how it is tested here.
    """

    def __init__(self, path, device: str = "auto", threads: int | None = None):
        super().__init__(path, device=device, threads=threads)
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _value(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32), self.device_type, 0)

    def denoise_loop(self, x: np.ndarray, cond: np.ndarray, table: np.ndarray, guidance: float | None = None,
                     noise: np.ndarray | None = None) -> np.ndarray:
        """x [B,4,64,64], cond [B,77,768], table [N,8], noise [N,B,4,64,64] or None -> final latents."""
        cfg = "guidance" in self.input_names
        if cfg != (guidance is not None):
            raise ValueError(f"{self.path.name}: guidance must be {'given' if cfg else 'None'} for this graph")
        xv, mv = self._value(x), self._value(np.zeros_like(x))
        condv = self._value(cond)
        zeros = mv
        noisev = [self._value(n) for n in noise] if noise is not None else None
        binding = self._sess.io_binding()
        if cfg:
            binding.bind_cpu_input("guidance", np.array([guidance], np.float32))
        binding.bind_ortvalue_input("cond", condv)
        for k in range(table.shape[0]):
            binding.bind_ortvalue_input("x", xv)
            binding.bind_ortvalue_input("m_prev", mv)
            binding.bind_ortvalue_input("noise", noisev[k] if noisev else zeros)
            binding.bind_cpu_input("coeffs", np.ascontiguousarray(table[k], np.float32))
            for name in self.output_names:
                binding.bind_output(name, self.device_type)
            self._sess.run_with_iobinding(binding, self._run_options)
            outs = dict(zip(self.output_names, binding.get_outputs()))
            xv, mv = outs["x_out"], outs["m0"]
            binding.clear_binding_outputs()
        return xv.numpy()
