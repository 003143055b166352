"""Bad arguments to the Python API (not the CLIs): each is refused with an arc2face_rt.errors
exception naming the argument, never a numpy/Pillow/pathlib exception, a silent coercion, or a
black image. Cheap: most cases need no engines; the rest reuse the session's tiny fp32 export."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from arc2face_rt.control import Control, load_control_image, preprocess_control
from arc2face_rt.errors import ImageDecodeError, InvalidInputError
from arc2face_rt.images import PARAMS_KEY, image_bytes, png_bytes, read_params
from arc2face_rt.outputs import read_image_params
from arc2face_rt.pipeline import GenerationOptions as G


# ---- read_params ------------------------------------------------------------------------------
def _png_with_chunk(path, text, size=(8, 8)):
    info = PngInfo()
    info.add_text(PARAMS_KEY, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def test_read_params_reads_what_png_bytes_wrote(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8), {"seed": 3, "index": 1}))
    assert read_params(tmp_path / "ok.png") == {"seed": 3, "index": 1}


def test_read_params_reads_a_dataset_jpeg(tmp_path):
    """`dataset --image-format jpg` records the parameters in the JPEG comment; read_params said such a
    file records none."""
    (tmp_path / "ok.jpg").write_bytes(image_bytes(np.zeros((8, 8, 3), np.uint8), {"seed": 3}, "jpg"))
    assert read_params(tmp_path / "ok.jpg") == {"seed": 3}


@pytest.mark.parametrize("case, error, words", [
    ("missing", InvalidInputError, "no such file"),
    ("folder", InvalidInputError, "is a folder"),
    ("empty", InvalidInputError, "empty"),
    ("text", ImageDecodeError, "not an image"),
    ("jpeg", InvalidInputError, "no arc2face-rt parameters \\(no JPEG comment\\)"),
    ("webp", InvalidInputError, "WEBP image, not a PNG"),
    ("jpeg not json", InvalidInputError, "its JPEG comment is not valid JSON"),
    ("jpeg truncated", ImageDecodeError, "truncated or corrupt JPEG"),
    ("no chunk", InvalidInputError, "no arc2face-rt parameters"),
    ("truncated", ImageDecodeError, "truncated or corrupt"),
    ("flipped byte", ImageDecodeError, "truncated or corrupt"),
    ("idat chunk removed", ImageDecodeError, "truncated or corrupt"),
    ("pixels damaged under a right crc", ImageDecodeError, "truncated or corrupt"),
    ("not json", InvalidInputError, "not valid JSON"),
    ("list", InvalidInputError, "not a JSON object"),
    ("number", InvalidInputError, "not a JSON object"),
])
def test_read_params_refuses_bad_files(tmp_path, case, error, words):
    p = tmp_path / "x.png"
    good = png_bytes(np.zeros((8, 8, 3), np.uint8), {"seed": 3})
    if case == "folder":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("hi")
    elif case == "jpeg":
        Image.new("RGB", (8, 8)).save(p, format="JPEG")
    elif case == "webp":
        Image.new("RGB", (8, 8)).save(p, format="WEBP")
    elif case == "jpeg not json":
        Image.new("RGB", (8, 8)).save(p, format="JPEG", comment=b"made by a camera")
    elif case == "jpeg truncated":
        p.write_bytes(image_bytes(np.full((64, 64, 3), 7, np.uint8), {"seed": 3}, "jpg")[:-200])
    elif case == "no chunk":
        Image.new("RGB", (8, 8)).save(p)
    elif case == "truncated":
        p.write_bytes(good[:-20])
    elif case == "flipped byte":
        i = good.index(b'{"seed"') + 3
        p.write_bytes(good[:i] + bytes([good[i] ^ 1]) + good[i + 1:])      # the chunk's CRC no longer matches
    elif case in ("idat chunk removed", "pixels damaged under a right crc"):
        # every chunk intact and its CRC right, the pixels not all there: only decoding them tells
        noisy = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
        p.write_bytes(_png_pixels_damaged(png_bytes(noisy, {"seed": 3}), case == "idat chunk removed"))
    elif case == "not json":
        _png_with_chunk(p, "{bad")
    elif case == "list":
        _png_with_chunk(p, "[1, 2]")
    elif case == "number":
        _png_with_chunk(p, "42")
    with pytest.raises(error, match=words) as e:
        read_params(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _png_pixels_damaged(png: bytes, drop_last_idat: bool) -> bytes:
    """`png` without its last IDAT chunk, or with bytes of its first IDAT's zlib stream changed and the
    chunk's CRC recomputed: a file whose chunks all verify."""
    import struct
    import zlib

    chunks, pos = [], 8
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunks.append((kind, png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    idats = [i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT"]
    assert len(idats) > 1
    if drop_last_idat:
        del chunks[idats[-1]]
    else:
        data = bytearray(chunks[idats[0]][1])
        data[100:400] = bytes(300)
        chunks[idats[0]] = (b"IDAT", bytes(data))
    return png[:8] + b"".join(struct.pack(">I4s", len(d), k) + d + struct.pack(">I", zlib.crc32(k + d))
                              for k, d in chunks)


def test_resume_reader_still_returns_none_for_foreign_files(tmp_path):
    """--resume's reader (outputs.read_image_params) shares read_params' parsing but keeps answering
    None for anything that is not a finished 512x512 arc2face-rt PNG (plan_resume refuses those)."""
    good = png_bytes(np.zeros((512, 512, 3), np.uint8), {"seed": 3})
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "trunc.png").write_bytes(good[:-20])
    (tmp_path / "list.png").write_bytes(b"")
    _png_with_chunk(tmp_path / "list.png", "[1, 2]", (512, 512))
    _png_with_chunk(tmp_path / "small.png", '{"seed": 3}')
    (tmp_path / "dir.png").mkdir()
    assert read_image_params(tmp_path / "good.png") == {"seed": 3}
    for name in ("trunc.png", "list.png", "small.png", "dir.png", "missing.png"):
        assert read_image_params(tmp_path / name) is None, name


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


def test_decode_image_refuses_a_str():
    from arc2face_rt.face import decode_image

    with pytest.raises(InvalidInputError, match="bytes, not str"):
        decode_image("abc")


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


@pytest.mark.parametrize("emb, error, words", [
    (np.full((2, 512), np.nan), InvalidInputError, "NaN or infinity"),
    (np.zeros((2, 512)), InvalidInputError, "embedding 0 .* all zeros"),
    ("CANCEL", InvalidInputError, "cancel out"),
    ([], Exception, "no embeddings to combine"),
    (np.zeros((0, 512)), Exception, "no embeddings to combine"),
    (np.ones((2, 511)), InvalidInputError, r"expected float \[N, 512\]"),
    (np.float32(1), InvalidInputError, r"expected float \[N, 512\]"),
    (np.array(["a"] * 512), InvalidInputError, "expected float"),
])
def test_combine_embeddings_refuses_what_is_no_identity(emb, error, words):
    from arc2face_rt.errors import NoFaceError
    from arc2face_rt.face import combine_embeddings

    if isinstance(emb, str) and emb == "CANCEL":                 # [v, -v]: mean zero
        emb = np.stack([ID, -ID])
    with pytest.raises(error, match=words) as e:
        combine_embeddings(emb)
    assert isinstance(e.value, (InvalidInputError, NoFaceError))
    big = np.stack([ID * 1e30, ID * 1e-30])                     # any norm: each photo's direction counts
    np.testing.assert_allclose(combine_embeddings(big).embedding, ID / np.linalg.norm(ID), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, words", [
    (dict(method="bogus"), r"method \(--combine\)"),
    (dict(face="biggest"), r"face \(--face\) must be 'largest' or a face index"),
    (dict(face=-1), r"face \(--face\) must be 'largest' or a face index >= 0, got -1"),
    (dict(face=1.0), r"face \(--face\) must be a whole number"),
    (dict(min_size=-5), r"min_size \(--min-size\)"),
    (dict(min_size=float("nan")), r"min_size \(--min-size\)"),
    (dict(min_score=float("nan")), r"min_score \(--min-score\) must be a detection score in 0\.\.1"),
    (dict(min_score=2), r"min_score \(--min-score\) must be a detection score"),
    (dict(min_score="0.5"), r"min_score \(--min-score\) must be a number"),
    (dict(backend="xx"), r"backend \(--backend\)"),
    (dict(device="gpu"), r"device \(--device\)"),
])
def test_identity_from_images_checks_options_before_loading_anything(monkeypatch, tmp_path, kw, words):
    import arc2face_rt.face.models as fm

    def no_models(*a, **k):
        raise AssertionError("face models loaded before the options were checked")
    monkeypatch.setattr(fm, "load_face_models", no_models)
    monkeypatch.setattr(fm, "expand_paths", no_models)
    with pytest.raises(InvalidInputError, match=words):
        fm.identity_from_images([EXAMPLE], tmp_path, **kw)


# ---- from the review of the checks above -----------------------------------------------------------
def test_read_params_finds_a_chunk_after_the_pixels(tmp_path):
    """A tool that re-saves a PNG may move its text chunk after IDAT: still our parameters."""
    import struct
    import zlib

    data = png_bytes(np.zeros((8, 8, 3), np.uint8), {"seed": 1})
    chunks, pos = [], 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos:pos + 12 + n]))
        pos += 12 + n
    text = [c for k, c in chunks if k == b"tEXt"]
    rest = [c for k, c in chunks if k not in (b"tEXt", b"IEND")]
    iend = [c for k, c in chunks if k == b"IEND"]
    assert text and zlib.crc32(text[0][4:-4]) == struct.unpack(">I", text[0][-4:])[0]
    p = tmp_path / "moved.png"
    p.write_bytes(data[:8] + b"".join(rest + text + iend))
    assert read_params(p) == {"seed": 1}


