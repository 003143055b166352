"""Bad arguments to the Python API (not the CLIs): each is refused with an arc2face_rt.errors
exception naming the argument, never a numpy/Pillow/pathlib exception, a silent coercion, or a
black image. Cheap: most cases need no engines; the rest reuse the session's tiny fp32 export. The
face API, read_params and save_png: test_api_files.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arc2face_rt.control import Control, load_control_image, preprocess_control
from arc2face_rt.errors import InvalidInputError
from arc2face_rt.pipeline import GenerationOptions as G


# ---- ControlNet condition images ----------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pose_yaw30.png"


@pytest.fixture(scope="module")
def alpha_poses(tmp_path_factory):
    """The shipped pose at 128 px with alpha 128 / alpha 0 (a render on a transparent background),
    as LA, and as a palette PNG with a transparent colour."""
    d = tmp_path_factory.mktemp("alpha")
    src = np.asarray(Image.open(EXAMPLE).convert("RGB").resize((128, 128), Image.BILINEAR))
    for name, a in (("rgba_half", 128), ("rgba_clear", 0)):
        Image.fromarray(np.dstack([src, np.full(src.shape[:2], a, np.uint8)]), "RGBA").save(d / f"{name}.png")
    Image.fromarray(np.dstack([src[..., 0], src[..., 1]]), "LA").save(d / "la.png")
    pal = Image.fromarray(src).quantize(64)
    pal.save(d / "palette_clear.png", transparency=int(np.asarray(pal)[64, 64]))
    return d


@pytest.mark.parametrize("name", ["rgba_half", "rgba_clear", "la", "palette_clear"])
def test_control_image_with_alpha_reads_as_diffusers_load_image(alpha_poses, name):
    """Oracle: diffusers.utils.load_image (Pillow's convert("RGB"): alpha dropped, not composited on
    black as the photo loader does), then diffusers' ControlNet image processor."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image as diffusers_load_image

    from arc2face_rt.face.image_io import load_image

    path = alpha_poses / f"{name}.png"
    want = diffusers_load_image(str(path))
    np.testing.assert_array_equal(load_image(path, pillow_rgb=True), np.asarray(want))
    if name == "la":                                    # diffusers sees a grey image: refused as before
        with pytest.raises(InvalidInputError, match="greyscale"):
            load_control_image(path)
        return
    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    np.testing.assert_array_equal(load_control_image(path),
                                  proc.preprocess(want, height=512, width=512).numpy()[0])
    assert load_image(path).tolist() != np.asarray(want).tolist()    # photos keep compositing on black


@pytest.mark.parametrize("value, words", [(np.nan, "NaN or infinity"), (np.inf, "NaN or infinity"),
                                          (200.0, r"values 0\.5\.\.200"), (-0.5, "must be in")])
def test_control_refuses_values_outside_0_1(value, words):
    imgs = np.full((1, 3, 512, 512), 0.5, np.float32)
    imgs[0, 1, 7, 9] = value
    with pytest.raises(InvalidInputError, match=words):
        Control(imgs)
    Control(np.clip(np.nan_to_num(imgs, posinf=1), 0, 1))     # the same array in range is accepted


@pytest.mark.parametrize("images, scale, words", [
    ([[1.0]], 1.0, "numpy float32 array"),
    (np.zeros((1, 3, 512, 512), np.float32).tolist(), 1.0, "numpy float32 array"),
    (None, 1.0, "numpy float32 array"),
    (np.zeros((1, 3, 512, 512), np.float32), "1", "--control-scale"),
    (np.zeros((1, 3, 512, 512), np.float32), None, "--control-scale"),
    (np.zeros((1, 3, 512, 512), np.float32), True, "--control-scale"),
])
def test_control_refuses_wrong_types(images, scale, words):
    with pytest.raises(InvalidInputError, match=words):
        Control(images, scale)


def test_control_keeps_its_own_read_only_copy():
    """The fingerprint a PNG records describes the pixels every run uses: a caller changing its array after
    making the Control changed the images (and skipped the [0, 1] check) under the same parameters."""
    buf = np.full((1, 3, 512, 512), 0.2, np.float32)
    c = Control(buf)
    buf[:] = np.nan
    assert float(c.images.max()) == pytest.approx(0.2) and not c.images.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        c.images[:] = 0.9


