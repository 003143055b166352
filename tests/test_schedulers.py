"""Scheduler tables against diffusers itself.

Each table is run through the exact update the step graph computes (see specs.COEFF_NAMES) and
compared with diffusers' own loop (set_timesteps, scale_model_input, step) driven by the same
deterministic fake model, from the same initial latents (and, for LCM, the same step noise).

Two oracles:
* "diffusers at float64": diffusers' scheduler code unchanged, but with the names `torch` and `np`
  in its module replaced by views whose `float32` is float64. Stock diffusers builds its tables
  (betas, alphas_cumprod, sigmas) in float32 and casts the sample to float32 inside DPM/Euler
  step(), which alone moves results by ~5e-7 (1e-5 for one-step Euler, whose sigma(t=0) loses
  digits in float32); the substitution (plus torch's default dtype set to float64, which LCM's
  c_skip/c_out use) changes only that precision, never the logic, so with it our float64 tables
  agree to ~1e-15 and a mismatch beyond TOL64 (1e-9) is a logic error.
* stock diffusers (float32 internals): our float64 table, and our float32 table run in float32
  like the device, must still agree with it to 1e-4.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from arc2face_rt.errors import InvalidInputError
from arc2face_rt.schedulers import SCHEDULERS, SD15_SCHEDULER_CONFIG, Schedule, make_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_discrete,
    scheduling_lcm,
)

MODULES = {
    "dpmpp2m": (scheduling_dpmsolver_multistep, "DPMSolverMultistepScheduler"),
    "ddim": (scheduling_ddim, "DDIMScheduler"),
    "euler": (scheduling_euler_discrete, "EulerDiscreteScheduler"),
    "lcm": (scheduling_lcm, "LCMScheduler"),
}
STEPS = (1, 2, 4, 7, 25, 50)
# Against diffusers at float64 we observe <= 2e-15; 1e-9 leaves room for other BLAS/numpy builds.
TOL64 = 1e-9
SHAPE = (2, 4, 8, 8)


def fake_eps(x, t: float):
    """Deterministic stand-in for the UNet: nonlinear in x, depends on t (numpy or torch input)."""
    lib = torch if isinstance(x, torch.Tensor) else np
    return 0.5 * lib.tanh(x) + 0.1 * math.cos(t / 100.0) + 0.05 * lib.sin(3.0 * x + t / 250.0)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _Float64View:
    """A stand-in for the `torch` / `np` module whose float32 is float64 (everything else delegated)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


@contextlib.contextmanager
def diffusers_scheduler(name: str, config: dict, float64: bool, noises: list[np.ndarray]):
    """Yield `XScheduler.from_config(config)`, optionally at float64, with LCM's noise supplied.

    LCM draws its step noise with `randn_tensor(shape, generator=..., device=..., dtype=...)`
    imported into scheduling_lcm; we replace that name by a function that hands out our noise
    arrays in order (and checks the requested shape), so both sides add the very same noise and
    the number of draws diffusers makes is checked against the table's nonzero c3 entries.
    """
    module, cls_name = MODULES[name]
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE
        k = len(draws)
        draws.append(k)
        return torch.from_numpy(noises[k]).to(dtype=dtype)

    default_dtype = torch.get_default_dtype()
    with pytest.MonkeyPatch.context() as mp:
        if float64:
            mp.setattr(module, "torch", _Float64View(torch))
            mp.setattr(module, "np", _Float64View(np))
            # LCM's c_skip/c_out come from `int64 tensor * 10.0`, i.e. torch's default dtype.
            torch.set_default_dtype(torch.float64)
        mp.setattr(module, "randn_tensor", fake_randn, raising=False)
        try:
            sched = getattr(diffusers, cls_name).from_config(config)
            sched.draws = draws
            yield sched
        finally:
            torch.set_default_dtype(default_dtype)


def run_diffusers(name: str, steps: int, x0: np.ndarray, noises, float64: bool, config=None):
    """diffusers' sampling loop in float64 tensors; returns (timesteps, init_noise_sigma, xs, n_draws)."""
    config = SD15_SCHEDULER_CONFIG if config is None else config
    with diffusers_scheduler(name, config, float64, noises) as sched:
        sched.set_timesteps(steps)
        init = float(sched.init_noise_sigma)
        x = torch.from_numpy(x0) * init
        xs = []
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            eps = fake_eps(x_in, float(t))
            x = sched.step(eps, t, x).prev_sample
            assert x.dtype == torch.float64
            xs.append(x.numpy().copy())
        return sched.timesteps.numpy().astype(np.float64), init, xs, len(sched.draws)


