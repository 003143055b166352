"""ControlNet pose: export of the control step graphs, preprocessing and parity with diffusers'
StableDiffusionControlNetPipeline, `generate --control-image`, and its errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arc2face_rt import manifest as mf
from arc2face_rt.control import Control, load_control_image, preprocess_control
from arc2face_rt.images import read_params
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, image_noise, random_identity
from arc2face_rt.specs import CONTROL_STAGES, STAGES
from arc2face_ref.pipeline import diffusers_scheduler
from arc2face_ref.projector import Arc2FaceProjector, unconditional_embedding

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pose_yaw30.png"
CONTROL_EXPORT = ("projector", "step_cfg_control", "vae_decoder")   # step_control: exported by a slow test


@pytest.fixture(scope="module")
def control_model_dir(tmp_path_factory):
    from arc2face_ref.random_ckpt import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("cn") / "tiny", size="tiny", seed=0, face_models=False,
                                   controlnet=True)


@pytest.fixture(scope="module")
def control_models(control_model_dir):
    from arc2face_ref.loading import load_models

    return load_models(control_model_dir)


@pytest.fixture(scope="module")
def control_engines(control_model_dir, tmp_path_factory):
    from arc2face_export.onnx_export import export_all

    out = tmp_path_factory.mktemp("cn-engines") / "fp32"
    export_all(control_model_dir, out, stages=CONTROL_EXPORT)
    return out


@pytest.fixture(scope="module")
def poses(tmp_path_factory):
    """The shipped example at 512 and resized to 300 (diffusers resizes it back), and a mirrored one."""
    d = tmp_path_factory.mktemp("poses")
    im = Image.open(EXAMPLE).convert("RGB")
    im.save(d / "pose512.png")
    im.resize((300, 300), Image.BILINEAR).save(d / "pose300.png")
    im.transpose(Image.FLIP_LEFT_RIGHT).save(d / "mirror.png")
    return d


def test_control_graphs_match_their_specs_and_validate(control_engines):
    import onnx

    m = mf.load_manifest(control_engines)
    assert set(m["stages"]) == set(CONTROL_EXPORT)
    for name in ("step_cfg_control",):
        spec = CONTROL_STAGES[name]
        g = onnx.load(str(control_engines / spec.onnx_file), load_external_data=False).graph
        assert [i.name for i in g.input] == [t.name for t in spec.inputs]
        assert spec.input("control").shape == ("B", 3, 512, 512)
        assert m["stages"][name]["validation"]["value"] <= spec.tolerance["fp32"]


def test_preprocessing_is_diffusers_own(poses):
    """Our numpy/PIL preprocessing equals diffusers' control image processor bit for bit (resize with
    Lanczos, RGB, [0, 1], NCHW) on the image as diffusers.utils.load_image reads it."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    for name in ("pose300.png", "pose512.png"):
        want = proc.preprocess(load_image(str(poses / name)), height=512, width=512).numpy()[0]
        got = load_control_image(poses / name)
        assert got.dtype == np.float32 and got.shape == (3, 512, 512)
        np.testing.assert_array_equal(got, want)


