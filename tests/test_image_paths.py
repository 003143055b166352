"""Photo paths and folders across embed/score/generate/prepare: empty and impossible paths refused in one
line, every entry of a photo folder used or reported (never silently dropped), non-UTF-8 names written
without a crash, Pillow's own warnings kept off the terminal, one bad photo given one error line."""
from __future__ import annotations

import io
import os
import struct
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from arc2face_rt.errors import ImageDecodeError, InvalidInputError
from arc2face_rt.face.image_io import check_image_file, expand_paths, load_image

NON_UTF8 = os.fsdecode(b"caf\xe9.png")          # how Python holds a Latin-1 file name: 'caf\udce9.png'


def _png(path, size=(64, 64), color=(200, 100, 50)):
    Image.new("RGB", size, color).save(path)
    return path


def _parse(tool, argv):
    if tool == "rt":
        from arc2face_rt.cli import build_parser
    else:
        from arc2face_ref.train.cli import build_parser
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [["embed", "--image", "", "--out", "x.npy"],
                                  ["score", "--identity", "id.npy", ""],
                                  ["generate", "--engines", "e", "--image", "", "--out", "g"]])
def test_empty_image_path_refused(argv, capsys):
    """`--image ""` (an empty shell variable) is refused, not read as 'every photo in the current folder'."""
    with pytest.raises(SystemExit) as e:
        _parse("rt", argv)
    assert e.value.code == 2 and "must not be empty" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="empty path"):
        expand_paths([""])


def test_impossible_paths_are_one_line_errors(tmp_path, monkeypatch):
    """~nosuchuser (the shell passes it literally) and NUL bytes: InvalidInputError, never a traceback;
    a str given to expand_paths is one path, not its letters."""
    from arc2face_rt.control import load_control_image
    from arc2face_rt.images import read_params

    for arg in ["~nosuchuser-zz/me.jpg", "~nosuchuser-zz/*.jpg"]:
        with pytest.raises(InvalidInputError, match="no such file|matches no files"):
            expand_paths([arg])
    for fn in (load_image, load_control_image, read_params, check_image_file):
        with pytest.raises(InvalidInputError, match="NUL byte"):
            fn("a\0b.png")
    with pytest.raises(InvalidInputError, match="NUL byte"):
        expand_paths(["a\0b.png"])
    d = tmp_path / "photos"
    d.mkdir()
    _png(d / "a.png")
    assert expand_paths(str(d)) == [d / "a.png"]


def test_read_params_over_pillow_pixel_limit(tmp_path, monkeypatch):
    """An intact PNG with more pixels than Pillow decodes is called that, not 'truncated or corrupt'."""
    from arc2face_rt.images import read_params

    _png(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="decompression-bomb pixel limit") as e:
        read_params(tmp_path / "big.png")
    assert "corrupt" not in str(e.value)


