"""Image input: every conversion against OpenCV or Pillow as the oracle, every bad file refused with a named fix."""
import cv2
import numpy as np
import pytest
from PIL import Image

from arc2face_rt.errors import ImageDecodeError, InvalidInputError
from arc2face_rt.face.image_io import ImageLimits, decode_image, expand_paths, load_image
from face_fixtures import astronaut, png_header_only


@pytest.fixture(scope="module")
def rgb():
    return astronaut()[::4, ::4].copy()  # [128, 128, 3]


def cv2_rgb(path, flags=cv2.IMREAD_COLOR):
    return cv2.imread(str(path), flags)[..., ::-1]


def test_rgb_png_matches_opencv(tmp_path, rgb):
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (128, 128, 3)
    np.testing.assert_array_equal(out, cv2_rgb(p))


def test_jpeg_close_to_opencv(tmp_path, rgb):
    p = tmp_path / "a.jpg"
    Image.fromarray(rgb).save(p, quality=95)
    out = load_image(p)
    assert out.shape == (128, 128, 3)
    assert np.abs(out.astype(int) - cv2_rgb(p).astype(int)).mean() < 1.5  # two libjpeg builds


def test_decode_bytes_equals_file(tmp_path, rgb):
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    np.testing.assert_array_equal(decode_image(p.read_bytes(), "upload"), load_image(p))


def test_grayscale_to_three_equal_channels(tmp_path, rgb):
    p = tmp_path / "g.png"
    Image.fromarray(rgb).convert("L").save(p)
    out = load_image(p)
    gray = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_bilevel_mode_1(tmp_path, rgb):
    p = tmp_path / "b.png"
    Image.fromarray(rgb).convert("1").save(p)
    np.testing.assert_array_equal(load_image(p), cv2_rgb(p))


def test_16bit_gray_png_keeps_high_byte(tmp_path):
    g = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)
    p = tmp_path / "g16.png"
    cv2.imwrite(str(p), g)
    assert Image.open(p).mode.startswith("I")
    ref = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert ref.dtype == np.uint16
    out = load_image(p)
    assert out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out[..., 1], (ref >> 8).astype(np.uint8))


def test_16bit_rgb_png_keeps_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    bgr16 = rng.integers(0, 65536, (40, 30, 3), dtype=np.uint16)
    p = tmp_path / "c16.png"
    cv2.imwrite(str(p), bgr16)
    np.testing.assert_array_equal(load_image(p), (bgr16[..., ::-1] >> 8).astype(np.uint8))


def test_palette_png_matches_opencv(tmp_path, rgb):
    p = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(p)
    assert Image.open(p).mode == "P"
    np.testing.assert_array_equal(load_image(p), cv2_rgb(p))


def _black_composite(im: Image.Image) -> np.ndarray:
    """Oracle: Pillow's own alpha compositing over an opaque black background."""
    black = Image.new("RGBA", im.size, (0, 0, 0, 255))
    return np.asarray(Image.alpha_composite(black, im.convert("RGBA")).convert("RGB")).astype(int)


def test_rgba_composited_on_black(tmp_path, rgb):
    alpha = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))
    im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    p = tmp_path / "rgba.png"
    im.save(p)
    out = load_image(p)
    assert out.shape == (128, 128, 3)
    assert np.abs(out.astype(int) - _black_composite(im)).max() <= 1
    assert out[:, 0].max() == 0                     # alpha 0 → black, whatever the stored colour
    np.testing.assert_array_equal(out[:, -1], rgb[:, -1])   # alpha 255 → unchanged


def test_gray_alpha_and_palette_transparency(tmp_path, rgb):
    la = Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA")
    p = tmp_path / "la.png"
    la.save(p)
    assert np.abs(load_image(p).astype(int) - _black_composite(la)).max() <= 1
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    p = tmp_path / "pt.png"
    pal.save(p, transparency=0)
    reread = Image.open(p)
    assert reread.mode == "P" and "transparency" in reread.info
    assert np.abs(load_image(p).astype(int) - _black_composite(reread)).max() <= 1


def test_exif_orientation_applied_like_opencv(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :] = (0, 0, 255)
    img[:20, :40] = (255, 0, 0)                     # red block top-left (as stored)
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6                                # Orientation: rotate 90° clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    ref = cv2_rgb(p)                                # cv2.imread applies EXIF orientation too
    assert out.shape == ref.shape == (80, 40, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 2
    assert out[5, 35, 0] > 200 and out[5, 5, 2] > 200  # red block now top-right


# ---- bad files ---------------------------------------------------------------------------------------

def _refused(path, match, **kw):
    with pytest.raises(ImageDecodeError, match=match) as e:
        load_image(path, **kw)
    assert str(path) in str(e.value)
    return str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "re-copy" in _refused(p, "empty")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, rgb, fmt):
    p = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(rgb).save(p, fmt)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert "re-download" in _refused(p, "truncated or corrupt")


