"""ONNX Runtime backend: CPU everywhere, CUDA execution provider when onnxruntime-gpu is installed.

Where a session runs is what ONNX Runtime reports (`InferenceSession.get_providers()`), not what was
asked for: onnxruntime-gpu silently falls back to the CPU when the CUDA or cuDNN libraries it was
built against fail to load. `--device cuda` then stops with an error naming the fix; `--device auto`
logs a warning and runs on the CPU. onnxruntime-gpu 1.31 on PyPI is a CUDA 13 / cuDNN 9 build; it
loads those libraries from the `nvidia-*` wheels (a CUDA 13 torch brings them, or
`pip install 'onnxruntime-gpu[cuda,cudnn]'`) through `onnxruntime.preload_dlls()`, called here
before the first CUDA session.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..argtypes import env_threads
from ..errors import (BackendUnavailableError, EngineMismatchError, InvalidInputError, raise_if_out_of_memory)
from ..errors import first_line as _first_line

log = logging.getLogger("arc2face_rt.backends.ort")

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
_preloaded = False


def ort_providers(device: str = "auto") -> list[str]:
    """Execution providers to ask for, for `device` in {"auto", "cpu", "cuda"}; "auto" takes CUDA
    when this onnxruntime has it."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device == "cpu":
        return [CPU_EP]
    if device == "cuda" and CUDA_EP not in have:
        raise BackendUnavailableError(
            "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu "
            "(instead of onnxruntime) or use --device cpu")
    if device in ("cuda", "auto") and CUDA_EP in have:
        return [CUDA_EP, CPU_EP]
    return [CPU_EP]


CONV_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def conv_search() -> str:
    """cuDNN's convolution algorithm search for the CUDA provider (ARC2FACE_ORT_CONV_SEARCH, default HEURISTIC)."""
    value = os.environ.get("ARC2FACE_ORT_CONV_SEARCH", "HEURISTIC").upper()
    if value not in CONV_SEARCHES:
        raise BackendUnavailableError(f"ARC2FACE_ORT_CONV_SEARCH={value!r}: use one of {', '.join(CONV_SEARCHES)}")
    return value


FUSED_SUFFIX = ".ort-cuda.onnx"        # `arc2face-export onnx --ort-cuda`: fp16, NHWC convolutions


def cuda_provider_options(fused: bool = False) -> dict:
    """The CUDA execution provider's options from the environment, for a plain graph or (`fused`) one of
    the `--ort-cuda` graphs.

    - `use_tf32`: fp32 graphs stay fp32 on the GPU (TF32 matmuls would cost the one-grey-level parity
      with the CPU); ARC2FACE_ORT_TF32=1 allows TF32. With it off, ONNX Runtime's cuDNN convolutions
      (its `nn/conv.cc`) ask for plans without tensor cores, also in fp16 graphs, and retry with tensor
      cores where cuDNN has none (most of them: the H200 log shows the refusals).
    - `cudnn_conv_algo_search`: heuristic, not ONNX Runtime's default exhaustive search: the full fp16
      VAE decode took 92 ms with EXHAUSTIVE and 20 ms with HEURISTIC on an H200 (ORT 1.31,
      benchmarks/results/gpu-check-ort-20261126T012714Z.json). ARC2FACE_ORT_CONV_SEARCH overrides it.
    - `fuse_conv_bias`, for the fused graphs only and only with ARC2FACE_ORT_FUSE_CONV_BIAS=1: each
      convolution's bias added inside cuDNN's convolution instead of by a second kernel (9% of a fused
      fp16 CFG step at batch 4 and 18% of the fused VAE decode on an H200). Not the default: on an H200
      it made the fused step (CUDA graph on) 7% slower at batch 1 and 3% faster at batch 4, and the VAE
      decode 13-18% faster, under 1% of an image (gpu-check-ort-20261128T025959Z.json). ONNX Runtime
      builds that plan only where TF32 is allowed, so TF32 is allowed for those graphs with it. Not for the plain graphs: ONNX Runtime's
      NCHW fused path clears the output with a synchronous memset outside the loop's stream."""
    opts = {"use_tf32": "1" if os.environ.get("ARC2FACE_ORT_TF32") == "1" else "0",
            "cudnn_conv_algo_search": conv_search()}
    if fused and os.environ.get("ARC2FACE_ORT_FUSE_CONV_BIAS") == "1":   # an older onnxruntime refuses
        opts.update(fuse_conv_bias="1", use_tf32="1")                  # keys it does not know
    return opts