def test_control_from_files_arguments(tmp_path):
    with pytest.raises(InvalidInputError, match="no files given"):
        Control.from_files([])
    with pytest.raises(InvalidInputError, match="count must be a whole number"):
        Control.from_files([EXAMPLE, EXAMPLE], count=2.0)
    one = Control.from_files(str(EXAMPLE))                     # one path (str or Path) is one file
    assert len(one.images) == 1
    np.testing.assert_array_equal(Control.from_files(EXAMPLE).images, one.images)


def test_preprocess_control_refuses_other_arrays():
    rgba = np.zeros((64, 64, 4), np.uint8)
    for bad, words in ((rgba, r"uint8 \(64, 64, 4\)"), (rgba[..., :3].astype(np.float32), "float32"),
                       (rgba[..., 0], r"\(64, 64\)"), ([[1, 2, 3]], "list")):
        with pytest.raises(InvalidInputError, match=words):
            preprocess_control(bad)


# ---- Arc2FacePipeline: options, counts, indices -------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_engines):
    from arc2face_rt.pipeline import Arc2FacePipeline

    with Arc2FacePipeline(tiny_engines, backend="ort") as p:
        yield p


ID = np.random.default_rng(0).standard_normal(512).astype(np.float32)


@pytest.mark.parametrize("kw, words", [
    (dict(options=G(steps=2, seed=1.5)), r"GenerationOptions\.seed must be a whole number.*1\.5"),
    (dict(options=G(steps=2, seed=2.0)), r"GenerationOptions\.seed must be a whole number.*2\.0"),
    (dict(options=G(steps=2, seed=None)), r"GenerationOptions\.seed must be a whole number"),
    (dict(options=G(steps=2, seed="1")), r"GenerationOptions\.seed must be a whole number"),
    (dict(options=G(steps="2")), r"GenerationOptions\.steps must be a whole number"),
    (dict(options=G(steps=None)), r"GenerationOptions\.steps must be a whole number"),
    (dict(options=G(steps=2.0)), r"GenerationOptions\.steps must be a whole number"),
    (dict(options=G(steps=2, guidance="3")), r"GenerationOptions\.guidance must be a number"),
    (dict(options=G(steps=2, guidance=None)), r"GenerationOptions\.guidance must be a number"),
    (dict(options=G(steps=2, guidance=2**1024)), r"GenerationOptions\.guidance is too large"),
    (dict(options=G(steps=2, batch_size=1.5), num_images=2), r"GenerationOptions\.batch_size must be a whole"),
    (dict(num_images=2.0), "num_images must be a whole number"),
    (dict(num_images="2"), "num_images must be a whole number"),
    (dict(num_images=True), "num_images must be a whole number"),
    (dict(first_index=0.5), "first_index must be a whole number"),
    (dict(options=None), "options must be a GenerationOptions"),
    (dict(indices=[1.5]), r"image index must be a whole number.*1\.5"),
    (dict(indices=[np.float64(1)]), "image index must be a whole number"),
    (dict(num_images=2**63), r"num_images must be in 1\.\.2\*\*63-1"),
])
def test_generate_refuses_wrong_types_naming_the_field(pipe, kw, words):
    with pytest.raises(InvalidInputError, match=words) as e:
        pipe.generate(ID, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call, words", [
    (lambda p: p.generate(ID, indices=5, options=G(steps=1)), r"indices must be a sequence of image indices"),
    (lambda p: p.generate(ID, num_images="x", indices=[0], options=G(steps=1)), "num_images must be a whole"),
    (lambda p: p.generate(ID, first_index="x", indices=[0], options=G(steps=1)), "first_index must be a whole"),
    (lambda p: p.iter_many(ID[None], 1, G(steps=1), indices=[0, 1]), r"one sequence of image indices per identity"),
    (lambda p: p.generate_many(np.stack([ID, ID]), 1, G(steps=1), seeds=5), "seeds must be one seed per identity"),
    (lambda p: p.generate_many(np.stack([ID, ID]), 2.5, G(steps=1), indices=[[0], [0]]), "num_images must be a whole"),
    (lambda p: p.generate_many([ID, ID[:3]], 1, G(steps=1)), r"identities: not an \[M, 512\] array"),
    (lambda p: p.generate(ID, 1, G(steps=1), on_step=5), "on_step must be a function"),
    (lambda p: p.iter_many("junk"), "identities: shape"),       # when called, not at the first next()
    (lambda p: p.prepare(None), "options must be a GenerationOptions"),
    (lambda p: p.schedule(None, 2), r"scheduler \(--scheduler\) must be one of"),
])
def test_api_arguments_of_the_wrong_kind_are_refused_naming_them(pipe, call, words):
    """Each used to end in a TypeError/ValueError/AttributeError of Python's (on_step: after a denoising step),
    or, for a scheduler name of None, in advice to re-export the folder."""
    with pytest.raises(InvalidInputError, match=words):
        call(pipe)


