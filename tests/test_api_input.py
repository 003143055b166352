"""Bad arguments to the Python API (not the CLIs): each is refused with an arc2face_rt.errors
exception naming the argument, never a numpy/Pillow/pathlib exception, a silent coercion, or a
black image. Cheap: most cases need no engines; the rest reuse the session's tiny fp32 export."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

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