def run_table(sched: Schedule, x0: np.ndarray, noises, dtype=np.float64):
    """The step graph's arithmetic, row by row, in `dtype` (float32 = what the device does)."""
    table = sched.table(dtype)
    x = (x0 * sched.init_noise_sigma).astype(dtype)
    m_prev = np.zeros_like(x)
    xs = []
    for k, (t, s, a, b, c0, c1, c2, c3) in enumerate(table):
        eps = fake_eps(s * x, float(t)).astype(dtype)
        m0 = a * x + b * eps
        x = c0 * x + c1 * m0 + c2 * m_prev + c3 * noises[k].astype(dtype)
        m_prev = m0
        assert x.dtype == dtype
        xs.append(x)
    return xs


def inputs(steps: int):
    rng = np.random.default_rng(1234 + steps)
    x0 = rng.standard_normal(SHAPE)
    noises = [rng.standard_normal(SHAPE) for _ in range(steps)]
    return x0, noises


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name, steps):
    sched = make_schedule(name, steps)
    x0, noises = inputs(steps)
    ours = run_table(sched, x0, noises)

    # diffusers at float64: same timesteps, init sigma and every intermediate latent.
    ts, init, ref, draws = run_diffusers(name, steps, x0, noises, float64=True)
    np.testing.assert_array_equal(sched.timesteps, ts)
    assert sched.init_noise_sigma == pytest.approx(init, rel=1e-12)
    assert draws == int(np.count_nonzero(sched.coeffs[:, 7]))
    assert len(ours) == len(ref) == sched.steps
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert rel(a, b) <= TOL64, f"{name} steps={steps}: step {k} differs by {rel(a, b):.2e}"

    # stock diffusers (float32 tables): its float32 timesteps are ours rounded to float32; the
    # float64 table stays within 1e-4 at every step, the float32 device-style run at the end.
    ts32, init32, ref32, draws32 = run_diffusers(name, steps, x0, noises, float64=False)
    np.testing.assert_array_equal(sched.table(np.float32)[:, 0], ts32.astype(np.float32))
    assert sched.init_noise_sigma == pytest.approx(init32, rel=1e-4)
    assert draws32 == draws
    assert max(rel(a, b) for a, b in zip(ours, ref32)) <= 1e-4
    ours32 = run_table(sched, x0, noises, np.float32)
    assert rel(ours32[-1], ref32[-1]) <= 1e-4


