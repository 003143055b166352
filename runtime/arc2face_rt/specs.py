"""Stage specs: the one description of every exported graph (pure data, no torch).

Export, validation, engine building, buffer allocation and tests all read these. Shapes use the
symbol "B" for the batch axis; every other axis is static (512x512 images, 64x64 latents).
Bump SPEC_REVISION whenever a stage's inputs, outputs or semantics change: the runtime refuses
engines folders written under another revision.
"""
from __future__ import annotations

from dataclasses import dataclass

SPEC_REVISION = 1

# Arc2Face facts, from the official code and its pinned libraries; each must be exact.
ID_DIM = 512                    # ArcFace embedding width
TEXT_LEN, TEXT_DIM = 77, 768    # CLIP-L text sequence
ID_SLOT = 4                     # index of token 1014 ("id") in PROMPT_IDS
PROMPT = "photo of a id person"
PROMPT_IDS = (49406, 1125, 539, 320, 1014, 2533, 49407) + (49407,) * 70
UNCOND_IDS = (49406,) + (49407,) * 76
LATENT_CHANNELS, LATENT_SIZE = 4, 64
IMAGE_SIZE = 512
VAE_SCALING = 0.18215
DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 25
DEFAULT_SCHEDULER = "dpmpp2m"
DEFAULT_BATCH = 4               # images per graph call of `arc2face-rt generate` (--batch); plans are tuned for it

# One row of the per-step coefficient table (see schedulers.py):
#   x_in = s*x; eps = eps_u + g*(eps_c - eps_u); m0 = a*x + b*eps
#   x_out = c0*x + c1*m0 + c2*m_prev + c3*noise;  t is the UNet timestep.
COEFF_NAMES = ("t", "s", "a", "b", "c0", "c1", "c2", "c3")

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name: float32, float16, uint8, int64
    shape: tuple[int | str, ...]     # "B" marks the batch axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else d for d in self.shape)


@dataclass(frozen=True)
class StageSpec:
    """An exported graph. `tolerance[precision]` bounds the validation metric against torch fp32:
    relative L2 error ||onnx - torch|| / ||torch|| for float outputs, max abs grey levels for uint8."""
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: dict
    batch_range: tuple[int, int, int] = (1, 1, 16)   # min, opt, max for engine profiles

    @property
    def onnx_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def plan_file(self) -> str:
        return f"{self.name}.plan"

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


_LATENT = ("B", LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
_COND = TensorSpec("cond", "float32", ("B", TEXT_LEN, TEXT_DIM))


def _step_inputs(cfg: bool) -> tuple[TensorSpec, ...]:
    ins = (
        TensorSpec("x", "float32", _LATENT),
        TensorSpec("m_prev", "float32", _LATENT),
        TensorSpec("noise", "float32", _LATENT),
        _COND,
        TensorSpec("coeffs", "float32", (len(COEFF_NAMES),)),
    )
    return ins + ((TensorSpec("guidance", "float32", (1,)),) if cfg else ())


_STEP_OUTPUTS = (TensorSpec("x_out", "float32", _LATENT), TensorSpec("m0", "float32", _LATENT))
# ControlNet (pose): the condition image as diffusers' StableDiffusionControlNetPipeline feeds it
# (RGB, resized to 512x512, values in [0, 1], NCHW) and its scale (controlnet_conditioning_scale).
_CONTROL_INPUTS = (TensorSpec("control", "float32", ("B", 3, IMAGE_SIZE, IMAGE_SIZE)),
                   TensorSpec("control_scale", "float32", (1,)))

PROJECTOR = StageSpec(
    name="projector",
    inputs=(TensorSpec("id", "float32", ("B", ID_DIM)),),
    outputs=(_COND,),
    tolerance={"fp32": 1e-4, "fp16": 2e-2},
)
# The whole denoise step (UNet + CFG + scheduler update) is one graph; latents stay fp32 at the
# boundary so the scheduler arithmetic never runs in half precision, whatever the UNet's precision.
STEP_CFG = StageSpec("step_cfg", _step_inputs(cfg=True), _STEP_OUTPUTS, {"fp32": 1e-4, "fp16": 2e-2})
STEP = StageSpec("step", _step_inputs(cfg=False), _STEP_OUTPUTS, {"fp32": 1e-4, "fp16": 2e-2})
# Decoder includes latents/0.18215 and round(clamp(x/2+0.5,0,1)*255): it returns finished pixels.
VAE_DECODER = StageSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latents", "float32", _LATENT),),
    outputs=(TensorSpec("image", "uint8", ("B", IMAGE_SIZE, IMAGE_SIZE, 3)),),
    tolerance={"fp32": 1, "fp16": 3},
)

# The step graphs with the ControlNet inside: it runs on the same (CFG) batch, latent input and text
# condition as the UNet, and its residuals times control_scale are added inside the UNet.
STEP_CFG_CONTROL = StageSpec("step_cfg_control", _step_inputs(cfg=True) + _CONTROL_INPUTS, _STEP_OUTPUTS,
                             {"fp32": 1e-4, "fp16": 2e-2})
STEP_CONTROL = StageSpec("step_control", _step_inputs(cfg=False) + _CONTROL_INPUTS, _STEP_OUTPUTS,
                         {"fp32": 1e-4, "fp16": 2e-2})

GENERATION_STAGES = (PROJECTOR, STEP_CFG, STEP, VAE_DECODER)
STAGES = {s.name: s for s in GENERATION_STAGES}          # what every export has
CONTROL_STAGES = {s.name: s for s in (STEP_CFG_CONTROL, STEP_CONTROL)}   # exported when the model has controlnet/
ALL_STAGES = {**STAGES, **CONTROL_STAGES}
STEP_STAGES = (STEP_CFG.name, STEP.name, STEP_CFG_CONTROL.name, STEP_CONTROL.name)
# Stages that run at the generation batch (--batch images per call); the projector runs once per identity.
PER_IMAGE_STAGES = (STEP_CFG.name, STEP.name, VAE_DECODER.name, STEP_CFG_CONTROL.name, STEP_CONTROL.name)


def step_stage(cfg: bool, control: bool) -> str:
    """The step graph a run uses: with CFG or not, with the ControlNet or not."""
    return {(True, False): STEP_CFG.name, (False, False): STEP.name,
            (True, True): STEP_CFG_CONTROL.name, (False, True): STEP_CONTROL.name}[(cfg, control)]


# An engines folder exported with an LCM-LoRA fused in (manifest "lora") generates with these unless
# the options say otherwise: the official LCM-LoRA usage (LCMScheduler, 2-4 steps, guidance 1).
LCM_LORA_DEFAULTS = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}
DEFAULT_CONTROL_SCALE = 1.0     # diffusers' controlnet_conditioning_scale default
