"""Bad arguments to the Python API (not the CLIs): each is refused with an arc2face_rt.errors
exception naming the argument, never a numpy/Pillow/pathlib exception, a silent coercion, or a
black image. Cheap: most cases need no engines; the rest reuse the session's tiny fp32 export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from arc2face_rt.control import Control, load_control_image, preprocess_control
from arc2face_rt.errors import Arc2FaceError, ImageDecodeError, InvalidInputError
from arc2face_rt.images import PARAMS_KEY, png_bytes, read_params
from arc2face_rt.outputs import read_image_params


# ---- read_params ------------------------------------------------------------------------------
def _png_with_chunk(path, text, size=(8, 8)):
    info = PngInfo()
    info.add_text(PARAMS_KEY, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def test_read_params_reads_what_png_bytes_wrote(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8), {"seed": 3, "index": 1}))
    assert read_params(tmp_path / "ok.png") == {"seed": 3, "index": 1}


@pytest.mark.parametrize("case, error, words", [
    ("missing", InvalidInputError, "no such file"),
    ("folder", InvalidInputError, "is a folder"),
    ("empty", InvalidInputError, "empty"),
    ("text", ImageDecodeError, "not an image"),
    ("jpeg", InvalidInputError, "JPEG image, not a PNG"),
    ("no chunk", InvalidInputError, "no arc2face-rt parameters"),
    ("truncated", ImageDecodeError, "truncated or corrupt"),
    ("flipped byte", ImageDecodeError, "truncated or corrupt"),
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
    elif case == "no chunk":
        Image.new("RGB", (8, 8)).save(p)
    elif case == "truncated":
        p.write_bytes(good[:-20])
    elif case == "flipped byte":
        i = good.index(b'{"seed"') + 3
        p.write_bytes(good[:i] + bytes([good[i] ^ 1]) + good[i + 1:])      # the chunk's CRC no longer matches
    elif case == "not json":
        _png_with_chunk(p, "{bad")
    elif case == "list":
        _png_with_chunk(p, "[1, 2]")
    elif case == "number":
        _png_with_chunk(p, "42")
    with pytest.raises(error, match=words) as e:
        read_params(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


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


def test_control_from_files_arguments(tmp_path):
    with pytest.raises(InvalidInputError, match="no files given"):
        Control.from_files([])
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
