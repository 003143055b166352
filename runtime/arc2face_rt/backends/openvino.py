"""OpenVINO backend (CPU): the exported ONNX graphs compiled by OpenVINO in fp32, bf16 or int8.

Optional: `pip install 'arc2face-rt[openvino]'`. Nothing here imports openvino until a session is
opened, and a missing install is a BackendUnavailableError naming that command.

Precision (`--cpu-precision`, resolved once per pipeline by `resolve_precision`):
- `fp32`: every graph with INFERENCE_PRECISION_HINT f32. OpenVINO's own CPU default is bf16 on CPUs
  that have it, so f32 is always asked for explicitly.
- `bf16`: the step graphs (with the ControlNet ones) and the VAE decoder with the bf16 hint; the
  projector and the face models stay f32 (they run once per identity or photo, under 1% of the time). Needs a CPU with AMX-BF16 or
  AVX512-BF16 (OpenVINO's `BF16` capability); elsewhere bf16 is refused rather than emulated.
- `int8`: the step graphs from the NNCF-quantised IR that `arc2face-export openvino-int8` writes
  (manifest key `openvino_int8`), their remaining float ops and the VAE decoder at the CPU's float
  precision (bf16 where available, else f32). There is no int8 ControlNet step graph, so int8 with a
  control image is refused (every PNG records one precision for its step graph).
- `auto`: bf16 where the CPU has it, else fp32.

Latents stay fp32 at every graph boundary, and no scheduler arithmetic runs in bf16: OpenVINO keeps a
graph's tail after its last Convolution/MatMul in f32 (the CFG mix and the scheduler update), and
the nodes computed from the scheduler coefficients *before* the UNet (the timestep sinusoid, whose
argument t·f reaches 999 where bf16 is 4 apart, and the input scaling s·x) are made extra outputs of
the compiled model (`keep_f32_from`), which puts them under the same rule. The session never returns
those extra outputs.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..argtypes import env_threads
from ..errors import BackendUnavailableError, EngineMismatchError, InvalidInputError, raise_if_out_of_memory
from ..manifest import ov_int8_advice
from ..specs import CONTROL_STAGES, STEP_STAGES

log = logging.getLogger("arc2face_rt")

CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8")
INSTALL = "pip install 'arc2face-rt[openvino]'"
# Inputs whose downstream arithmetic (outside the UNet's Convolution/MatMul layers) must stay f32.
SCHEDULER_INPUTS = ("coeffs", "guidance")
# Layers OpenVINO computes in the reduced precision; everything between them is "glue".
_COMPUTE_OPS = frozenset({"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData",
                          "GroupConvolutionBackpropData"})
# cpuinfo flags that decide the CPU's matrix throughput per precision (reported with every run).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def import_openvino():
    """The openvino module, or BackendUnavailableError naming the install command."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"the OpenVINO backend needs openvino ({e}); install it with `{INSTALL}`, "
                                      "or use --backend ort") from e
    return openvino


