"""Bad arguments to the file and face parts of the Python API: read_params (and --resume's reader),
save_png, the face front end. Each is refused with an arc2face_rt.errors exception naming the argument
or the file, never a Pillow/numpy/pathlib exception or a silent coercion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from arc2face_rt.errors import ImageDecodeError, InvalidInputError
from arc2face_rt.images import PARAMS_KEY, image_bytes, png_bytes, read_params, read_png_params
from arc2face_rt.outputs import read_image_params

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pose_yaw30.png"
ID = np.random.default_rng(0).standard_normal(512).astype(np.float32)


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


def test_resume_reader_answers_a_large_foreign_png_from_its_header(tmp_path, monkeypatch):
    """A 4096x4096 PNG with our parameters (another tool's resize, say) in a resumed --out is refused by
    its size without its 50 MB of pixels being decoded."""
    from PIL import ImageFile

    info = PngInfo()
    info.add_text("arc2face-rt", '{"seed": 3}')
    Image.new("RGB", (4096, 4096)).save(tmp_path / "big.png", pnginfo=info, compress_level=1)
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    assert read_image_params(tmp_path / "big.png") is None
    assert decoded == []
    with pytest.raises(InvalidInputError, match=r"big.png: is 4096x4096; arc2face-rt's images here are 512x512"):
        read_png_params(tmp_path / "big.png", size=(512, 512))
    assert read_png_params(tmp_path / "big.png")[:2] == ({"seed": 3}, (4096, 4096))   # without size: read
    assert decoded == [(4096, 4096)]


def test_decode_image_refuses_a_str():
    from arc2face_rt.face import decode_image

    with pytest.raises(InvalidInputError, match="bytes, not str"):
        decode_image("abc")


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
        (lambda: FaceAnalyzer(det, rec).embed_image([[1, 2, 3]]), r"must be a uint8 \[H, W, 3\] RGB array"),
        (lambda: FaceAnalyzer(None, rec).embed_aligned([[1, 2, 3]]), "must be a uint8"),
        (lambda: FaceAnalyzer(det, rec).embed_file(None), "a path must be a str or pathlib.Path, not NoneType"),
        (lambda: FaceAnalyzer(det, rec).embed_file(photo, aligned="no"), "aligned must be True or False"),
        (lambda: FaceAnalyzer(det, rec).embed_files(None), "paths must be a list of image files"),
        (lambda: FaceAnalyzer(det, rec).embed_files([None]), "paths must hold file names"),
        (lambda: FaceAnalyzer(det, rec).embed_files([photo], aligned="no"), "aligned must be True or False"),
        (lambda: FaceAnalyzer(None, rec).embed_aligned(np.zeros(5, np.uint8)), r"uint8 \[H, W, 3\] RGB array"),
        (lambda: identity_from_images([photo], models, aligned="no"), "aligned must be True or False"),
        (lambda: identity_from_images([photo], models, verify=None), "verify must be True or False"),
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
                      (dict(backend="x"), r"backend \(--backend\) must be one of"),
                      (dict(verify=None), "verify must be True or False")):
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

