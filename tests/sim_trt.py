"""A simulated TensorRT (module, runtime, engine, execution context) for driving the REAL TensorRT
backend (`arc2face_rt.backends.trt`: plan checks, TrtSession, SharedDeviceMemory, TrtStepSession and
its CUDA graphs, the one-sync batch path) without TensorRT, and on a CPU without a GPU.

A simulated plan is a small JSON file recorded in the engines folder's manifest like a real plan.
Its engine has the stage's exact I/O (from `specs`) and enforces what TensorRT enforces: tensor
addresses aligned to 256 bytes (`set_tensor_address` returns False otherwise), input shapes inside
the plan's batch profile, activation memory set and large enough before `execute_async_v3`. Each
execution launches a "kernel" computing a simple, exactly known stage function:

    step:      x_in = s*x; eps_c = tanh(x_in)/2 + cond[:, 0, c] + t/1000; eps_u = x_in/4
               eps = eps_u + g*(eps_c - eps_u) (step_cfg) or eps_c (step), kept in activation memory;
               the ControlNet variants add control_scale * (channel mean of control[:, :, ::8, ::8]) to eps_c
               m0 = a*x + b*eps; x_out = c0*x + c1*m0 + c2*m_prev + c3*noise
    projector: cond[b, i, j] = tanh(id[b, j]) + 0.01*(i mod 7)        (j < 512; j mod 512 beyond)
    vae:       image[b, y, x, c] = clip(rint(50*latents[b, c, y/8, x/8] + 128), 0, 255) as uint8

`HostKernels` runs them with numpy on `sim_cuda.FakeCudart` memory (CPU tests); the GPU tests use
CuPy kernels with the same formulas (`sim_cupy.CupyKernels`) on real device memory. `*_reference`
are the numpy oracles.
"""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np

from arc2face_rt import manifest as mf
from arc2face_rt import specs

RTX_CCS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")     # TensorRT-RTX 1.7's ComputeCapability enum
LATENT_BYTES = 4 * 64 * 64 * 4


# ----------------------------------------------------------------------------- the stage functions

def step_reference(x, m_prev, noise, cond, coeffs, guidance=None, control=None, control_scale=None):
    """(x_out, m0) of one simulated step, float32 numpy."""
    f = np.float32
    t, s, a, b, c0, c1, c2, c3 = (f(v) for v in np.asarray(coeffs, np.float32)[:8])
    x_in = s * x
    eps_c = np.tanh(x_in) * f(0.5) + cond[:, 0, :4, None, None] + t * f(1e-3)
    if control is not None:
        eps_c = eps_c + f(np.asarray(control_scale).reshape(-1)[0]) * control[:, :, ::8, ::8].mean(1, keepdims=True)
    eps = eps_c if guidance is None else (x_in * f(0.25)) + f(guidance) * (eps_c - x_in * f(0.25))
    m0 = a * x + b * eps
    return (c0 * x + c1 * m0 + c2 * m_prev + c3 * noise).astype(np.float32), m0.astype(np.float32)


def loop_reference(x, cond, table, guidance=None, noise=None, control=None, control_scale=1.0):
    m = np.zeros_like(x)
    for k in range(len(table)):
        x, m = step_reference(x, m, np.zeros_like(x) if noise is None else noise[k], cond, table[k], guidance,
                              control, control_scale)
    return x


def projector_reference(ids):
    j = np.arange(specs.TEXT_DIM) % specs.ID_DIM
    rows = (np.arange(specs.TEXT_LEN) % 7).astype(np.float32) * np.float32(0.01)
    return (np.tanh(ids[:, None, j]) + rows[None, :, None]).astype(np.float32)


def vae_reference(latents):
    up = latents[:, :3].repeat(8, axis=2).repeat(8, axis=3).transpose(0, 2, 3, 1)
    return np.clip(np.rint(up * np.float32(50) + np.float32(128)), 0, 255).astype(np.uint8)


