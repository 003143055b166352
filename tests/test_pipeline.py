"""End-to-end parity of the ONNX Runtime pipeline with the PyTorch reference and with diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from arc2face_rt.errors import InvalidInputError
from arc2face_rt.pipeline import (Arc2FacePipeline, GenerationOptions, image_noise, normalize_identity,
                                  random_identity)
from arc2face_ref.pipeline import ReferencePipeline, diffusers_scheduler
from arc2face_ref.projector import Arc2FaceProjector, unconditional_embedding


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def ref(tiny_models):
    return ReferencePipeline(tiny_models)


def _latents(pipe, seed, n, scheduler, steps):
    sched = pipe.schedule(scheduler, steps)
    return np.stack([image_noise(seed, i, sched)[0] for i in range(n)])


def _diffusers_images(models, ids, latents, steps, guidance):
    """Oracle we did not write: diffusers' StableDiffusionPipeline given the same prompt embeddings."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(vae=models.vae, text_encoder=models.encoder, tokenizer=None, unet=models.unet,
                                 scheduler=diffusers_scheduler("dpmpp2m", models.scheduler_config),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = Arc2FaceProjector(models.encoder)(torch.from_numpy(ids))
        uncond = unconditional_embedding(models.encoder)[None].expand_as(cond)
        out = sd(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=torch.from_numpy(latents),
                 num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
    return np.round(out * 255).astype(np.uint8)


def test_default_generation_matches_reference_and_diffusers(pipe, ref, tiny_models):
    """25 DPM-Solver++ steps, guidance 3: images within one grey level, latents step by step."""
    ident = random_identity(7)
    opts = GenerationOptions(steps=25, guidance=3.0, seed=11, batch_size=2)
    got = pipe.generate(ident, 2, opts).images
    lat = _latents(pipe, 11, 2, "dpmpp2m", 25)
    ids = np.repeat(ident[None], 2, axis=0)
    want, traj = ref(ids, lat, steps=25, guidance=3.0, return_trajectory=True)
    assert got.shape == (2, 512, 512, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    sd = _diffusers_images(tiny_models, ids, lat, 25, 3.0)
    assert np.abs(got.astype(int) - sd.astype(int)).max() <= 1
    # step by step: the runtime's latents follow diffusers' scheduler within fp32 rounding
    ours = []
    pipe.denoise(np.repeat(pipe.project(ident[None]), 2, 0), lat, pipe.schedule("dpmpp2m", 25), 3.0,
                 trajectory=ours)
    for k, (a, b) in enumerate(zip(ours, traj)):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4, f"step {k}"


@pytest.mark.parametrize("scheduler,steps,guidance", [("ddim", 7, 1.0), ("euler", 4, 2.0), ("dpmpp2m", 1, 3.0)])
def test_other_samplers_and_no_cfg_match_reference(pipe, ref, scheduler, steps, guidance):
    ident = random_identity(3)
    opts = GenerationOptions(steps=steps, guidance=guidance, scheduler=scheduler, seed=5, batch_size=1)
    got = pipe.generate(ident, 1, opts).images
    want = ref(ident[None], _latents(pipe, 5, 1, scheduler, steps), steps=steps, guidance=guidance,
               scheduler=scheduler)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_same_seed_same_images_whatever_the_batch(pipe):
    ident = random_identity(1)
    a = pipe.generate(ident, 3, GenerationOptions(steps=3, seed=4, batch_size=3)).images
    b = pipe.generate(ident, 3, GenerationOptions(steps=3, seed=4, batch_size=1)).images
    c = pipe.generate(ident, 1, GenerationOptions(steps=3, seed=5, batch_size=1)).images
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a[0].astype(int) - c[0].astype(int)).mean() > 5      # another seed, another image
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 5      # images of a run differ


def test_lcm_consumes_its_per_step_noise(pipe):
    sched = pipe.schedule("lcm", 2)
    assert sched.uses_noise
    x, noise = image_noise(0, 0, sched)
    assert noise.shape == (2, 4, 64, 64)
    res = pipe.generate(random_identity(0), 1, GenerationOptions(steps=2, guidance=1.0, scheduler="lcm"))
    assert res.images.shape == (1, 512, 512, 3)


def test_params_never_carry_the_embedding(pipe):
    res = pipe.generate(random_identity(0), 1, GenerationOptions(steps=1))
    p = res.params[0]
    assert {"seed", "steps", "guidance", "scheduler", "index", "engines", "backend"} <= set(p)
    assert all(not isinstance(v, (list, np.ndarray)) for v in p.values())


@pytest.mark.parametrize("emb,msg", [
    (np.zeros((2, 512), np.float32), "shape"),
    (np.zeros(128, np.float32), "shape"),
    (np.full(512, np.nan, np.float32), "NaN"),
    (np.zeros(512, np.float32), "zeros"),
    (np.ones(512, np.int64), "dtype"),
])
def test_bad_embeddings(emb, msg):
    with pytest.raises(InvalidInputError, match=msg):
        normalize_identity(emb)


@pytest.mark.parametrize("opts", [GenerationOptions(steps=0), GenerationOptions(scheduler="plms"),
                                  GenerationOptions(guidance=float("nan")), GenerationOptions(batch_size=0)])
def test_bad_options(pipe, opts):
    with pytest.raises(InvalidInputError):
        pipe.generate(random_identity(0), 1, opts)


def test_zero_images_is_an_error(pipe):
    with pytest.raises(InvalidInputError, match="-n"):
        pipe.generate(random_identity(0), 0)


def test_io_binding_loop_equals_the_plain_loop(pipe, tiny_engines):
    """The device-resident loop used with CUDA (run here on the CPU provider) gives the same latents."""
    from arc2face_rt.backends.ort_loop import OrtStepSession

    sched = pipe.schedule("dpmpp2m", 3)
    x = np.stack([image_noise(2, i, sched)[0] for i in range(2)])
    cond = np.repeat(pipe.project(random_identity(2)[None]), 2, axis=0)
    want = pipe.denoise(cond, x, sched, 3.0)
    got = OrtStepSession(tiny_engines / "step_cfg.onnx", device="cpu").denoise_loop(x, cond, sched.table(), 3.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    lcm = pipe.schedule("lcm", 2)
    noise = np.stack([image_noise(2, 0, lcm)[1]], axis=1)
    got = OrtStepSession(tiny_engines / "step.onnx", device="cpu").denoise_loop(x[:1], cond[:1], lcm.table(), None,
                                                                                 noise)
    np.testing.assert_allclose(got, pipe.denoise(cond[:1], x[:1], lcm, 1.0, noise), rtol=1e-5, atol=1e-5)


def test_non_finite_latents_are_an_error_not_black_images(pipe, monkeypatch):
    """Weights that overflow (an fp16 export of a strong LoRA, say) make NaN latents, which the decoder
    turns into black images: the pipeline says so instead."""
    from arc2face_rt.errors import MissingWeightsError

    monkeypatch.setattr(pipe, "denoise", lambda cond, x, *a, **k: np.full_like(x, np.nan))
    with pytest.raises(MissingWeightsError, match="NaN/inf latents"):
        pipe.generate(np.ones(512, np.float32), 1, GenerationOptions(steps=1))
