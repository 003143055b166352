"""LCM-LoRA: fuse a LoRA adapter into the UNet (diffusers + peft, as `load_lora_weights` reads it), and
write random adapters with the released SD1.5 LCM-LoRA's key names and ranks (for tests).

The official Arc2Face few-step recipe loads `latent-consistency/lcm-lora-sdv1-5`
(`pytorch_lora_weights.safetensors`) into the pipeline, fuses it (`fuse_lora(lora_scale=1.0)`) and
samples with `LCMScheduler`, 2-4 steps at guidance 1. Fused, the adapter costs nothing per step: the
exported UNet is an ordinary one with changed weights.

Key format written here: kohya style with diffusers module paths, one triple per adapted layer,
    lora_unet_<module path, dots as underscores>.lora_down.weight   [r, in(, kh, kw)]
    lora_unet_<...>.lora_up.weight                                    [out, r(, 1, 1)]
    lora_unet_<...>.alpha                                             scalar (scale alpha / r)
on the layers LCM-LoRA distillation adapts (diffusers' train_lcm_distill_lora_sd_wds.py targets):
attention q/k/v/out, proj_in/proj_out, feed-forward, resnet conv1/conv2/conv_shortcut/time_emb_proj,
down/upsampler convs, at rank 64: 67.25 M parameters on the SD1.5 UNet (the released adapter's model
card gives 67.5 M; its file is about 135 MB in fp16).
diffusers also reads its own format (`unet.<path>.lora.down.weight` / peft `lora_A`/`lora_B`).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from arc2face_rt.errors import MissingWeightsError
from arc2face_rt.fileio import read_regular_file

from .loading import unet_skeleton, unet_weights_mismatch

log = logging.getLogger(__name__)

LCM_LORA_RANK = 64
LCM_LORA_ALPHA = 8.0            # stored per layer; diffusers scales each layer by alpha / rank
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"     # the released adapter's file name
# Largest value a LoRA tensor may hold: the largest finite fp16 number. The released adapters are fp16
# files, so no entry of a real one is larger (trained LoRA entries are of order 1, alphas at most a few
# hundred); and an fp16 export casts the fused weights to fp16, where anything larger is inf.
MAX_LORA_VALUE = 65504.0
# A LoRA for the SD1.5 UNet is far smaller than the UNet itself (3.44 GB in fp32): a bigger file is
# not one (and is read into memory whole).
MAX_LORA_BYTES = 4 << 30
_DOWN_KEYS = ("lora_down.weight", "lora.down.weight", "lora_A.weight")   # one per adapted layer, in each format
_UP_KEYS = ("lora_up.weight", "lora.up.weight", "lora_B.weight")
_FIX = (f"download the adapter (e.g. latent-consistency/lcm-lora-sdv1-5, {LORA_FILE}) or write a random one "
        "with `arc2face-export random-checkpoint --lcm-lora`")


def lora_target_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """{module path: Linear/Conv2d} of the UNet layers the LCM-LoRA adapts."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t)
                                                               for t in LCM_LORA_TARGETS)}