def openvino_installed() -> bool:
    """True when openvino can be imported (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def core():
    """One openvino.Core per process (it owns the CPU plugin and its thread pool)."""
    return import_openvino().Core()


def openvino_version() -> str:
    return import_openvino().get_version()


# ----------------------------------------------------------------------------- the CPU

@dataclass(frozen=True)
class CpuIsa:
    """What this CPU offers for matrix work, from /proc/cpuinfo and OpenVINO's CPU plugin."""
    model: str
    flags: tuple[str, ...]          # the ISA_FLAGS present (empty where /proc/cpuinfo is absent)
    capabilities: tuple[str, ...]   # OpenVINO OPTIMIZATION_CAPABILITIES, e.g. FP32, BF16, INT8

    @property
    def bf16(self) -> bool:
        """Native bf16 matrix instructions (AMX-BF16 or AVX512-BF16), as OpenVINO detects them."""
        return "BF16" in self.capabilities

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    def summary(self) -> str:
        units = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni") if f in self.flags]
        if not units:
            units = [f for f in ("avx512f", "avx2") if f in self.flags]
        return f"{self.model}: {', '.join(units) or 'no AVX2'}{'' if self.amx else ' (no AMX)'}"

    def as_dict(self) -> dict:
        return {"model": self.model, "flags": list(self.flags), "capabilities": list(self.capabilities)}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = val.strip()
            elif key == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_isa() -> CpuIsa:
    model, flags = _cpuinfo()
    c = core()
    caps = tuple(c.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    name = model or str(c.get_property("CPU", "FULL_DEVICE_NAME"))
    return CpuIsa(name, tuple(f for f in ISA_FLAGS if f in flags), caps)


@dataclass(frozen=True)
class Precision:
    """A resolved `--cpu-precision`: what the run is called and what each kind of stage runs in."""
    name: str          # fp32 | bf16 | int8 (recorded in every PNG)
    heavy: str         # hint for the step graphs and the VAE decoder: "f32" | "bf16"
    int8_steps: bool   # step graphs from the NNCF int8 IR

    def hint(self, stage: str) -> str:
        return self.heavy if stage in HEAVY_STAGES else "f32"


HEAVY_STAGES = (*STEP_STAGES, "vae_decoder")     # the ControlNet step graphs too: the heaviest of all


def resolve_precision(requested: str, isa: CpuIsa) -> Precision:
    """`--cpu-precision` -> Precision; bf16 on a CPU without native bf16 is an error naming the fix."""
    if requested not in CPU_PRECISIONS:
        raise InvalidInputError(f"--cpu-precision must be one of {', '.join(CPU_PRECISIONS)} (got {requested!r})")
    if requested == "bf16" and not isa.bf16:
        raise InvalidInputError(
            f"--cpu-precision bf16: this CPU ({isa.summary()}) has no AMX-BF16 or AVX512-BF16, so bf16 would be "
            "emulated and slower than fp32; use --cpu-precision auto (bf16 where the CPU has it) or fp32")
    if requested == "auto":
        requested = "bf16" if isa.bf16 else "fp32"
    heavy = "bf16" if requested == "bf16" or (requested == "int8" and isa.bf16) else "f32"
    return Precision(requested, heavy, requested == "int8")


# ----------------------------------------------------------------------------- sessions

@dataclass(frozen=True)
class PortInfo:
    """What face/_onnx.static_input_shape reads: a declared shape, None for dynamic axes."""
    name: str
    shape: tuple


def scheduler_subgraph(model, input_names=SCHEDULER_INPUTS) -> tuple[list[str], list]:
    """The nodes computed from `input_names` outside the Convolution/MatMul layers (friendly names), and
    the outputs among them that feed such a layer: the timestep sinusoid, the input scaling s·x, the CFG
    mix and the scheduler update of a step graph."""
    params = [p for p in model.get_parameters() if p.get_friendly_name() in input_names]
    seen, stack, names, frontier = {p.get_friendly_name() for p in params}, list(params), [], []
    while stack:
        node = stack.pop()
        for out in node.outputs():
            feeds_compute = False
            for target in out.get_target_inputs():
                child = target.get_node()
                kind = child.get_type_name()
                if kind in _COMPUTE_OPS:
                    feeds_compute = True
                elif kind != "Result" and child.get_friendly_name() not in seen:
                    seen.add(child.get_friendly_name())
                    names.append(child.get_friendly_name())
                    stack.append(child)
            if feeds_compute and node.get_type_name() != "Parameter":
                frontier.append(out)
    return names, frontier


def keep_f32_from(model, input_names=SCHEDULER_INPUTS) -> int:
    """Make the scheduler subgraph's values that feed a Convolution/MatMul extra model outputs, so
    OpenVINO's bf16 pass (which leaves a graph's tail after its last compute layer in f32) keeps all of
    that arithmetic in f32. Returns how many outputs were added."""
    _, frontier = scheduler_subgraph(model, input_names)
    if frontier:
        model.add_outputs(frontier)
    return len(frontier)


def _looks_like_onnx(path: Path) -> bool:
    """An ONNX file is a serialised ModelProto, whose first field is ir_version (tag byte 0x08)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


class OpenVinoSession:
    """One graph (ONNX or OpenVINO IR) compiled for the CPU; the backends' common session surface."""

    def __init__(self, path: str | Path, hint: str = "f32", cache_dir: Path | None = None,
                 threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise EngineMismatchError(f"{path}: graph missing; re-export the engines folder")
        if path.suffix != ".xml" and not _looks_like_onnx(path):
            # OpenVINO would try its other front ends too, and TensorFlow's logs parse errors to stderr
            raise EngineMismatchError(f"{path}: not an ONNX model (another kind of file, or damaged)")
        c = core()
        try:
            model = c.read_model(str(path))
        except Exception as e:  # openvino raises RuntimeError subclasses of its own
            raise EngineMismatchError(f"{path}: OpenVINO cannot read it ({e}); re-export the engines folder") from e
        self.path, self.hint = path, hint
        self.input_names = [p.get_any_name() for p in model.inputs]
        self.output_names = [o.get_any_name() for o in model.outputs]
        self.inputs = {p.get_any_name(): PortInfo(p.get_any_name(), tuple(
            d.get_length() if d.is_static else None for d in p.get_partial_shape())) for p in model.inputs}
        self.extra_outputs = keep_f32_from(model) if hint != "f32" else 0
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        threads = threads or env_threads("ARC2FACE_OV_THREADS")
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self._compiled = c.compile_model(model, "CPU", config)
        except Exception as e:
            raise_if_out_of_memory(e, f"compiling {path.name}")
            raise EngineMismatchError(f"{path}: OpenVINO cannot compile it for the CPU ({e}); "
                                      "re-export the engines folder, or use --backend ort") from e
        self._request = self._compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            res = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except RuntimeError as e:       # OpenVINO's own errors subclass it
            raise_if_out_of_memory(e, f"running {self.path.name}")
            raise
        return {n: res[n] for n in self.output_names}

    def runtime_precisions(self) -> dict[str, str]:
        """{original layer name: precision it runs in} from the compiled model (for tests and reports)."""
        out = {}
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            for name in info["originalLayersNames"].astype(str).split(","):
                if name:
                    out[name] = info["runtimePrecision"].astype(str)
        return out

    def close(self) -> None:
        self._request = None
        self._compiled = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- an engines folder

INT8_KEY = "openvino_int8"        # manifest section written by `arc2face-export openvino-int8`
INT8_FIX = "write it with `arc2face-export openvino-int8 --engines {dir}`"


def _graph_sha256(rec: dict) -> str:
    import hashlib

    files = rec["files"] if "files" in rec else {rec["file"]: rec}
    return hashlib.sha256("".join(f"{k}:{v['sha256']};" for k, v in sorted(files.items())).encode()).hexdigest()


class OpenVinoStages:
    """The stages of one engines folder on OpenVINO at one resolved `--cpu-precision`."""

    def __init__(self, engines_dir: str | Path, manifest: dict, cpu_precision: str = "auto", cache_key: str = "",
                 verify: bool = True):
        self.engines_dir, self.manifest, self.verify, self.cache_key = Path(engines_dir), manifest, verify, cache_key
        self.isa = cpu_isa()
        self.precision = resolve_precision(cpu_precision, self.isa)
        if self.precision.int8_steps and not manifest.get(INT8_KEY):
            raise EngineMismatchError(f"{self.engines_dir}: no OpenVINO int8 step graphs for --cpu-precision int8; "
                                      + INT8_FIX.format(dir=self.engines_dir))
        self._cache = None                  # opened when the first graph is compiled

    @property
    def cache(self):
        """The CompileCache (None without a writable folder), chosen and opened on first use."""
        if self._cache is None:
            from .ov_cache import CompileCache, choose_cache_dir

            folder = choose_cache_dir(self.cache_key or "engines")
            self._cache = (CompileCache(folder, openvino_version(), self.isa.as_dict(), source=self.engines_dir)
                           if folder else False)
        return self._cache or None

    def check_stage(self, name: str) -> None:
        """Refuse a stage this precision cannot run (the pipeline asks first, before whether the folder
        has it: a missing ControlNet graph's advice would otherwise lead to this refusal)."""
        if self.precision.int8_steps and name in CONTROL_STAGES:
            raise InvalidInputError(f"--cpu-precision int8 has no int8 ControlNet step graph ('{name}': `arc2face-export "
                                    "openvino-int8` quantises step and step_cfg); with --control-image use "
                                    "--cpu-precision bf16, fp32 or auto")

    def record(self, name: str) -> dict:
        """The manifest record of the graph stage `name` runs from at this precision."""
        self.check_stage(name)
        if self.precision.int8_steps and name in ("step", "step_cfg"):
            rec = self.manifest[INT8_KEY].get(name)
            fix = INT8_FIX.format(dir=self.engines_dir)
            if rec is None:
                raise EngineMismatchError(f"{self.engines_dir}: no OpenVINO int8 graph for '{name}'; {fix}")
            source = {k: v["sha256"] for k, v in self.manifest["stages"][name]["files"].items()}
            if not isinstance(rec.get("source"), dict) or rec["source"].get("sha256") != source:
                raise EngineMismatchError(f"{self.engines_dir}: the int8 '{name}' graph was quantised from an older "
                                          f"export; {ov_int8_advice(self.engines_dir)}")
            return rec
        return self.manifest["stages"][name]

    def open(self, name: str) -> OpenVinoSession:
        from ..integrity import verify_records
        from ..manifest import record_files, resolve_inside, stage_file

        rec = self.record(name)
        if rec is not self.manifest["stages"][name]:     # the pipeline verified the stages already
            verify_records(self.engines_dir, record_files(rec), mode="stamp" if self.verify else "size",
                           fix=ov_int8_advice(self.engines_dir))
        hint = self.precision.hint(name)
        cache = self.cache
        if cache is not None:
            cache.prepare(name, self.precision.name, hint, _graph_sha256(rec))
        return OpenVinoSession(resolve_inside(self.engines_dir, stage_file(rec)), hint,
                               cache.folder if cache else None)


def open_model_file(path: str | Path) -> OpenVinoSession:
    """A face model (detector, recognizer) in f32, its compiled blob cached per user."""
    from .ov_cache import CompileCache, choose_cache_dir

    path = Path(path)
    folder = choose_cache_dir("face-models")
    if folder is not None and path.is_file():
        cache = CompileCache(folder, openvino_version(), cpu_isa().as_dict())
        cache.prepare(str(path.resolve()), "fp32", "f32", f"{path.stat().st_size} bytes")
    return OpenVinoSession(path, "f32", folder)