def test_text_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not pixels\n" * 10)
    assert "PNG or JPEG" in _refused(p, "not an image")


def test_png_whose_header_pillow_refuses_is_to_be_resaved_not_converted(tmp_path, rgb):
    """A PNG with a zTXt chunk that inflates past Pillow's text limit was told to be converted to PNG."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    p = tmp_path / "notes.png"
    Image.fromarray(rgb).save(p, "PNG")
    data = p.read_bytes()
    p.write_bytes(data[:33] + chunk(b"zTXt", b"note\0\0" + zlib.compress(b"x" * 2_000_000)) + data[33:])
    msg = _refused(p, "unreadable image header")
    assert msg.endswith("re-save or re-export the PNG") and "convert" not in msg
    p.write_bytes(data[:29] + b"\0\0\0\0" + data[33:])      # IHDR's CRC broken: Pillow cannot identify it
    msg = _refused(p, "not an image, or a format Pillow cannot read")
    assert msg.endswith("re-save or re-export the PNG"), msg


def test_unsupported_format(tmp_path):
    p = tmp_path / "photo.heic"  # an ISO-BMFF/HEIF header Pillow has no plugin for
    p.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    _refused(p, "format Pillow cannot read")


def test_pixel_limit_checked_from_header_before_decoding(tmp_path):
    p = png_header_only(tmp_path / "huge.png", 10_000, 10_000)  # 100 MP claimed, no data at all
    msg = _refused(p, "exceeds the 64.0 MP limit")
    assert "--max-pixels" in msg


def test_pixel_limit_can_be_raised(tmp_path):
    p = png_header_only(tmp_path / "big.png", 3000, 3000)
    _refused(p, "MP limit", limits=ImageLimits(max_pixels=1_000_000))
    # raised: the header passes, and decoding then finds there is no pixel data
    _refused(p, "truncated or corrupt", limits=ImageLimits(max_pixels=10_000_000))


def test_pillow_decompression_bomb_guard(tmp_path):
    p = png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # 400 MP > 2 × Pillow's MAX_IMAGE_PIXELS
    _refused(p, "decompression-bomb", limits=ImageLimits(max_pixels=10**9))


def test_byte_limit(tmp_path, rgb):
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    _refused(p, "file-size limit", limits=ImageLimits(max_bytes=1000))
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(p.read_bytes(), "upload", ImageLimits(max_bytes=1000))


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        load_image(tmp_path / "nope.png")


# ---- PATH arguments ----------------------------------------------------------------------------------

def test_expand_paths(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for name in ["b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "sub/c.webp"]:
        (d / name).write_bytes(b"x")
    single = tmp_path / "z.bin"
    single.write_bytes(b"x")
    assert expand_paths([d]) == [d / "a.PNG", d / "b.jpg"]
    assert expand_paths([str(d)], recursive=True) == [d / "a.PNG", d / "b.jpg", d / "sub" / "c.webp"]
    # explicit files whatever their suffix, globs, duplicates removed, one sorted list
    got = expand_paths([single, str(d / "*.txt"), str(d / "b.jpg"), d])
    assert got == sorted({d / "a.PNG", d / "b.jpg", d / "notes.txt", single}, key=str)
    assert expand_paths([str(tmp_path / "**" / "*.webp")]) == [d / "sub" / "c.webp"]


@pytest.mark.parametrize("arg,match", [("missing.jpg", "no such file or folder"),
                                       ("*.nothing", "matches no files"),
                                       ("emptydir", "no image files")])
def test_expand_paths_errors(tmp_path, arg, match):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "readme.txt").write_text("x")
    with pytest.raises(InvalidInputError, match=match):
        expand_paths([str(tmp_path / arg)])


def test_glob_does_not_follow_symlink_loops(tmp_path, monkeypatch):
    """`**` with folders linking back up must neither explode nor count a photo twice."""
    from PIL import Image

    from arc2face_rt.face.image_io import expand_paths

    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "a" / "ok.png")
    (tmp_path / "d" / "a" / "up").symlink_to("..")
    (tmp_path / "d" / "b" / "up").symlink_to("..")
    monkeypatch.chdir(tmp_path)
    assert expand_paths(["d/**/*.png"]) == [tmp_path.joinpath("d/a/ok.png").relative_to(tmp_path)]
    assert expand_paths([str(tmp_path / "d" / "**" / "*.png")]) == [tmp_path / "d" / "a" / "ok.png"]