def random_lcm_lora(unet: nn.Module, seed: int = 0, rank: int = LCM_LORA_RANK,
                    alpha: float = LCM_LORA_ALPHA) -> dict[str, torch.Tensor]:
    """A seeded random adapter for `unet` in the kohya key format (see the module docstring). Its
    effect is small but clearly visible in the images (tests check both)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_target_modules(unet).items():
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, nn.Linear):
            down_shape, up_shape = (rank, m.in_features), (m.out_features, rank)
            fan_in = m.in_features
        else:
            kh, kw = m.kernel_size
            down_shape, up_shape = (rank, m.in_channels, kh, kw), (m.out_channels, rank, 1, 1)
            fan_in = m.in_channels * kh * kw
        out[key + ".lora_down.weight"] = torch.randn(down_shape, generator=gen) / fan_in ** 0.5
        out[key + ".lora_up.weight"] = torch.randn(up_shape, generator=gen) * (0.5 / rank ** 0.5)
        out[key + ".alpha"] = torch.tensor(float(alpha))
    return out


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA .safetensors file as a state dict. A file that is missing, not a regular file, unreadable,
    not a UNet LoRA, or whose values are unusable (not floating point, NaN/inf, beyond MAX_LORA_VALUE,
    every alpha, every lora_up or every lora_down zero) is a MissingWeightsError (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"{path}: no such LoRA file; {_FIX}")
    data = read_regular_file(path, MAX_LORA_BYTES, "LoRA .safetensors file", _FIX, error=MissingWeightsError)
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise MissingWeightsError(f"{path}: not a readable .safetensors LoRA ({e}); download it again") from None
    odd = sorted(k for k in state if "lora" not in k and not k.endswith(".alpha"))
    if not state or len(odd) == len(state):
        raise MissingWeightsError(f"{path}: not a LoRA adapter (its tensors are not named *lora*); pass the "
                                  f"adapter's {LORA_FILE}")
    if odd:
        raise MissingWeightsError(f"{path}: holds {len(odd)} tensor(s) that are not a LoRA's (e.g. {odd[0]!r}) beside "
                                  f"its LoRA tensors; pass the adapter's own {LORA_FILE}")
    if any(k.startswith(("lora_te", "text_encoder.")) for k in state):
        raise MissingWeightsError(f"{path}: adapts the text encoder too; Arc2Face's projector is not a text "
                                  "prompt encoder, only UNet adapters (such as LCM-LoRA) are supported")
    _check_values(path, state)
    return state


def _check_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse values no trained adapter has: they would make the fused UNet (and every image) NaN."""
    again = "the file is damaged or was converted wrongly; download or train the adapter again"
    for k, v in state.items():
        if not v.is_floating_point():
            raise MissingWeightsError(f"{path}: {k} holds {str(v.dtype).removeprefix('torch.')} numbers; a LoRA's "
                                      f"tensors are floating point (fp32, fp16 or bf16); {again}")
        if v.numel() == 0:
            raise MissingWeightsError(f"{path}: {k} is empty (shape {list(v.shape)}: rank 0); {again}")
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise MissingWeightsError(f"{path}: {k} holds {bad} NaN/inf value(s) of {v.numel()}; {again}")
        peak = float(v.abs().max())
        if peak > MAX_LORA_VALUE:
            raise MissingWeightsError(f"{path}: {k} holds a value of magnitude {peak:.3g}, beyond the {MAX_LORA_VALUE:g} "
                                      f"(the fp16 range) any trained adapter stays within; {again}")
    alphas = [v for k, v in state.items() if k.endswith(".alpha")]
    if alphas and all(not a.any() for a in alphas):
        raise MissingWeightsError(f"{path}: every .alpha is 0, so every layer's change (up @ down x alpha / rank) "
                                  f"is zero and the adapter changes nothing; {again}")
    for side, ends in (("up", _UP_KEYS), ("down", _DOWN_KEYS)):
        tensors = [v for k, v in state.items() if k.endswith(ends)]
        if tensors and all(not v.any() for v in tensors):
            raise MissingWeightsError(f"{path}: every lora_{side} tensor is 0, so every layer's change (up @ down x "
                                      f"alpha / rank) is zero and the adapter changes nothing (one saved before "
                                      f"training starts, whose lora_up are 0?); pass a trained adapter")


def check_lora_fits(state: dict[str, torch.Tensor], model_dir: str | Path, source: str | Path) -> None:
    """Refuse (MissingWeightsError, one line) an adapter diffusers cannot load into MODEL_DIR's UNet
    (wrong shapes or rank, keys naming no layer, a lora_down without its lora_up), before the model is
    loaded: diffusers' own `load_lora_weights` runs on the UNet built from its config on the meta device,
    so every key format diffusers reads is checked as it will be read, and no weight is touched."""
    try:
        skeleton = unet_skeleton(model_dir)
        _load_adapter(skeleton, state, source)
    except MissingWeightsError:
        why = unet_weights_mismatch(model_dir)     # a broken model folder, not the adapter, may be at fault
        if why:
            raise MissingWeightsError(why) from None
        raise


_PAIRS = (("lora_up", "lora_down"), ("lora_B", "lora_A"), ("lora.up", "lora.down"))


def _has_a_nonzero_pair(state: dict) -> bool:
    """Whether some layer of the adapter has a nonzero up and a nonzero down matrix."""
    for k, up in state.items():
        for u, d in _PAIRS:
            down = state.get(k.replace(u, d)) if u in k else None
            if down is not None and bool(torch.as_tensor(up).any()) and bool(torch.as_tensor(down).any()):
                return True
    return False