def _preload_cuda_libraries(ort) -> None:
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):
        _preloaded = True
        try:
            ort.preload_dlls()                # CUDA/cuDNN from the nvidia-* wheels, where installed
        except Exception as e:                # noqa: BLE001 - a failed preload shows up as "no CUDA" below
            log.info("onnxruntime.preload_dlls() failed: %s", e)


_blocking_sync_warned = False


def _blocking_sync_from_env() -> None:
    """ARC2FACE_CUDA_BLOCKING_SYNC=1 (`cuda.cudart`'s first use sets it) also for ONNX Runtime's own
    waits, before its first CUDA session; without cuda-python it cannot be set, which is said once."""
    from . import cuda

    if os.environ.get(cuda.BLOCKING_SYNC_ENV) != "1":
        return
    global _blocking_sync_warned
    try:
        cuda.cudart()
    except BackendUnavailableError:
        if not _blocking_sync_warned:
            _blocking_sync_warned = True
            log.warning("%s=1 needs cuda-python (`pip install cuda-python`); ignored", cuda.BLOCKING_SYNC_ENV)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:          # a file name's undecodable bytes, held as surrogates
        return False
    return True


class OrtSession:
    """One ONNX graph in an onnxruntime InferenceSession.

    `providers` is what the session runs on (ONNX Runtime's own report); `on_gpu` whether that is CUDA.
    `cuda_options` are CUDA execution provider options (strings), used when CUDA is asked for, over
    those `cuda_provider_options` takes from the environment (TF32 off, heuristic convolution search)."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 cuda_options: dict | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise EngineMismatchError(f"{path}: ONNX file missing; run `arc2face-export onnx` to write it")
        if not _utf8(str(path)):
            raise InvalidInputError(f"{path}: ONNX Runtime opens only paths that are valid UTF-8; rename the "
                                    "folder (or use --backend openvino, which has no such limit)")
        opts = ort.SessionOptions()
        # ONNX Runtime's own log prints an error again, in colour, above the one-line message its exception
        # becomes (an out-of-memory, say): errors are only logged with -v
        opts.log_severity_level = 3 if log.isEnabledFor(logging.INFO) else 4
        threads = threads or env_threads("ARC2FACE_ORT_THREADS")
        if threads:
            opts.intra_op_num_threads = threads
        requested = ort_providers(device)
        if CUDA_EP in requested:
            _preload_cuda_libraries(ort)
            _blocking_sync_from_env()
        fused = path.name.endswith(FUSED_SUFFIX)
        providers = [(p, {**cuda_provider_options(fused), **(cuda_options or {})}) if p == CUDA_EP else p
                     for p in requested]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise_if_out_of_memory(e, f"loading {path.name}")
            raise EngineMismatchError(f"{path}: ONNX Runtime cannot load it ({_first_line(e)}); "
                                      "re-export it with `arc2face-export onnx`") from e
        self.providers = list(self._sess.get_providers())
        self.on_gpu = self.providers[0] == CUDA_EP
        if self.on_gpu:
            # the CUDA provider's cuDNN convolutions log the plans they retry ("No execution plans support the
            # graph", once per convolution, at the first run) through ONNX Runtime's process-wide logger,
            # which the session's level does not govern. Once CUDA has loaded (why it did not is logged there
            # too, and stays visible) that logger follows -v as the session's does.
            ort.set_default_logger_severity(opts.log_severity_level)
        if CUDA_EP in requested and not self.on_gpu:
            why = ("ONNX Runtime could not load its CUDA execution provider (the CUDA 13 / cuDNN 9 libraries "
                   "onnxruntime-gpu needs are missing or of another version; `pip install "
                   "'onnxruntime-gpu[cuda,cudnn]'` installs them)")
            if device == "cuda":
                raise BackendUnavailableError(f"{why}; or use --device cpu")
            log.warning("%s: %s; running on the CPU", path.name, why)
        # Each session's CPU arena keeps its own peak. ARC2FACE_ORT_SHRINK_ARENA=1 gives it back after
        # every run: full size fp32, step + VAE decode peak at 6.1 GiB instead of 10.2 GiB, but each
        # denoise step is about 35% slower (2-core Xeon; benchmarks/README.md), so it is opt-in.
        self._run_options = ort.RunOptions()
        if not self.on_gpu and os.environ.get("ARC2FACE_ORT_SHRINK_ARENA") == "1":
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.path = path
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.inputs = {i.name: i for i in self._sess.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self._sess.run(self.output_names, feeds, self._run_options)
        except Exception as e:
            self._run_failed(e)
            raise
        return dict(zip(self.output_names, outs))

    # True for a graph with ONNX Runtime's CUDA-only fusions that `open_session` opened instead of the plain one
    fused_graph = False

    def _run_failed(self, e: BaseException) -> None:
        """A failed run: out of memory is a MemoryError; a fused graph that loads but fails to run (a
        kernel refusing a shape, a CUDA graph capture error) is one line naming the way out, since the
        plain graph is not tried behind the caller's back in the middle of a generation."""
        raise_if_out_of_memory(e, f"running {self.path.name}")
        if self.fused_graph:
            raise EngineMismatchError(f"{self.path.name}: ONNX Runtime failed running this fused CUDA graph "
                                      f"({_first_line(e)}); set ARC2FACE_ORT_FUSED=0 to use the plain graphs "
                                      "(and please report it)") from e

    def close(self) -> None:
        self._sess = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_session(path: str | Path, device: str = "auto", step: bool = False, threads: int | None = None,
                 cuda_path: str | Path | None = None):
    """The session for one stage: for a step graph that runs on the GPU, an `OrtStepSession` (the
    device-resident loop, ONNX Runtime's CUDA graph); otherwise an `OrtSession`. On a CPU the plain
    host loop is as fast and reports progress per step. `cuda_path`: the stage's graph with ONNX
    Runtime's CUDA-only fused kernels, opened instead of `path` when the session runs on CUDA (a
    graph this onnxruntime cannot load falls back to `path`, with a warning; one that loads and then
    fails to run is an EngineMismatchError naming ARC2FACE_ORT_FUSED=0, see OrtSession._run_failed)."""
    if cuda_path is not None and CUDA_EP in ort_providers(device):
        try:
            sess = open_session(cuda_path, device=device, step=step, threads=threads)
        except EngineMismatchError as e:
            why = _first_line(e.__cause__) if e.__cause__ is not None else e   # onnxruntime's own message
            log.warning("%s: this onnxruntime cannot run the fused graph (%s); using the plain %s",
                        Path(cuda_path).name, why, Path(path).name)
        else:
            if sess.on_gpu:
                sess.fused_graph = True
                return sess
            sess.close()
    if step and CUDA_EP in ort_providers(device):
        from .ort_loop import OrtStepSession, cuda_loop_unavailable

        reason = cuda_loop_unavailable()
        if reason is None:
            sess = OrtStepSession(path, device=device, threads=threads)
            if sess.on_gpu:
                return sess
            sess.close()
            device = "cpu"                    # CUDA did not load: OrtStepSession has said so
        else:
            log.warning("%s: the device-resident loop is unavailable (%s); stepping from the host", Path(path).name,
                        reason)
    return OrtSession(path, device=device, threads=threads)
