"""Host-side scheduler tables: each sampler as one row of linear coefficients per denoise step.

The exported step graph (see specs.py) computes, for one row (t, s, a, b, c0, c1, c2, c3):

    x_in  = s*x                                  model-input scaling
    eps   = UNet(x_in, t, cond)                  (CFG mix inside the graph)
    m0    = a*x + b*eps                          data prediction
    x_out = c0*x + c1*m0 + c2*m_prev + c3*noise  next latents

then x := x_out, m_prev := m0 (zeros before the first step); the initial latents are standard
normal noise times `init_noise_sigma`. Only LCM uses `noise` (fresh standard normal per step).

Every table reproduces the diffusers scheduler built by `XScheduler.from_config(config)` with
default arguments, in float64 instead of diffusers' float32 tables; the derivation of each linear
form is commented next to its builder. Options that a linear table cannot express (sample
clipping, thresholding, non-epsilon prediction, Karras sigmas, ...) are refused with
InvalidInputError rather than silently ignored.

This module imports only numpy and the standard library: it runs on the device host (Jetson).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
import numpy as np
import numpy.typing as npt

from .errors import InvalidInputError
from .specs import COEFF_NAMES

__all__ = ["SCHEDULERS", "SD15_SCHEDULER_CONFIG", "Schedule", "make_schedule"]

SCHEDULERS = ("dpmpp2m", "ddim", "euler", "lcm")

# stable-diffusion-v1-5 scheduler/scheduler_config.json as released (Arc2Face ships the same).
SD15_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

_T, _S, _A, _B, _C0, _C1, _C2, _C3 = range(len(COEFF_NAMES))
assert COEFF_NAMES == ("t", "s", "a", "b", "c0", "c1", "c2", "c3")


@dataclass(frozen=True, eq=False)
class Schedule:
    """The per-step coefficient table of one sampler at one step count.

    coeffs: [N, 8] float64 (read-only), columns specs.COEFF_NAMES; row k drives UNet call k.
    init_noise_sigma: the initial latents are standard normal noise times this.
    uses_noise: True if any step adds fresh noise (c3 != 0; LCM only).
    """

    name: str
    coeffs: np.ndarray
    init_noise_sigma: float
    uses_noise: bool

    @property
    def timesteps(self) -> np.ndarray:
        """UNet timestep of each step (float64; fractional for some Euler spacings)."""
        return self.coeffs[:, _T]

    @property
    def steps(self) -> int:
        """Number of UNet evaluations (rows)."""
        return int(self.coeffs.shape[0])

    def table(self, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """A fresh C-contiguous [N, 8] copy in `dtype`, ready to upload as the device table."""
        return np.array(self.coeffs, dtype=dtype, order="C", copy=True)


# --- config handling --------------------------------------------------------------------------

# diffusers' __init__ defaults of each scheduler, for the options this module reads or refuses.
_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
_DEFAULTS = {
    "ddim": {**_COMMON_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
             "timestep_spacing": "leading"},
    "euler": {**_COMMON_DEFAULTS, "interpolation_type": "linear", "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "timestep_spacing": "linspace",
              "final_sigmas_type": "zero"},
    "dpmpp2m": {**_COMMON_DEFAULTS, "solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -math.inf, "variance_type": None, "timestep_spacing": "linspace"},
    # LCMScheduler's own beta defaults differ from the others'.
    "lcm": {**_COMMON_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "clip_sample": False, "set_alpha_to_one": True, "thresholding": False,
            "timestep_spacing": "leading", "timestep_scaling": 10.0},
}

# Options whose other values a linear table cannot reproduce (or this module does not implement):
# option -> (allowed values, why). Checked on the merged (config over diffusers default) value.
_FALSY = (False, None)
_RESTRICTIONS = {
    "prediction_type": (("epsilon",), "Arc2Face is an epsilon-prediction model"),
    "rescale_betas_zero_snr": (_FALSY, "zero-terminal-SNR rescaling is not supported"),
    "thresholding": (_FALSY, "dynamic thresholding is not linear"),
    "clip_sample": (_FALSY, "clipping the predicted sample is not linear; set clip_sample to false"),
    "interpolation_type": (("linear",), "only linear sigma interpolation is supported"),
    "use_karras_sigmas": (_FALSY, "Karras sigmas are not supported"),
    "use_exponential_sigmas": (_FALSY, "exponential sigmas are not supported"),
    "use_beta_sigmas": (_FALSY, "beta sigmas are not supported"),
    "use_lu_lambdas": (_FALSY, "Lu lambdas are not supported"),
    "use_flow_sigmas": (_FALSY, "flow sigmas are not supported"),
    "variance_type": ((None,), "learned variance is not supported"),
    "lambda_min_clipped": ((-math.inf,), "lambda clipping is not supported"),
    # diffusers maps the deprecated "deis" to dpmsolver++ and logrho/bh1/bh2 to midpoint.
    "algorithm_type": (("dpmsolver++", "deis"), "only DPM-Solver++ (data prediction) is supported"),
    "solver_type": (("midpoint", "logrho", "bh1", "bh2"), "only the midpoint solver is supported"),
    "solver_order": ((1, 2), "the step graph keeps one previous prediction (solver_order <= 2)"),
    "final_sigmas_type": (("zero", "sigma_min"), "final_sigmas_type must be 'zero' or 'sigma_min'"),
}
_SPACINGS = ("linspace", "leading", "trailing")
MAX_TRAIN_TIMESTEPS = 100_000   # a bound on what a config may ask us to tabulate (SD uses 1000)
_CLASS_NAMES = {"dpmpp2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
                "euler": "EulerDiscreteScheduler", "lcm": "LCMScheduler"}


def _effective_config(name: str, config: Mapping) -> dict:
    """diffusers' from_config: the scheduler's defaults overridden by the keys it accepts."""
    defaults = _DEFAULTS[name]
    cfg = {k: config.get(k, v) for k, v in defaults.items()}
    for key, value in cfg.items():
        if key in _RESTRICTIONS:
            allowed, why = _RESTRICTIONS[key]
            if not any(value is a or (type(value) is not bool and value == a) for a in allowed):
                raise InvalidInputError(
                    f"scheduler {name!r} ({_CLASS_NAMES[name]}): {key}={value!r} is unsupported: {why}")
    if cfg["timestep_spacing"] not in _SPACINGS:
        raise InvalidInputError(
            f"scheduler config: timestep_spacing={cfg['timestep_spacing']!r}; valid: {', '.join(_SPACINGS)}")
    for key, kind in (("num_train_timesteps", int), ("steps_offset", int), ("beta_start", float), ("beta_end", float)):
        try:
            cfg[key] = kind(cfg[key])
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidInputError(f"scheduler config: {key}={cfg[key]!r} is not a number ({e})") from None
    n = cfg["num_train_timesteps"]
    if not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        raise InvalidInputError(f"scheduler config: num_train_timesteps={n} must be in 1..{MAX_TRAIN_TIMESTEPS} "
                                "(Stable Diffusion uses 1000)")
    if not 0 <= cfg["steps_offset"] < n:
        raise InvalidInputError(f"scheduler config: steps_offset={cfg['steps_offset']} must be in 0..{n - 1}")
    for key in ("beta_start", "beta_end"):
        if not 0.0 <= cfg[key] < 1.0:
            raise InvalidInputError(f"scheduler config: {key}={cfg[key]} must be in [0, 1) (a noise variance "
                                    "per training step; Stable Diffusion uses 0.00085 .. 0.012)")
    return cfg


def _alphas_cumprod(cfg: dict) -> np.ndarray:
    """alpha_bar[t] = prod_{i<=t} (1 - beta_i), t = 0..T-1, from the config's beta schedule (float64)."""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        try:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise InvalidInputError("scheduler config: trained_betas is not a list of numbers") from None
        if betas.shape[0] != n:
            raise InvalidInputError(f"scheduler config: trained_betas has {betas.shape[0]} values, "
                                    f"num_train_timesteps is {n}")
        if not np.all((betas >= 0) & (betas < 1)):
            raise InvalidInputError("scheduler config: trained_betas must all be in [0, 1)")
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        # diffusers' betas_for_alpha_bar(n), cosine transform, max_beta 0.999.
        def bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float64)
    else:
        raise InvalidInputError(f"scheduler config: beta_schedule={cfg['beta_schedule']!r} is unsupported; "
                                "valid: linear, scaled_linear, squaredcos_cap_v2")
    return np.cumprod(1.0 - betas)