def fuse_lora_into(unet: nn.Module, lora: str | Path | dict, scale: float = 1.0) -> int:
    """Load `lora` into `unet` through diffusers' `load_lora_weights` (peft), fuse it at `scale` and drop
    the adapter layers: `unet` keeps the fused weights. Returns how many UNet tensors changed. An
    adapter that changes nothing, or makes a weight NaN/inf, is refused."""
    state, source = (lora, "the LoRA") if isinstance(lora, dict) else (read_lora(lora), lora)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pipe = _load_adapter(unet, state, source)
    with _library_output_captured():
        pipe.fuse_lora(components=["unet"], lora_scale=scale)
        pipe.unload_lora_weights()
    after = unet.state_dict()
    if set(after) != set(before):
        raise RuntimeError("unloading the fused LoRA left adapter tensors in the UNet")   # a diffusers change
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    broken = [k for k in changed if not torch.isfinite(after[k]).all()]
    if broken:
        raise MissingWeightsError(f"{source}: fused at scale {scale:g}, it makes {len(broken)} UNet weight tensor(s) "
                                  f"NaN/inf (e.g. {broken[0]}): its values are too large; pass a trained adapter")
    if not changed and scale != 0:
        if _has_a_nonzero_pair(state):                                 # a real adapter, a vanishing scale
            raise MissingWeightsError(f"{source}: fused at --lora-scale {scale:g}, it changed no UNet weight (the "
                                      "change is below float32's resolution); pass a larger --lora-scale")
        raise MissingWeightsError(f"{source}: fusing it changed no UNet weight (every layer's up @ down is zero); "
                                  "pass a trained adapter")
    return len(changed)


def _load_adapter(unet: nn.Module, state: dict[str, torch.Tensor], source):
    """`unet` with `state` loaded as peft adapter "lora" by diffusers' `load_lora_weights`; returns the
    pipeline holding it. What diffusers refuses, and an adapter with layers that match none of the
    UNet's, is a one-line MissingWeightsError that carries the libraries' first relevant detail."""
    fix = "pass an adapter for the SD1.5 UNet (such as LCM-LoRA)"
    with _library_output_captured() as said:
        from diffusers import StableDiffusionPipeline
        from peft.tuners.tuners_utils import BaseTunerLayer

        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        try:
            pipe.load_lora_weights(dict(state), adapter_name="lora")
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:  # shapes, unknown formats
            raise MissingWeightsError(f"{source}: diffusers cannot load this LoRA into the Arc2Face UNet "
                                      f"({_why(e)}); {fix}") from None
    layers = sum(k.endswith(_DOWN_KEYS) for k in state)
    adapted = sum(isinstance(m, BaseTunerLayer) for m in unet.modules())
    if adapted < layers:
        extra = next((m for m in said if "unexpected keys" in m), "")
        extra = f" ({' '.join(extra.split())[:200]})" if extra else ""
        bare = [k for k in state if re.match(r"^(?:base_model\.model\.)?(?:down_blocks|up_blocks|mid_block)\.", k)]
        if bare:   # peft's own save format: UNet module paths without the "unet." prefix diffusers reads
            fix = (f"its keys (e.g. {bare[0]}) are UNet module paths without the 'unet.' prefix diffusers expects "
                   "(peft's own format): rename them to unet.<path>, or save the adapter with diffusers")
        raise MissingWeightsError(f"{source}: {layers - adapted} of its {layers} layers name no layer of this "
                                  f"UNet{extra}; {fix}")
    return pipe


_MISMATCH = re.compile(r"size mismatch for (\S+?)(?:\.lora)?\.weight: copying a param with shape torch\.Size\((.*?)\) "
                       r"from checkpoint, the shape in current model is torch\.Size\((.*?)\)")


def _why(e: BaseException) -> str:
    """The first useful line of what diffusers/peft/torch raised for an adapter."""
    if isinstance(e, KeyError):
        return f"no tensor {e.args[0] if e.args else ''}: every lora_down needs its lora_up"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    sizes = [m for m in map(_MISMATCH.search, lines) if m]
    if sizes:
        name, got, want = sizes[0].groups()
        return f"{len(sizes)} tensor(s) of the wrong shape, e.g. {name}: {got} in the file, {want} in this UNet"
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


@contextlib.contextmanager
def _library_output_captured():
    """Keep diffusers', peft's and transformers' output off the terminal (a refused adapter printed ~86
    lines: "Loading lora was unsuccessful ...", one "size mismatch" per layer; a good one the notices
    "CLIPImageProcessor requires torchvision" and "No LoRA keys associated to ..."): their log records
    and warnings are collected (yielded as a list of messages) and logged at INFO (shown by -v)."""
    import diffusers  # noqa: F401  (each library gives its logger its handler on import: replaced below)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler, saved = Collect(logging.WARNING), []
    for name in ("diffusers", "peft", "transformers"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers[:], lg.propagate = [handler], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
        said.extend(str(w.message) for w in caught)
        for msg in said:
            log.info("while loading the LoRA: %s", " ".join(msg.split())[:300])