class HostKernels:
    """The stage functions on FakeCudart memory, enqueued on the fake stream (CPU)."""

    def __init__(self, rt):
        self.rt = rt

    def launch(self, stage: str, ptrs: dict[str, int], batch: int, scratch: tuple[int, int], stream: int) -> None:
        rt, spec = self.rt, specs.ALL_STAGES[stage]

        def arr(t):
            return rt.device_array(ptrs[t.name], t.dtype, t.concrete(batch))

        def run():
            ins = {t.name: arr(t) for t in spec.inputs}
            outs = {t.name: arr(t) for t in spec.outputs}
            if stage in specs.STEP_STAGES:
                g = float(ins["guidance"][0]) if "guidance" in ins else None
                x_out, m0 = step_reference(ins["x"], ins["m_prev"], ins["noise"], ins["cond"], ins["coeffs"], g,
                                           ins.get("control"), ins.get("control_scale"))
                eps = rt.device_array(scratch[0], np.float32, m0.shape)     # through activation memory
                eps[...] = m0
                outs["m0"][...] = eps
                outs["x_out"][...] = x_out
            elif stage == "projector":
                outs["cond"][...] = projector_reference(ins["id"])
            elif stage == "vae_decoder":
                outs["image"][...] = vae_reference(ins["latents"])
            else:
                raise ValueError(stage)
        rt.enqueue(stream, run)


# ----------------------------------------------------------------------------- the fake library

class _Enum:
    """Enough of a pybind11 enum: members as attributes, `__members__`, `.name`, an int value
    (powers of two for a flags enum)."""

    def __init__(self, *names, flags: bool = False):
        self.__members__ = {}
        for i, n in enumerate(names):
            self.__members__[n] = _Member(n, 1 << i if flags else i)
            setattr(self, n, self.__members__[n])


class _Member(int):
    def __new__(cls, name, value):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj


class _Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self):
        pass


class FakeRuntimeCache:
    def __init__(self):
        self.entries: set = set()

    def serialize(self):
        return json.dumps(sorted(self.entries)).encode()

    def deserialize(self, data) -> bool:
        self.entries = set(json.loads(bytes(data)))
        return True


class FakeRuntimeConfig:
    def __init__(self):
        self.strategy = self.cache = None
        self.dynamic_shapes_kernel_specialization_strategy = None
        self.cuda_graph_strategy = None

    def set_execution_context_allocation_strategy(self, s):
        self.strategy = s

    def create_runtime_cache(self):
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache):
        self.cache = cache


class FakeContext:
    def __init__(self, engine, config):
        self.engine, self.config = engine, config
        self.addr: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, ptr, nbytes):
        assert int(ptr) % 256 == 0, "activation memory must be 256-byte aligned"
        assert nbytes >= self.engine.device_memory_size_v2, "activation memory smaller than the engine needs"
        self.memory = (int(ptr), int(nbytes))

    def set_input_shape(self, name, shape) -> bool:
        lo, hi = self.engine.profile[0], self.engine.profile[2]
        if not lo <= shape[0] <= hi:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if name not in self.engine.io or int(ptr) % 256:
            return False                          # TensorRT: unknown name, or not 256-byte aligned
        self.addr[name] = int(ptr)
        return True

    def is_stream_capturable(self, stream) -> bool:
        return self.engine.capturable

    def execute_async_v3(self, stream) -> bool:
        eng = self.engine
        if set(self.addr) != set(eng.io) or len(self.shapes) != len(eng.batched_inputs) or self.memory is None:
            return False
        batch = next(iter(self.shapes.values()))[0]
        if self.config is not None and self.config.cache is not None:
            self.config.cache.entries.add(f"{eng.stage}:{batch}")     # "compiled kernels" for this shape
        eng.kernels.launch(eng.stage, dict(self.addr), batch, self.memory, int(stream))
        eng.executions += 1
        return True


class FakeEngine:
    def __init__(self, trt, desc: dict):
        self.trt, self.stage = trt, desc["stage"]
        spec = specs.ALL_STAGES[self.stage]
        self.tensors = list(spec.inputs) + list(spec.outputs)
        self.io = {t.name: t for t in self.tensors}
        self.inputs = {t.name for t in spec.inputs}
        self.batched_inputs = [t.name for t in spec.inputs if "B" in t.shape]
        self.profile = tuple(desc["profile"])
        self.device_memory_size_v2 = desc["device_memory"]
        self.capturable = desc.get("capturable", True)
        self.kernels = trt.kernels
        self.num_io_tensors = len(self.tensors)
        self.executions = 0

    def get_tensor_name(self, i):
        return self.tensors[i].name

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name={"float32": "FLOAT", "uint8": "UINT8"}[self.io[name].dtype])

    def get_tensor_shape(self, name):
        return tuple(-1 if d == "B" else d for d in self.io[name].shape)

    def create_execution_context(self, config):
        ctx = FakeContext(self, config if isinstance(config, FakeRuntimeConfig) else None)
        self.trt.contexts.append(ctx)
        return ctx


class FakeRtxEngine(FakeEngine):
    """TensorRT-RTX's engine also makes runtime configs (allocation strategy, runtime cache)."""

    def create_runtime_config(self):
        return FakeRuntimeConfig()