def _spaced_timesteps(cfg: dict, steps: int, linspace_end: int) -> np.ndarray:
    """The 'leading' / 'trailing' spacings shared by DDIM and Euler (float64, descending)."""
    n = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, linspace_end, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1] + cfg["steps_offset"]
    return np.arange(n, 0, -n / steps).round() - 1   # trailing


# --- the four samplers -----------------------------------------------------------------------

def _ddim(cfg: dict, steps: int) -> tuple[np.ndarray, float]:
    # DDIMScheduler, eta = 0. With A = alpha_bar[t], P = alpha_bar[t - T//N] (or the final value):
    #   x0 = (x - sqrt(1-A) eps) / sqrt(A)                  -> a = 1/sqrt(A), b = -sqrt(1-A)/sqrt(A)
    #   x' = sqrt(P) x0 + sqrt(1-P) eps, eps = (x - sqrt(A) x0)/sqrt(1-A)
    #      = sqrt((1-P)/(1-A)) x + (sqrt(P) - sqrt((1-P)/(1-A)) sqrt(A)) x0   -> c0, c1
    # diffusers quirk kept: the previous timestep is always t - T//N, whatever the spacing.
    ac = _alphas_cumprod(cfg)
    n = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    ts = _spaced_timesteps(cfg, steps, n - 1)
    if spacing == "linspace":
        ts = ts.round()
    ts = ts.astype(np.int64)
    _check_range(ts, n, "ddim")
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    rows = np.zeros((len(ts), len(COEFF_NAMES)))
    for k, t in enumerate(ts):
        prev = t - n // steps
        A = ac[t]
        P = ac[prev] if prev >= 0 else final
        c0 = math.sqrt((1 - P) / (1 - A))
        rows[k, [_T, _S, _A, _B, _C0, _C1]] = (t, 1.0, 1 / math.sqrt(A), -math.sqrt((1 - A) / A),
                                               c0, math.sqrt(P) - c0 * math.sqrt(A))
    return rows, 1.0