# Config variants a model folder might carry: each must still match diffusers at float64.
VARIANTS = [
    ("ddim", {"timestep_spacing": "trailing"}),
    ("ddim", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("euler", {"timestep_spacing": "leading"}),
    ("euler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("dpmpp2m", {"timestep_spacing": "leading"}),
    ("dpmpp2m", {"timestep_spacing": "trailing", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("dpmpp2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp2m", {"solver_order": 1, "beta_schedule": "squaredcos_cap_v2"}),
    ("lcm", {"original_inference_steps": 25, "timestep_scaling": 5.0}),
    ("euler", {"trained_betas": np.linspace(2e-4, 0.03, 1000).tolist()}),
]


@pytest.mark.parametrize("steps", (7, 20))
@pytest.mark.parametrize("name,override", VARIANTS)
def test_config_variants_match_diffusers(name, override, steps):
    config = {**SD15_SCHEDULER_CONFIG, **override}
    sched = make_schedule(name, steps, config)
    x0, noises = inputs(steps)
    ours = run_table(sched, x0, noises)
    ts, init, ref, draws = run_diffusers(name, steps, x0, noises, float64=True, config=config)
    np.testing.assert_array_equal(sched.timesteps, ts)
    assert sched.init_noise_sigma == pytest.approx(init, rel=1e-12)
    assert draws == int(np.count_nonzero(sched.coeffs[:, 7]))
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert rel(a, b) <= TOL64, f"{name} {override} steps={steps}: step {k} differs by {rel(a, b):.2e}"


def test_dpm_25_timesteps():
    expected = [999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519,
                480, 440, 400, 360, 320, 280, 240, 200, 160, 120, 80, 40]
    sched = make_schedule("dpmpp2m", 25)
    assert sched.timesteps.tolist() == expected
    # first and last steps are first order (no m_prev term), the others second order.
    c2 = sched.coeffs[:, 6]
    assert c2[0] == 0 and c2[-1] == 0 and np.all(c2[1:-1] != 0)
    # the last step lands on sigma 0: x_out = m0.
    assert sched.coeffs[-1, 4:].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_init_noise_sigma_and_noise_flags():
    for name in ("dpmpp2m", "ddim", "lcm"):
        assert make_schedule(name, 25).init_noise_sigma == 1.0
    # Euler, linspace spacing: sigma_max itself (diffusers returns sqrt(sigma_max^2+1) only for "leading").
    assert make_schedule("euler", 25).init_noise_sigma == pytest.approx(14.6146, abs=1e-4)
    leading = make_schedule("euler", 25, {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    smax = -leading.coeffs[0, 3]
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(smax**2 + 1), rel=1e-12)
    assert make_schedule("lcm", 4).uses_noise and not make_schedule("lcm", 1).uses_noise
    for name in ("dpmpp2m", "ddim", "euler"):
        assert not make_schedule(name, 25).uses_noise


def test_table_layout():
    sched = make_schedule("dpmpp2m", 25)
    t32 = sched.table()
    assert t32.dtype == np.float32 and t32.shape == (25, 8) and t32.flags.c_contiguous
    assert sched.steps == 25 and sched.coeffs.dtype == np.float64
    assert not sched.coeffs.flags.writeable
    t32[0, 0] = -1.0                       # a copy: the schedule is unaffected
    assert sched.coeffs[0, 0] == 999.0
    t64 = sched.table(np.float64)
    assert t64.dtype == np.float64 and t64.flags.c_contiguous and t64.flags.writeable


def test_sd15_config_as_released():
    assert SD15_SCHEDULER_CONFIG == json.loads("""{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "trained_betas": null, "clip_sample": false}""")
    before = json.dumps(SD15_SCHEDULER_CONFIG, sort_keys=True)
    for name in SCHEDULERS:
        make_schedule(name, 4)
    assert json.dumps(SD15_SCHEDULER_CONFIG, sort_keys=True) == before


@pytest.mark.parametrize("name,steps,config,match", [
    ("pndm", 25, None, "dpmpp2m, ddim, euler, lcm"),
    ("dpmpp2m", 0, None, "--steps 0"),
    ("ddim", -3, None, "--steps -3"),
    ("euler", 1001, None, "1..1000"),
    ("ddim", 1000, None, "training range"),            # leading spacing + steps_offset 1 reaches t=1000
    ("dpmpp2m", 1000, None, "repeated timesteps"),     # linspace rounding repeats a timestep
    ("dpmpp2m", 2.5, None, "integer"),
    ("lcm", 51, None, "original_inference_steps"),
    ("ddim", 25, {"beta_schedule": "scaled_linear"}, "clip_sample"),   # DDIM's default clips x0
    ("euler", 25, {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, "epsilon"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True}, "Karras"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "solver_order": 3}, "solver_order"),
    ("ddim", 25, {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "sideways"}, "timestep_spacing"),
    ("ddim", 25, {**SD15_SCHEDULER_CONFIG, "beta_schedule": "quadratic"}, "beta_schedule"),
    ("ddim", 25, [1, 2], "dict"),
    # hostile values a manifest may carry: refused with InvalidInputError, never another exception or a hang
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "num_train_timesteps": 10**9}, "num_train_timesteps"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "num_train_timesteps": float("inf")}, "is not a number"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "steps_offset": 1e400}, "is not a number"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "beta_end": 2}, "beta_end"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "beta_start": float("nan")}, "beta_start"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "trained_betas": ["x"] * 1000}, "trained_betas"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "trained_betas": {"a": 1}}, "trained_betas"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "trained_betas": [[0.1], [0.1, 0.2]]}, "trained_betas"),
    ("dpmpp2m", 25, {**SD15_SCHEDULER_CONFIG, "trained_betas": [None] * 1000}, "trained_betas"),
    ("lcm", 4, {**SD15_SCHEDULER_CONFIG, "original_inference_steps": 1e400}, "is not a number"),
    # betas in range whose alpha_bar all but vanishes: coefficients past float32 (NaN latents, blamed on weights)
    *[(name, 4 if name == "lcm" else 25, {**SD15_SCHEDULER_CONFIG, **betas}, "beyond float32")
      for name in ("dpmpp2m", "ddim", "euler", "lcm")
      for betas in ({"beta_end": 0.9}, {"beta_schedule": "linear", "beta_end": 0.5})],
    # betas whose alpha_bar reaches exactly 0: a ZeroDivisionError traceback in DDIM's and LCM's scalar maths
    ("lcm", 4, {**SD15_SCHEDULER_CONFIG, "beta_schedule": "linear", "beta_end": 0.9}, "non-finite"),
    ("lcm", 1, {**SD15_SCHEDULER_CONFIG, "beta_schedule": "linear", "beta_end": 0.9}, "non-finite"),
    ("ddim", 25, {**SD15_SCHEDULER_CONFIG, "beta_schedule": "linear", "beta_end": 0.99}, "non-finite"),
])
def test_errors(name, steps, config, match):
    with pytest.raises(InvalidInputError, match=match):
        make_schedule(name, steps, config)


def test_module_does_not_import_torch():
    code = ("import sys; import arc2face_rt.schedulers as s; s.make_schedule('dpmpp2m', 25); "
            "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