class FakeRuntime:
    def __init__(self, trt, logger):
        self.trt = trt

    def deserialize_cuda_engine(self, data):
        cls = FakeRtxEngine if self.trt.__name__ == "tensorrt_rtx" else FakeEngine
        return cls(self.trt, json.loads(bytes(data)))


class FakeRtxRuntime(FakeRuntime):
    """TensorRT-RTX's runtime also judges a plan against this GPU before deserialising it."""

    def get_engine_validity(self, data):
        desc = json.loads(bytes(data))
        bad = desc.get("invalid", [])
        mask = 0
        for n in bad:
            mask |= int(self.trt.EngineInvalidityDiagnostics.__members__[n])
        return (self.trt.EngineValidity.INVALID if bad else self.trt.EngineValidity.VALID), mask


def fake_trt(kernels, name: str = "tensorrt_rtx", version: str = "1.7.1.116", ccs=RTX_CCS):
    """A module object standing in for `tensorrt_rtx` (or `tensorrt`, without the RTX-only API)."""
    trt = types.ModuleType(name)
    trt.__version__ = version
    trt.kernels, trt.contexts = kernels, []
    trt.TensorIOMode = _Enum("INPUT", "OUTPUT")
    trt.ExecutionContextAllocationStrategy = _Enum("STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED")
    trt.ILogger = _Logger
    trt.Runtime = lambda logger: (FakeRtxRuntime if name == "tensorrt_rtx" else FakeRuntime)(trt, logger)
    if name == "tensorrt_rtx":
        trt.ComputeCapability = _Enum("NONE", "CURRENT", *("SM" + c.replace(".", "") for c in ccs))
        trt.EngineValidity = _Enum("VALID", "SUBOPTIMAL", "INVALID")
        trt.EngineInvalidityDiagnostics = _Enum("VERSION_MISMATCH", "UNSUPPORTED_CC", "OLD_CUDA_DRIVER", flags=True)
        trt.DynamicShapesKernelSpecializationStrategy = _Enum("LAZY", "EAGER", "NONE")
        trt.CudaGraphStrategy = _Enum("DISABLED", "WHOLE_GRAPH_CAPTURE")
    return trt


# ----------------------------------------------------------------------------- an engines folder

def make_sim_engines(root: Path, trt, stages=("projector", "step_cfg", "step", "vae_decoder"),
                     profile=(1, 4, 16), ccs=("8.0", "8.6", "8.9", "12.0"), precision: str = "fp16",
                     **overrides) -> Path:
    """An engines folder of simulated plans, recorded in manifest.json as `build-engines` records real ones.

    Activation memory: the step engines need room for eps at the profile's largest batch, the
    projector none at all (a zero-byte engine), the decoder 4 KiB. `overrides[stage]` updates a plan's
    description (e.g. {"capturable": False}, {"invalid": ["UNSUPPORTED_CC"]}, {"device_memory": n})."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    memory = {"projector": 0, "vae_decoder": 4096, **{s: profile[2] * LATENT_BYTES for s in specs.STEP_STAGES}}
    stage_recs, plans = {}, {}
    for name in stages:
        spec = specs.ALL_STAGES[name]
        onnx = root / spec.onnx_file
        onnx.write_bytes(f"simulated {name} graph\n".encode())
        stage_recs[name] = {"file": spec.onnx_file, "files": {spec.onnx_file: mf.file_record(onnx)},
                            "inputs": [[t.name, t.dtype, list(t.shape)] for t in spec.inputs],
                            "outputs": [[t.name, t.dtype, list(t.shape)] for t in spec.outputs]}
        desc = {"stage": name, "profile": list(profile), "device_memory": memory[name], **overrides.get(name, {})}
        data = json.dumps(desc).encode()
        (root / spec.plan_file).write_bytes(data)
        plans[name] = {"file": spec.plan_file, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "library": {"name": trt.__name__, "version": trt.__version__},
                       "compute_capabilities": list(ccs),
                       "build": {"precision": precision, "profile": dict(zip(("min", "opt", "max"), profile))},
                       "io": {"inputs": stage_recs[name]["inputs"], "outputs": stage_recs[name]["outputs"]}}
    mf.write_json_atomic(root / mf.MANIFEST, {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "spec_revision": specs.SPEC_REVISION,
        "precision": precision, "opset": 17, "source": {"model_dir": None, "kind": "simulated-plans"},
        "stages": stage_recs, "plans": plans})
    return root