def _euler(cfg: dict, steps: int) -> tuple[np.ndarray, float]:
    # EulerDiscreteScheduler (s_churn = 0). sigma(t) = sqrt((1-alpha_bar)/alpha_bar), linearly
    # interpolated at (possibly fractional) t; sigma_N = 0 (or sigma_min). With sg = sigma_k, sn = sigma_{k+1}:
    #   x_in = x / sqrt(sg^2 + 1)                          -> s
    #   x0 = x - sg eps                                    -> a = 1, b = -sg
    #   x' = x + (x - x0)/sg * (sn - sg) = (sn/sg) x + (1 - sn/sg) x0   -> c0, c1
    # init_noise_sigma: sigma_max for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading.
    ac = _alphas_cumprod(cfg)
    n = cfg["num_train_timesteps"]
    ts = _spaced_timesteps(cfg, steps, n - 1)
    _check_range(ts, n, "euler")
    sig_table = np.sqrt((1 - ac) / ac)
    sig = np.interp(ts, np.arange(n), sig_table)
    last = sig_table[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sig = np.concatenate([sig, [last]])
    rows = np.zeros((len(ts), len(COEFF_NAMES)))
    for k, t in enumerate(ts):
        sg, sn = sig[k], sig[k + 1]
        rows[k, [_T, _S, _A, _B, _C0, _C1]] = (t, 1 / math.sqrt(sg * sg + 1), 1.0, -sg, sn / sg, 1 - sn / sg)
    smax = float(sig.max())
    init = smax if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(smax * smax + 1)
    return rows, init


def _dpmpp2m(cfg: dict, steps: int) -> tuple[np.ndarray, float]:
    # DPMSolverMultistepScheduler, dpmsolver++ / midpoint. For VP sigma sg = sqrt((1-alpha_bar)/alpha_bar):
    # alpha = 1/sqrt(sg^2+1), sigma = sg*alpha, lambda = log(alpha/sigma) = -log(sg). Step k goes from
    # sg_k to sg_{k+1} (sg_N = 0 or sigma_min), h = lambda_{k+1} - lambda_k, so exp(-h) = sg_{k+1}/sg_k:
    #   m0 = (x - sigma_k eps)/alpha_k                     -> a = sqrt(sg_k^2+1), b = -sg_k
    #   1st order: x' = (sigma_{k+1}/sigma_k) x + C m0,   C = alpha_{k+1} (1 - exp(-h))
    #   2nd order: x' = (sigma_{k+1}/sigma_k) x + C (m0 + (m0 - m_prev)/(2 r0)),  r0 = h_{k-1}/h
    #              -> c1 = C (1 + 1/(2 r0)), c2 = -C/(2 r0)
    # First order on step 0 (no m_prev), when solver_order == 1, and on the last step when
    # euler_at_final, or lower_order_final with N < 15, or final_sigmas_type == "zero" (exactly
    # diffusers' step(); its "lower_order_second" only demotes third-order steps, unused here).
    ac = _alphas_cumprod(cfg)
    n = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    # lambda_min_clipped = -inf  ->  diffusers' last_timestep == num_train_timesteps.
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
    else:
        ts = np.arange(n, 0, -n / steps).round() - 1
    ts = ts.astype(np.int64)
    _check_range(ts, n, "dpmpp2m")
    sig_table = np.sqrt((1 - ac) / ac)
    last = sig_table[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sig = np.concatenate([sig_table[ts], [last]])
    alpha = 1 / np.sqrt(sig * sig + 1)
    sigma = sig * alpha
    count = len(ts)
    rows = np.zeros((count, len(COEFF_NAMES)))
    for k in range(count):
        final_low = k == count - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and count < 15)
                                        or cfg["final_sigmas_type"] == "zero")
        first = cfg["solver_order"] == 1 or k == 0 or final_low
        exp_mh = sig[k + 1] / sig[k]
        C = alpha[k + 1] * (1 - exp_mh)
        if first:
            c1, c2 = C, 0.0
        else:
            # numpy scalars: a repeated timestep gives inf/nan here (as in diffusers) and is
            # refused by make_schedule's finiteness check instead of raising ZeroDivisionError.
            with np.errstate(divide="ignore", invalid="ignore"):
                r0 = np.log(sig[k - 1] / sig[k]) / np.log(sig[k] / sig[k + 1])
                c1, c2 = C * (1 + 0.5 / r0), -C * 0.5 / r0
        rows[k, [_T, _S, _A, _B, _C0, _C1, _C2]] = (ts[k], 1.0, math.sqrt(sig[k] ** 2 + 1), -sig[k],
                                                    sigma[k + 1] / sigma[k], c1, c2)
    return rows, 1.0