def test_combine_takes_stacked_single_embeddings():
    from arc2face_rt.face.identity import combine_embeddings

    v = np.random.default_rng(1).standard_normal((3, 1, 512)).astype(np.float32)      # np.stack of [1, 512]s
    np.testing.assert_allclose(combine_embeddings(v).embedding, combine_embeddings(v[:, 0]).embedding)


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


@pytest.mark.parametrize("face,min_size", [(-1, 0.0), ("smallest", 0.0), (1.5, 0.0), (True, 0.0),
                                           (0, float("nan")), (0, -3.0)])
def test_face_analyzer_refuses_a_bad_face_choice_when_made(face, min_size):
    """FaceAnalyzer checks its policy as `embed --face/--min-size` do; it used to take it, then skip
    every photo with the same error (or pick the last face for -1, an index the CLI refuses)."""
    from arc2face_rt.face import FaceAnalyzer

    with pytest.raises(InvalidInputError, match="face \\(--face\\)|min_size \\(--min-size\\)"):
        FaceAnalyzer(None, None, face=face, min_size=min_size)


def _face_models():
    from face_fixtures import tiny_models_dir

    from arc2face_rt.face.models import load_face_models

    return tiny_models_dir(), load_face_models(tiny_models_dir(), device="cpu")


def test_face_api_refuses_arguments_of_the_wrong_kind(tmp_path):
    """Each used to be accepted and fail later in an AttributeError or TypeError of Python's (limits=None
    after both models had loaded), or be taken silently (aligned="no" meant True)."""
    from arc2face_rt.face import FaceAnalyzer, ImageLimits, expand_paths, load_image
    from arc2face_rt.face.models import identity_from_images

    models, (det, rec) = _face_models()
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(photo)
    cases = [
        (lambda: FaceAnalyzer(det, rec, limits=None), "limits must be an ImageLimits"),
        (lambda: FaceAnalyzer("x", rec), "detector must be a ScrfdDetector"),
        (lambda: FaceAnalyzer(det, None), "recognizer must be an ArcFaceRecognizer"),
        (lambda: FaceAnalyzer(det, rec).embed_image([[1, 2, 3]]), "expected a uint8 \\[H, W, 3\\] RGB numpy array"),
        (lambda: FaceAnalyzer(None, rec).embed_aligned([[1, 2, 3]]), "expected a uint8"),
        (lambda: FaceAnalyzer(det, rec).embed_file(None), "a path must be a str or pathlib.Path, not NoneType"),
        (lambda: FaceAnalyzer(det, rec).embed_file(photo, aligned="no"), "aligned must be True or False"),
        (lambda: FaceAnalyzer(det, rec).embed_files(None), "paths must be a list of image files"),
        (lambda: load_image(None), "not NoneType"),
        (lambda: expand_paths(None), "paths must be a path or a list of paths"),
        (lambda: identity_from_images(None, models), "paths must be a path or a list of paths"),
        (lambda: identity_from_images([photo], models, limits=None), "limits must be an ImageLimits"),
        (lambda: ImageLimits(max_bytes="x"), "ImageLimits.max_bytes must be a whole number"),
        (lambda: ImageLimits(max_pixels=0), "ImageLimits.max_pixels must be >= 1"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidInputError, match=words):
            call()


def test_face_model_options_are_checked_when_the_models_are_opened():
    """A min_score of 5 meant no face would ever be found; a device "gpu" or backend "x" was accepted."""
    from arc2face_rt.face import ScrfdDetector
    from arc2face_rt.face.models import load_face_models

    models, _ = _face_models()
    for kw, words in ((dict(min_score=5), r"min_score \(--min-score\) must be a detection score"),
                      (dict(device="gpu"), r"device \(--device\) must be one of"),
                      (dict(backend="x"), r"backend \(--backend\) must be one of")):
        with pytest.raises(InvalidInputError, match=words):
            load_face_models(models, **{"device": "cpu", **kw})
    for kw, words in ((dict(device="gpu"), "device"), (dict(backend="x"), "backend must be one of ort, openvino")):
        with pytest.raises(InvalidInputError, match=words):
            ScrfdDetector.from_file(models / "scrfd_10g_bnkps.onnx", **kw)


@pytest.mark.parametrize("bad, words", [(None, "path must be a path"), (5, "path must be a path"),
                                        (b"/x.png", "path must be a path"), ("", "path must not be empty")])
def test_read_params_refuses_what_is_not_a_path(bad, words):
    with pytest.raises(InvalidInputError, match=words):
        read_params(bad)


def test_save_png_refuses_other_arrays(tmp_path):
    from arc2face_rt.images import save_png

    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8),
                np.zeros((8, 8, 3), np.int64), [[0, 0, 0]]):
        with pytest.raises(InvalidInputError, match="image must be a uint8 \\[H, W, 3\\] RGB array"):
            save_png(tmp_path / "x.png", bad, {})
    assert not list(tmp_path.iterdir())


def test_a_graph_replaced_after_verification_is_refused_when_opened(tiny_engines, tmp_path):
    """An export --force rewriting the folder between verification and the sessions' opening made a run of
    one export's projector and another's step graphs, recorded under the first's engine id."""
    from test_bad_input import engines_copy

    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.pipeline import Arc2FacePipeline

    eng = engines_copy(tiny_engines, tmp_path / "e")
    with Arc2FacePipeline(eng, backend="ort") as p:
        graph = eng / "vae_decoder.onnx"
        data = graph.read_bytes()
        (tmp_path / "new.onnx").write_bytes(data)        # the same bytes as another file: only its identity tells
        os.replace(tmp_path / "new.onnx", graph)
        with pytest.raises(EngineMismatchError, match="vae_decoder.onnx: was replaced or rewritten while this run"):
            p.generate(ID, 1, G(steps=1))
        assert "vae_decoder" not in p._sessions
    with Arc2FacePipeline(eng, backend="ort") as p:    # verified anew: runs
        assert p.generate(ID, 1, G(steps=1)).images.shape == (1, 512, 512, 3)