def _diffusers_controlnet(models, ids, latents, image_path, steps, guidance, scale):
    """Oracle: diffusers' StableDiffusionControlNetPipeline (not guess mode) with the same embeddings, at
    512x512 (without height/width it would generate at the control image's own size)."""
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.utils import load_image

    sd = StableDiffusionControlNetPipeline(
        vae=models.vae, text_encoder=models.encoder, tokenizer=None, unet=models.unet, controlnet=models.controlnet,
        scheduler=diffusers_scheduler("dpmpp2m", models.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = Arc2FaceProjector(models.encoder)(torch.from_numpy(ids))
        uncond = unconditional_embedding(models.encoder)[None].expand_as(cond)
        out = sd(prompt_embeds=cond, negative_prompt_embeds=uncond, image=load_image(str(image_path)),
                 height=512, width=512, latents=torch.from_numpy(latents), num_inference_steps=steps,
                 guidance_scale=guidance,
                 controlnet_conditioning_scale=scale, output_type="np").images
    return np.round(out * 255).astype(np.uint8)


def _check_against_diffusers(engines, models, poses, guidance, scale, steps):
    ident = random_identity(9)
    opts = GenerationOptions(steps=steps, guidance=guidance, seed=4, batch_size=1)
    with Arc2FacePipeline(engines, backend="ort", device="cpu") as pipe:
        got = pipe.generate(ident, 1, opts, control=Control.from_files([poses / "pose300.png"], scale)).images
        sched = pipe.schedule("dpmpp2m", steps)
    lat = image_noise(4, 0, sched)[0][None]
    want = _diffusers_controlnet(models, ident[None], lat, poses / "pose300.png", steps, guidance, scale)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_control_generation_matches_diffusers(control_engines, control_models, poses):
    """CFG (the ControlNet on [uncond; cond]), scale 0.7, a 300x300 image resized as diffusers does."""
    _check_against_diffusers(control_engines, control_models, poses, 3.0, 0.7, steps=2)


@pytest.mark.slow
def test_control_generation_without_cfg_matches_diffusers(control_model_dir, control_models, poses, tmp_path):
    from arc2face_export.onnx_export import export_all

    engines = tmp_path / "no-cfg"
    export_all(control_model_dir, engines, stages=("projector", "step_control", "vae_decoder"))
    _check_against_diffusers(engines, control_models, poses, 1.0, 1.0, steps=3)


def test_control_changes_images_and_scale_zero_is_the_base_model(control_engines, tiny_engines, poses):
    """The checkpoint's UNet is the tiny fixture's (same seed): at scale 0 the ControlNet adds nothing."""
    ident, opts = random_identity(2), GenerationOptions(steps=1, seed=1, batch_size=1)
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as base:
        plain = base.generate(ident, 1, opts).images.astype(int)
    with Arc2FacePipeline(control_engines, backend="ort", device="cpu") as pipe:
        zero = pipe.generate(ident, 1, opts, control=Control.from_files([poses / "pose512.png"], 0.0)).images
        posed = pipe.generate(ident, 1, opts, control=Control.from_files([poses / "pose512.png"])).images
        mirrored = pipe.generate(ident, 1, opts, control=Control.from_files([poses / "mirror.png"])).images
        assert pipe.has_control
    assert np.abs(zero - plain).max() <= 1
    assert np.abs(posed - plain).mean() > 1 and np.abs(posed.astype(int) - mirrored).mean() > 1


@pytest.mark.slow
def test_one_control_image_per_image(control_engines, poses):
    ident, opts = random_identity(5), GenerationOptions(steps=2, seed=2, batch_size=2)
    two = Control.from_files([poses / "pose512.png", poses / "mirror.png"], count=2)
    with Arc2FacePipeline(control_engines, backend="ort", device="cpu") as pipe:
        both = pipe.generate(ident, 2, opts, control=two)
        a = pipe.generate(ident, 2, opts, control=Control.from_files([poses / "pose512.png"])).images
        b = pipe.generate(ident, 2, opts, control=Control.from_files([poses / "mirror.png"])).images
    assert np.abs(both.images[0].astype(int) - a[0]).max() <= 1
    assert np.abs(both.images[1].astype(int) - b[1]).max() <= 1
    assert both.params[0]["control"] != both.params[1]["control"] and both.params[0]["control_scale"] == 1.0


@pytest.mark.slow
def test_io_binding_loop_with_control_equals_the_plain_loop(control_engines, poses):
    from arc2face_rt.backends.ort_loop import OrtStepSession

    with Arc2FacePipeline(control_engines, backend="ort", device="cpu") as pipe:
        sched = pipe.schedule("dpmpp2m", 2)
        x = np.stack([image_noise(3, i, sched)[0] for i in range(2)])
        cond = np.repeat(pipe.project(random_identity(3)[None]), 2, axis=0)
        ctrl = Control.from_files([poses / "pose512.png"]).batch([0, 1])
        want = pipe.denoise(cond, x, sched, 3.0, control=ctrl, control_scale=0.5)
    sess = OrtStepSession(control_engines / "step_cfg_control.onnx", device="cpu")
    got = sess.denoise_loop(x, cond, sched.table(), 3.0, control=ctrl, control_scale=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_generate_cli_with_control_records_it(control_engines, poses, tmp_path):
    from arc2face_rt.cli import main

    out = tmp_path / "out"
    assert main(["generate", "--engines", str(control_engines), "--random-id", "-n", "1", "--steps", "1",
                 "--control-image", str(poses / "pose300.png"), "--control-scale", "0.5", "--out", str(out)]) == 0
    p = read_params(next(out.glob("*.png")))
    assert p["control_scale"] == 0.5 and len(p["control"]) == 16


@pytest.mark.parametrize("case,words", [
    ("non-square", "is not square"),
    ("greyscale", "is greyscale"),
    ("count", "2 files for 3 images"),
    ("no control graphs", "has no ControlNet step graph"),
])
def test_control_cli_errors_are_one_line(control_engines, tiny_engines, poses, tmp_path, capsys, case, words):
    from arc2face_rt.cli import main

    engines, images, n = control_engines, [poses / "pose512.png"], "1"
    if case == "non-square":
        Image.open(poses / "pose512.png").crop((0, 0, 512, 400)).save(tmp_path / "c.png")
        images = [tmp_path / "c.png"]
    elif case == "greyscale":
        Image.open(poses / "pose512.png").convert("L").save(tmp_path / "c.png")
        images = [tmp_path / "c.png"]
    elif case == "count":
        images, n = [poses / "pose512.png", poses / "mirror.png"], "3"
    else:
        engines = tiny_engines
    out = tmp_path / "out"
    rc = main(["generate", "--engines", str(engines), "--random-id", "-n", n, "--steps", "1",
               "--control-image", *map(str, images), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and words in err[-1] and err[-1].startswith("arc2face-rt: error:")
    assert not out.exists()


def test_control_stages_need_a_controlnet_folder(tiny_model_dir, tmp_path):
    from arc2face_export.onnx_export import export_all
    from arc2face_rt.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="no controlnet/"):
        export_all(tiny_model_dir, tmp_path / "e", stages=("step_cfg_control",))
    assert not (tmp_path / "e").exists()


def test_control_array_checks():
    with pytest.raises(Exception, match="float32"):
        Control(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(Exception, match="--control-scale"):
        Control(np.zeros((1, 3, 512, 512), np.float32), scale=float("nan"))
    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[..., 0] = 9
    assert preprocess_control(rgb)[0].max() == np.float32(9 / 255)          # RGB order kept, [0, 1]
    assert preprocess_control(rgb)[1].max() == 0
    assert set(STAGES).isdisjoint(CONTROL_STAGES)


# ---- TensorRT: the control plans' loop on the simulated GPU (tests/sim_*.py), and real plans built on the CPU

def test_trt_loop_takes_the_control_image_as_a_fixed_device_buffer(monkeypatch, tmp_path):
    """The whole loop of a control plan captured as one CUDA graph; control/control_scale live in the
    loop's buffers (uploaded once per loop, like cond) and every step reads them."""
    from arc2face_rt.backends.trt import TrtStepSession
    from sim_trt import loop_reference
    from test_trt_sim import _inputs, make_world

    sim = make_world(monkeypatch, tmp_path / "engines",
                     stages=("projector", "step_cfg_control", "step_control", "vae_decoder"))
    rng = np.random.default_rng(3)
    for stage, guidance in (("step_cfg_control", 3.0), ("step_control", None)):
        x, cond, table, _ = _inputs(rng, 2, 4, False)
        ctrl = rng.uniform(0, 1, (2, 3, 512, 512)).astype(np.float32)
        with TrtStepSession(sim.engines / f"{stage}.plan", mode="graph") as sess:
            for scale in (0.5, 1.5):                   # replayed graph, new buffer contents
                got = sess.denoise_loop(x, cond, table, guidance, control=ctrl, control_scale=scale)
                np.testing.assert_array_equal(got, loop_reference(x, cond, table, guidance, None, ctrl, scale))
            with pytest.raises(Exception, match="control image must be given"):
                sess.denoise_loop(x, cond, table, guidance)
    assert sim.rt.captures == 2


def test_trt_pipeline_with_control_one_sync_per_batch(monkeypatch, tmp_path):
    from sim_trt import loop_reference, projector_reference, vae_reference
    from arc2face_rt.schedulers import make_schedule
    from test_trt_sim import make_world

    sim = make_world(monkeypatch, tmp_path / "engines",
                     stages=("projector", "step_cfg", "step_cfg_control", "vae_decoder"))
    rng = np.random.default_rng(4)
    control = Control(rng.uniform(0, 1, (3, 3, 512, 512)).astype(np.float32), 0.8)
    ident, opts = random_identity(1), GenerationOptions(steps=3, seed=2, batch_size=2)
    with Arc2FacePipeline(sim.engines, backend="trt") as pipe:
        syncs = sim.rt.syncs
        got = pipe.generate(ident, 3, opts, control=control).images
        assert sim.rt.syncs - syncs <= 2 + 2               # two batches; a first capture waits once more each
    sched = make_schedule("dpmpp2m", 3)
    cond1 = projector_reference(ident[None])
    want = []
    for idx in ([0, 1], [2]):
        x = np.stack([image_noise(2, i, sched)[0] for i in idx])
        want.append(vae_reference(loop_reference(x, np.repeat(cond1, len(idx), 0), sched.table(np.float32), 3.0,
                                                 None, control.batch(idx), 0.8)))
    np.testing.assert_array_equal(got, np.concatenate(want))


@pytest.mark.slow
def test_build_engines_makes_plans_for_the_control_graphs(control_engines, tmp_path):
    """TensorRT(-RTX) parses the exported control graphs and builds their plans (on the CPU with
    tensorrt-rtx), recorded with the spec's I/O."""
    import shutil

    from trt_needed import tensorrt

    trt_build, trt = tensorrt()
    trt_network = pytest.importorskip("arc2face_export.trt_network")
    from arc2face_rt.backends import cuda
    if cuda.device_count() == 0 and not trt_build.is_rtx(trt):
        pytest.skip("full TensorRT needs the target GPU")
    d = tmp_path / "e"
    shutil.copytree(control_engines, d)
    m = trt_build.build_engines(d, stages=["step_cfg_control"])
    for name, spec in [("step_cfg_control", CONTROL_STAGES["step_cfg_control"])]:
        assert m["plans"][name]["io"] == trt_network.spec_io(spec)
        assert (d / spec.plan_file).stat().st_size == m["plans"][name]["bytes"]


def test_openvino_runs_the_control_step_at_the_runs_precision(control_engines, poses, tmp_path):
    """bf16 ran the ControlNet step graph in f32 while every PNG recorded bf16; int8, which has no int8
    ControlNet graph, is refused instead of recording int8 for an f32 step."""
    ovb = pytest.importorskip("arc2face_rt.backends.openvino")
    pytest.importorskip("openvino")
    from arc2face_rt.errors import InvalidInputError

    manifest = mf.load_manifest(control_engines)
    int8 = ovb.OpenVinoStages(control_engines, {**manifest, "openvino_int8": {"step_cfg": {}}}, "int8")
    with pytest.raises(InvalidInputError, match="no int8 ControlNet step graph.*--cpu-precision bf16, fp32 or auto"):
        int8.record("step_cfg_control")
    if not ovb.cpu_isa().bf16:
        pytest.skip("this CPU has no AMX-BF16/AVX512-BF16")
    engines = tmp_path / "e"                       # a private copy: OpenVINO's cache goes beside it
    import shutil
    shutil.copytree(control_engines, engines)
    with Arc2FacePipeline(engines, backend="openvino", cpu_precision="bf16") as pipe:
        res = pipe.generate(random_identity(2), 1, GenerationOptions(steps=1, seed=1, batch_size=1),
                            control=Control.from_files([poses / "pose512.png"]))
        prec = pipe.session("step_cfg_control").runtime_precisions()
    assert res.params[0]["precision"] == "bf16"
    assert any(p == "bf16" for n, p in prec.items() if "/controlnet/" in n)
    assert any(p == "bf16" for n, p in prec.items() if "/unet/down_blocks" in n)