def _lcm(cfg: dict, steps: int) -> tuple[np.ndarray, float]:
    # LCMScheduler. Timesteps: every (T // original_inference_steps)-th training step
    # (19, 39, ..., 999 for 50), N of them picked by floor(linspace(0, 50, N, endpoint=False)).
    # With A = alpha_bar[t], P = alpha_bar[next t], u = timestep_scaling * t, sigma_data = 0.5:
    #   c_skip = 0.25/(u^2 + 0.25), c_out = u/sqrt(u^2 + 0.25)
    #   m0 = denoised = c_out (x - sqrt(1-A) eps)/sqrt(A) + c_skip x
    #        -> a = c_out/sqrt(A) + c_skip, b = -c_out sqrt(1-A)/sqrt(A)
    #   x' = sqrt(P) m0 + sqrt(1-P) noise_k                -> c1 = sqrt(P), c3 = sqrt(1-P)
    #   last step: x' = m0 (no noise)                      -> c1 = 1, c3 = 0
    # timestep_spacing, steps_offset and set_alpha_to_one have no effect on LCM in diffusers.
    ac = _alphas_cumprod(cfg)
    n = cfg["num_train_timesteps"]
    try:
        original = int(cfg["original_inference_steps"])
        scaling = float(cfg["timestep_scaling"])
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInputError("scheduler config: original_inference_steps or timestep_scaling is not a number "
                                f"({e})") from None
    if not math.isfinite(scaling) or scaling <= 0:
        raise InvalidInputError(f"scheduler 'lcm': timestep_scaling={scaling} must be a positive number")
    if not 1 <= original <= n:
        raise InvalidInputError(f"scheduler 'lcm': original_inference_steps={original} must be in 1..{n}")
    if steps > original:
        raise InvalidInputError(f"scheduler 'lcm': steps={steps} exceeds original_inference_steps={original} "
                                f"(LCM samples a subset of its {original} distillation timesteps); "
                                f"use 1..{original} steps")
    origin = (np.arange(1, original + 1) * (n // original) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    _check_range(ts, n, "lcm")
    rows = np.zeros((len(ts), len(COEFF_NAMES)))
    for k, t in enumerate(ts):
        last = k == len(ts) - 1
        A = ac[t]
        P = ac[ts[k + 1]] if not last else A
        u = float(t) * scaling
        c_skip = 0.25 / (u * u + 0.25)
        c_out = u / math.sqrt(u * u + 0.25)
        rows[k, [_T, _S, _A, _B]] = (t, 1.0, c_out / math.sqrt(A) + c_skip, -c_out * math.sqrt((1 - A) / A))
        rows[k, [_C1, _C3]] = (1.0, 0.0) if last else (math.sqrt(P), math.sqrt(1 - P))
    return rows, 1.0


def _check_range(ts: np.ndarray, n: int, name: str) -> None:
    # DDIM/LCM would fail on such a timestep in diffusers (IndexError); DPM/Euler would clamp the
    # sigma lookup and still feed t >= T to the UNet. Refused for all (only reachable with
    # "leading" spacing plus steps_offset at ~T steps).
    if len(ts) and (ts.min() < 0 or ts.max() > n - 1):
        raise InvalidInputError(f"scheduler {name!r} with {len(ts)} steps: timesteps {ts.min():g}..{ts.max():g} "
                                f"fall outside the training range 0..{n - 1}; use fewer steps or another "
                                "timestep_spacing / steps_offset")


_BUILDERS = {"dpmpp2m": _dpmpp2m, "ddim": _ddim, "euler": _euler, "lcm": _lcm}


def make_schedule(name: str, steps: int, config: Mapping | None = None) -> Schedule:
    """Build the coefficient table of scheduler `name` (one of SCHEDULERS) for `steps` UNet calls.

    `config` is a scheduler_config.json dict (default SD15_SCHEDULER_CONFIG), read the way diffusers'
    `from_config` reads it: keys the scheduler does not take are ignored, missing keys take that
    scheduler's diffusers default. Raises InvalidInputError for an unknown name, steps outside
    1..num_train_timesteps (1..original_inference_steps for LCM), or a config option a linear table
    cannot reproduce.
    """
    if name not in _BUILDERS:
        raise InvalidInputError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if config is None:
        config = SD15_SCHEDULER_CONFIG
    if not isinstance(config, Mapping):
        raise InvalidInputError(f"scheduler config must be a dict, got {type(config).__name__}")
    cfg = _effective_config(name, config)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise InvalidInputError(f"steps must be an integer, got {steps!r}")
    steps = int(steps)
    n = cfg["num_train_timesteps"]
    if not 1 <= steps <= n:
        raise InvalidInputError(f"--steps {steps} is out of range for this model: use 1..{n} "
                                "(its scheduler's num_train_timesteps)")
    try:
        with np.errstate(all="ignore"):         # numpy's inf/NaN are refused just below
            rows, init_noise_sigma = _BUILDERS[name](cfg, steps)
    except (ZeroDivisionError, OverflowError):  # math's scalar arithmetic raises where numpy's gives inf
        rows, init_noise_sigma = np.array([math.inf]), math.inf
    if not np.all(np.isfinite(rows)) or not math.isfinite(init_noise_sigma):
        raise InvalidInputError(f"scheduler {name!r} with steps={steps} gives non-finite coefficients (repeated "
                                "timesteps, or a noise schedule that reaches zero signal); use fewer steps or "
                                "check the scheduler config's betas")
    big = max(float(np.abs(rows).max()), abs(init_noise_sigma))
    if big > float(np.finfo(np.float32).max):   # the device table and the graphs are float32: inf, then NaN latents
        raise InvalidInputError(f"scheduler {name!r} with steps={steps} gives coefficients up to {big:.3g}, beyond "
                                "float32 (a noise schedule that all but reaches zero signal); check the scheduler "
                                "config's betas (Stable Diffusion: scaled_linear, 0.00085 .. 0.012)")
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    rows.setflags(write=False)
    return Schedule(name=name, coeffs=rows, init_noise_sigma=float(init_noise_sigma),
                    uses_noise=bool(np.any(rows[:, _C3] != 0)))