def test_a_control_run_on_a_folder_without_control_graphs_is_refused_before_any_work(tiny_engines):
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    with Arc2FacePipeline(tiny_engines, backend="ort") as p:
        with pytest.raises(EngineMismatchError, match="has no ControlNet step graph"):
            p.iter_many(ID[None], 1, G(steps=1), control=Control(np.full((1, 3, 512, 512), 0.5, np.float32)))
        assert not p._sessions                  # the projector used to run first


@pytest.mark.parametrize("kw, words", [
    (dict(verify=None), "verify must be True or False"), (dict(verify=0), "verify must be True or False"),
    (dict(cpu_precision="xx"), r"cpu_precision \(--cpu-precision\) must be one of auto, fp32"),
])
def test_pipeline_flags_are_checked_before_any_file_is_hashed(tiny_engines, monkeypatch, kw, words):
    """verify=None turned the sha256 check off (a damaged file was accepted); a bad cpu_precision was named
    only after every file was hashed, as one OpenVINO would take."""
    import arc2face_rt.pipeline as pl

    monkeypatch.setattr(pl, "verify_records", lambda *a, **k: pytest.fail("hashed before the check"))
    with pytest.raises(InvalidInputError, match=words):
        pl.Arc2FacePipeline(tiny_engines, backend="ort", **kw)


def test_numpy_integers_are_whole_numbers(pipe):
    a = pipe.generate(ID, np.int64(1), G(steps=1, seed=np.uint32(3), batch_size=np.int8(1)), indices=[np.int64(2)])
    b = pipe.generate(ID, 1, G(steps=1, seed=3), indices=[2])
    np.testing.assert_array_equal(a.images, b.images)
    assert a.params == b.params and type(a.params[0]["seed"]) is int


def test_iter_many_refuses_wrong_types(pipe):
    for kw, words in ((dict(seeds=[1.0]), "seed must be a whole number"), (dict(options=None), "options must be"),
                      (dict(indices=[[0, 2.5]]), "image index must be a whole number"),
                      (dict(control=np.zeros((1, 3, 512, 512), np.float32)), "control must be a Control")):
        with pytest.raises(InvalidInputError, match=words):
            next(pipe.iter_many(ID[None], 1, **kw))