def test_folder_walk_reports_what_it_cannot_use(tmp_path, monkeypatch):
    """Every entry of a photo folder is used or comes back as a candidate whose check says why it is
    skipped: a symlinked subfolder is not followed but reported (as `**` patterns do not follow it), hidden
    subfolders are walked as before, photo suffixes beyond the old list (.tga) are taken, video, data and
    EPS files are left alone."""
    album, d = tmp_path / "album", tmp_path / "pl"
    album.mkdir(), d.mkdir()
    _png(album / "al.png")
    _png(d / "top.png")
    Image.new("RGB", (64, 64)).save(d / "x.tga")               # a format Pillow reads, not on an old list
    for other in ("notes.txt", "clip.mpg", "data.h5", "logo.eps", "favicon.ico"):
        (d / other).write_bytes(b"not a photo")
    (d / ".thumbs").mkdir()
    _png(d / ".thumbs" / "t.png")
    _png(d / ".hidden.png")
    (d / "linked").symlink_to(album)
    (d / "up").symlink_to("..")                                 # a loop: the walk must end
    (d / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (d / "loop1.png").symlink_to("loop2.png")
    (d / "loop2.png").symlink_to("loop1.png")
    os.mkfifo(d / "pipe.png")
    (d / "locked").mkdir()
    _png(d / "locked" / "s.png")
    real_scandir = os.scandir

    def scandir(path="."):         # as an unreadable folder behaves for a user without root's override
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)

    got = expand_paths([d], recursive=True)
    names = [p.relative_to(d).as_posix() for p in got]
    assert "x.tga" in names and ".thumbs/t.png" in names and "linked/al.png" not in names
    assert not {"notes.txt", "clip.mpg", "data.h5", "logo.eps", "favicon.ico", ".hidden.png"} & set(names)
    reasons = {}
    for p in got:
        try:
            check_image_file(p)
        except (ImageDecodeError, InvalidInputError) as e:
            reasons[p.relative_to(d).as_posix()] = str(e)
    assert set(reasons) == {"dangling.jpg", "loop1.png", "loop2.png", "pipe.png", "locked", "linked", "up"}, reasons
    assert "symbolic link to a folder" in reasons["linked"] and "name the folder itself" in reasons["linked"]
    assert "link to nothing" in reasons["dangling.jpg"]
    assert "too many levels of symbolic links" in reasons["loop1.png"]
    assert "not a regular file" in reasons["pipe.png"]
    assert "cannot be read (permission denied)" in reasons["locked"]
    assert [p.name for p in expand_paths([d])].count("al.png") == 0      # not recursive: subfolders left out


def test_same_bad_path_same_message_for_photos_and_control_images(tmp_path):
    from arc2face_rt.control import load_control_image

    (tmp_path / "loop1.png").symlink_to("loop2.png")
    (tmp_path / "loop2.png").symlink_to("loop1.png")
    [p] = expand_paths([tmp_path / "loop1.png"])           # exists() is False for it: not 'no such file'
    msgs = []
    for fn in (load_image, load_control_image):
        with pytest.raises(ImageDecodeError) as e:
            fn(p)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "too many levels of symbolic links" in msgs[0]


def test_pillow_warnings_stay_quiet_and_eps_is_named(tmp_path):
    """Corrupt EXIF and a palette's byte transparency decode without Pillow's warnings; EPS (Ghostscript)
    is refused naming the format, not called truncated."""
    b = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(b, "JPEG", quality=95)
    j = b.getvalue()
    exif = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40
    (tmp_path / "badexif.jpg").write_bytes(j[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + j[2:])
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0], a[:20, :, 3], a[20:, :, 3] = 200, 100, 255
    Image.fromarray(a).quantize(8).save(tmp_path / "pal.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "badexif.jpg").shape == (64, 64, 3)
        assert load_image(tmp_path / "pal.png", pillow_rgb=True).shape == (64, 64, 3)
    Image.new("RGB", (64, 64)).save(tmp_path / "f.eps")
    with pytest.raises(ImageDecodeError, match="EPS/PostScript drawing.*Ghostscript") as e:
        load_image(tmp_path / "f.eps")
    assert "corrupt" not in str(e.value)
    (tmp_path / "d.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)      # a stub format: no Ghostscript
    with pytest.raises(ImageDecodeError, match=r"is a scientific data file \(HDF5\), not a photo.*no decoder") as e:
        load_image(tmp_path / "d.h5")
    assert "Ghostscript" not in str(e.value)


def test_score_table_with_non_utf8_name_under_strict_stdout(monkeypatch):
    """Under a UTF-8 locale stdout is strict: a Latin-1 file name is escaped as on stderr, not a crash."""
    from arc2face_rt.face.cli import _write_out

    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="utf-8", errors="strict"))
    _write_out(f"1.0000\t{NON_UTF8}\n")
    sys.stdout.flush()
    assert buf.getvalue() == b"1.0000\tcaf\\udce9.png\n"