def test_generate_bounds_the_images_it_keeps_in_memory(pipe):
    """10**10 images (7.9 PB) are refused before any work instead of running into a MemoryError;
    iter_many streams the same count (only the first batch is made here)."""
    from arc2face_rt.pipeline import IMAGE_BYTES, max_images_in_memory

    limit = max_images_in_memory()
    assert 1 <= limit * IMAGE_BYTES <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for call in (lambda: pipe.generate(ID, 10**10, G(steps=1)),
                 lambda: pipe.generate(ID, limit + 1, G(steps=1)),
                 lambda: pipe.generate_many(np.stack([ID, -ID]), limit // 2 + 1, G(steps=1))):
        with pytest.raises(InvalidInputError, match=f"half of this machine's memory holds {limit}.*iter_many"):
            call()
    first = next(pipe.iter_many(ID[None], 10**10, G(steps=1, batch_size=2)))
    assert first.images.shape == (2, 512, 512, 3) and [p["index"] for p in first.params] == [0, 1]


def test_identity_helpers_refuse_wrong_types():
    from arc2face_rt.pipeline import load_identity, random_identity

    for bad, words in ((-1, r"in 0\.\.2\*\*63-1 \(got -1\)"), (1.5, "whole number"), (2.0, "whole number"),
                       ("1", "whole number"), (2**63, r"in 0\.\.2\*\*63-1")):
        with pytest.raises(InvalidInputError, match=words):
            random_identity(bad)
    np.testing.assert_array_equal(random_identity(np.int64(4)), random_identity(4))
    for bad, words in ((None, "must be a path"), ("", "must not be empty"), (3, "must be a path")):
        with pytest.raises(InvalidInputError, match=words):
            load_identity(bad)


# ---- the remaining public arguments ----------------------------------------------------------------
@pytest.mark.parametrize("folder, kw, words", [
    (None, {}, "engines folder must be a path"),
    (3, {}, "engines folder must be a path"),
    ("", {}, "engines folder must not be empty"),
    ("TINY", dict(device="gpu"), r"device \(--device\) must be one of auto, cpu, cuda, got 'gpu'"),
    ("TINY", dict(device="CPU"), "device"),
    ("TINY", dict(device=None), "device"),
])
def test_pipeline_refuses_a_bad_folder_or_device(tiny_engines, folder, kw, words):
    from arc2face_rt.pipeline import Arc2FacePipeline

    with pytest.raises(InvalidInputError, match=words):
        Arc2FacePipeline(tiny_engines if folder == "TINY" else folder, backend="ort", **kw)


# ---- from the review of the checks above -----------------------------------------------------------


def test_a_numpy_control_scale_is_recorded_as_a_number():
    import json

    c = Control(np.full((1, 3, 512, 512), 0.5, np.float32), np.float32(0.5))
    assert type(c.scale) is float and json.loads(json.dumps(c.params(0)))["control_scale"] == 0.5


def test_a_range_longer_than_len_takes_is_refused_not_an_overflow(pipe):
    with pytest.raises(InvalidInputError, match="image indices"):
        next(pipe.iter_many(ID[None], indices=[range(0, 2**64)]))
    with pytest.raises(InvalidInputError, match="do not fit in memory"):
        pipe.generate(ID, indices=range(0, 2**63 - 1))


def test_guidance_of_any_real_type_is_checked_as_a_float():
    from fractions import Fraction

    from arc2face_rt.pipeline import checked_options as _checked

    assert _checked(G(guidance=Fraction(3, 2))).guidance == 1.5
    with pytest.raises(InvalidInputError, match="--guidance"):
        _checked(G(guidance=Fraction(1000, 1)))


def test_a_graph_replaced_after_verification_is_refused_when_opened(tiny_engines, tmp_path):
    """An export --force rewriting the folder between verification and the sessions' opening made a run of
    one export's projector and another's step graphs, recorded under the first's engine id. A file whose
    metadata alone changed (a chmod, a hard link to it, a copy of the same bytes renamed over it) is kept."""
    import shutil

    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    eng = tmp_path / "e"
    shutil.copytree(tiny_engines, eng)
    with Arc2FacePipeline(eng, backend="ort") as p:
        graph = eng / "vae_decoder.onnx"
        os.chmod(graph, 0o444)
        os.link(graph, tmp_path / "snapshot.onnx")
        (tmp_path / "same.onnx").write_bytes(graph.read_bytes())
        os.replace(tmp_path / "same.onnx", graph)
        assert p.generate(ID, 1, G(steps=1)).images.shape == (1, 512, 512, 3)
    with Arc2FacePipeline(eng, backend="ort") as p:
        p.session("projector")
        other = bytearray((eng / "step.onnx").read_bytes())
        other[-1] ^= 1                                   # another export's graph, of the same size
        (tmp_path / "other.onnx").write_bytes(bytes(other))
        os.replace(tmp_path / "other.onnx", eng / "step.onnx")
        with pytest.raises(EngineMismatchError, match="step.onnx: was replaced or rewritten while this run"):
            p.generate(ID, 1, G(steps=1, guidance=1.0))
        assert "step" not in p._sessions