def test_one_bad_photo_is_one_error_line(tmp_path, capsys):
    from arc2face_rt.cli import main

    (tmp_path / "zero.png").write_bytes(b"")
    assert main(["embed", "--image", str(tmp_path / "zero.png"), "--out", str(tmp_path / "id.npy"),
                 "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty file" in err[0], err


@pytest.mark.parametrize("tool,argv", [("rt", ["generate", "--engines", "e", "--random-id", "--out", "g"]),
                                       ("train", ["prepare", "--images", "p", "--out", "o"])])
def test_max_pixels_advised_where_it_exists(tool, argv, tmp_path):
    """The over-the-limit message advises --max-pixels: every command that reads photos has it."""
    assert _parse(tool, argv + ["--max-pixels", "1e8"]).max_pixels == 100_000_000
    _png(tmp_path / "w.png", size=(100, 20))
    from arc2face_rt.face.image_io import ImageLimits
    with pytest.raises(ImageDecodeError, match="--max-pixels"):
        load_image(tmp_path / "w.png", ImageLimits(max_pixels=1000))


def test_prepare_non_utf8_skip_and_fixed_photo_rerun(tmp_path):
    """A skipped photo with a Latin-1 name lands in skipped.txt as its own bytes; once every skipped
    photo is fixed, the same command reads it again and uses it."""
    from face_fixtures import astronaut, tiny_models_dir

    from arc2face_ref.train.prepare import SKIPPED_FILE, prepare
    from arc2face_rt.face.identity import FaceAnalyzer
    from arc2face_rt.face.models import load_face_models

    def analyzer():
        return FaceAnalyzer(*load_face_models(tiny_models_dir(), device="cpu"))

    photos = tmp_path / "photos"
    photos.mkdir()
    good = io.BytesIO()
    Image.fromarray(astronaut()).save(good, "PNG")
    bad = photos / NON_UTF8
    bad.write_bytes(good.getvalue()[:20000])                   # truncated
    out = tmp_path / "data"
    assert prepare([photos], out, analyzer).written == 0
    assert (out / SKIPPED_FILE).read_bytes().startswith(os.fsencode(bad) + b"\t")
    bad.write_bytes(good.getvalue())                           # the photo, fixed as the reason advises
    rep = prepare([photos], out, analyzer)
    assert rep.written == 1 and rep.skipped == [] and (out / SKIPPED_FILE).read_bytes() == b""
    assert prepare([photos], out, analyzer).shards_done_before == 1      # unchanged: a no-op again


def test_identity_from_one_bad_photo_raises_without_logging(tmp_path):
    """generate --image's path: one unusable photo is one error, not also a 'skipped' line."""
    from face_fixtures import tiny_models_dir

    from arc2face_rt.face.models import identity_from_images

    (tmp_path / "zero.png").write_bytes(b"")
    logged = []
    with pytest.raises(InvalidInputError, match="empty file"):
        identity_from_images(tmp_path / "zero.png", tiny_models_dir(), device="cpu", log=logged.append)
    assert logged == []


def test_folder_suffixes_keep_the_old_list_and_drop_formats_without_their_codec(monkeypatch):
    """The suffixes of earlier versions are always walked (a folder gives the list it gave then); JPEG 2000
    and AVIF only where this Pillow has the codec; no video, data, EPS or icon suffix."""
    from PIL import features

    from arc2face_rt.face import image_io

    old = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm", ".jfif"}
    image_io.image_extensions.cache_clear()
    monkeypatch.setattr(features, "check", lambda name: name != "jpg_2000")
    try:
        got = image_io.image_extensions()
    finally:
        image_io.image_extensions.cache_clear()
    assert old <= got and ".tga" in got and ".qoi" in got and ".jp2" not in got and ".j2k" not in got
    assert not {".mpg", ".mpeg", ".h5", ".grib", ".bufr", ".wmf", ".emf", ".eps", ".ps", ".ico"} & got
