"""Image input: PATH arguments → files → RGB uint8 arrays, refusing bad files with a message that names the fix.

Conversions (every image leaves here as [H, W, 3] uint8 RGB, upright):
- EXIF orientation is applied (PIL.ImageOps.exif_transpose), so phone photos come out upright.
  The official Arc2Face demo (`np.array(Image.open(p))`) ignores EXIF; on rotated photos it sees a
  sideways face, so this is a deliberate difference.
- Grayscale ("1", "L") is replicated to three channels.
- Alpha ("RGBA", "LA", "PA", palette with transparency) is **composited on black**: rgb·α/255.
  Transparent pixels then look like the detector's own black padding, whatever colour the file
  happened to store under them.
- 16-bit samples keep their high byte (x >> 8). Pillow already does this for 16-bit RGB(A) PNGs;
  we do the same for 16-bit grayscale ("I;16*", and "I", which we treat as 16-bit).
- Anything else Pillow can read (CMYK, YCbCr, LAB, float "F") goes through Image.convert("RGB").
- Multi-frame files (GIF, TIFF, WebP) give their first frame.
- Formats Pillow identifies but does not decode here are refused, naming the format and why
  (EPS/PostScript: the external Ghostscript program; HDF5, GRIB, BUFR: data, no decoder; WMF/EMF:
  Windows only). Pillow's warnings about a file's oddities (corrupt EXIF data, ...) are not shown: the
  image decodes, or the error says why not.

`pillow_rgb=True` replaces the conversions above by Pillow's own `Image.convert("RGB")` for every mode,
which is what `diffusers.utils.load_image` does (alpha dropped, not composited; a palette's
transparency ignored): ControlNet condition images (`control.load_control_image`) use it, photos do not.

Limits are checked before any pixel is decoded: the file size from stat(), the pixel count from the
header (Pillow opens lazily). Pillow's own decompression-bomb guard still applies above its hard
limit (2 × PIL.Image.MAX_IMAGE_PIXELS ≈ 179 MP); raising past that needs PIL.Image.MAX_IMAGE_PIXELS too.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .. import checks
from ..errors import ImageDecodeError, InvalidInputError
from ..exits import os_error_message


# Still-image formats a folder walk takes (compared lower-case). `PHOTO_SUFFIXES`, the list of earlier
# versions, always (so a folder gives the list it gave then); `MORE_PHOTO_SUFFIXES`, still-image formats
# Pillow decodes itself without an external program, where this Pillow can open them (the codec built in).
# Video, data containers (HDF5, GRIB, ...), EPS/PostScript, WMF/EMF and icons are not photos: a folder walk
# leaves them alone. Files named explicitly, or matched by a glob, are taken whatever their suffix:
# decoding decides, and says why it cannot.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".ppm", ".pgm", ".pnm", ".jfif"})
MORE_PHOTO_SUFFIXES = frozenset({".jpe", ".apng", ".dib", ".pbm", ".avif", ".avifs", ".qoi", ".tga", ".jp2",
                                 ".j2k", ".jpx", ".jpf", ".pcx", ".sgi", ".ras"})
_CODECS = {"jpg_2000": (".jp2", ".j2k", ".jpx", ".jpf"), "avif": (".avif", ".avifs")}   # PIL.features names


@functools.cache
def image_extensions() -> frozenset[str]:
    """The suffixes a folder argument expands to: `PHOTO_SUFFIXES`, and `MORE_PHOTO_SUFFIXES` this Pillow
    can open."""
    from PIL import features

    readable = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    for codec, suffixes in _CODECS.items():
        if not features.check(codec):
            readable -= set(suffixes)
    return PHOTO_SUFFIXES | (MORE_PHOTO_SUFFIXES & readable)


# Formats Pillow identifies but does not decode here, and why (EPS: the Ghostscript program; the rest:
# stub plugins whose decoder Pillow does not ship, or ships for Windows only).
_UNDECODED = {
    "EPS": "an EPS/PostScript drawing, which Pillow decodes only with the external Ghostscript program "
           "(arc2face-rt does not run it)",
    "HDF5": "a scientific data file (HDF5), not a photo; Pillow identifies it but has no decoder for it",
    "GRIB": "a weather data file (GRIB), not a photo; Pillow identifies it but has no decoder for it",
    "BUFR": "a weather data file (BUFR), not a photo; Pillow identifies it but has no decoder for it",
    "WMF": "a Windows vector drawing (WMF/EMF), which Pillow renders only on Windows",
}


@dataclass(frozen=True)
class ImageLimits:
    """Refuse files larger than `max_bytes` or images with more than `max_pixels` pixels.

    The defaults admit 48 MP phone photos and 16-bit PNGs of that size; raise them for larger scans."""
    max_bytes: int = 200 * 2**20
    max_pixels: int = 64_000_000

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels"):
            if checks.whole(getattr(self, name), f"ImageLimits.{name}") < 1:
                raise InvalidInputError(f"ImageLimits.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = ImageLimits()

_FIX_FORMAT = "convert it to PNG or JPEG"
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def _header_fix(fp) -> str:
    """Advice for a header Pillow refused: a PNG or JPEG by its first bytes (a damaged one, or one
    whose metadata Pillow will not read, such as a text chunk that inflates past its limit) is to be
    re-saved, not converted to the format it already has."""
    try:
        fp.seek(0)
        head = fp.read(8)
    except Exception:
        return _FIX_FORMAT
    fmt = next((f for sig, f in _SIGNATURES.items() if head.startswith(sig)), None)
    return f"re-save or re-export the {fmt}" if fmt else _FIX_FORMAT


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS, pillow_rgb: bool = False) -> np.ndarray:
    """Read an image file; return it upright as [H, W, 3] uint8 RGB (`pillow_rgb`: see the module docstring).

    Raises ImageDecodeError (empty, too large, truncated, not an image or unsupported) and
    InvalidInputError (no such file)."""
    path = Path(check_path(path))
    check_image_file(path, limits)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot be read ({os_error_message(e)})") from None
    with f:
        try:
            return _decode(f, str(path), limits, pillow_rgb)
        except OSError as e:          # an I/O error while decoding (the file system, not the format)
            raise ImageDecodeError(f"{path}: cannot be read ({os_error_message(e)})") from None


def check_image_file(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """What `load_image` can refuse from stat() alone (missing, not a regular file, empty, over the
    size limit), with its errors: a command checks every file this way before it loads any model."""
    path = Path(check_path(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        if os.path.islink(path):
            raise InvalidInputError(f"{path}: a symbolic link to nothing (it points at {os.readlink(path)}, which "
                                    "does not exist); fix or remove the link") from None
        raise InvalidInputError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot be read ({os_error_message(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        if os.path.islink(path):
            raise ImageDecodeError(f"{path}: is a symbolic link to a folder, which a folder walk does not follow; "
                                   "name the folder itself to use its photos")
        try:
            os.scandir(path).close()
        except OSError as e:        # a folder walk lists a subfolder it cannot open as a file it skipped
            raise ImageDecodeError(f"{path}: is a folder that cannot be read ({(e.strerror or str(e)).lower()}), "
                                   "not an image file; the photos in it are not used: fix its permissions") from None
        raise ImageDecodeError(f"{path}: is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(f"{path}: is not a regular file (a pipe, socket or device), not an image file")
    size = st.st_size
    if size == 0:
        raise ImageDecodeError(f"{path}: empty file (0 bytes); re-copy or re-download it")
    if size > limits.max_bytes:
        raise ImageDecodeError(
            f"{path}: {size / 2**20:.1f} MiB exceeds the {limits.max_bytes / 2**20:.0f} MiB file-size limit; "
            "downscale or recompress it (from Python: raise ImageLimits.max_bytes)")


def check_path(path: str | Path) -> str | Path:
    """`path`, refused with InvalidInputError when it is not a str or os.PathLike, or no file can have that
    name (empty, or a NUL byte)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"a path must be a str or pathlib.Path, not {type(path).__name__}")
    text = str(path)
    if not text.strip():
        raise InvalidInputError("an empty path; give an image file, folder or pattern (an empty string would "
                                "mean the current folder)")
    if "\0" in text:
        raise InvalidInputError(f"{text!r}: not a valid path (it contains a NUL byte)")
    return path


def decode_image(data: bytes, name: str = "<bytes>", limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Like load_image, for encoded bytes already in memory (`name` only labels errors)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{name}: decode_image takes the encoded file's bytes, not {type(data).__name__}; "
                                "pass a path to load_image, or the bytes read from the file")
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty (0 bytes); send the image file's contents")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            f"{name}: {len(data) / 2**20:.1f} MiB exceeds the {limits.max_bytes / 2**20:.0f} MiB limit; "
            "downscale or recompress it (from Python: raise ImageLimits.max_bytes)")
    return _decode(io.BytesIO(data), name, limits)


def _decode(fp, name: str, limits: ImageLimits, pillow_rgb: bool = False) -> np.ndarray:
    with warnings.catch_warnings():
        # Our own pixel limit (checked next, from the header) is the policy; Pillow's warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # So are Pillow's warnings about a file's oddities (corrupt EXIF data, a palette's transparency
        # given as bytes): the image either decodes, or the error below says why not.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            im = Image.open(fp)  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"{name}: refused by Pillow's decompression-bomb guard ({e}); "
                                   "downscale the image") from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError(f"{name}: not an image, or a format Pillow cannot read; {_header_fix(fp)}") from e
        except Exception as e:  # a malformed header raises SyntaxError/OSError/ValueError by plugin
            raise ImageDecodeError(f"{name}: unreadable image header ({e}); {_header_fix(fp)}") from e
        w, h = im.size
        fmt = im.format or "image"
        if fmt == "EPS" or isinstance(im, ImageFile.StubImageFile):   # Ghostscript, or a decoder we never install
            why = _UNDECODED.get(fmt, f"in the {fmt} format, which Pillow identifies but has no decoder for here")
            raise ImageDecodeError(f"{name}: is {why}; {_FIX_FORMAT}")
        if w * h > limits.max_pixels:
            raise ImageDecodeError(
                f"{name}: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the {limits.max_pixels / 1e6:.1f} MP limit; "
                "downscale it, or raise the limit (--max-pixels N; ImageLimits.max_pixels in Python)")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except MemoryError:
            raise
        except Exception as e:  # truncated data: OSError; broken PNG chunks: SyntaxError; zlib errors ...
            raise ImageDecodeError(f"{name}: cannot decode the {fmt} data ({e}); the file is truncated or "
                                   f"corrupt: re-export or re-download it") from e
        try:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy() if pillow_rgb else _to_rgb8(im)
        except MemoryError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"{name}: cannot convert {fmt} mode {im.mode!r} to RGB ({e}); "
                                   f"{_FIX_FORMAT}") from e


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → [H, W, 3] uint8 RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("RGBa", "La"):  # premultiplied alpha is already "composited on black"
        return np.asarray(im.convert("RGBa"))[..., :3].copy()
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        # composite on black: round(rgb * a / 255), exact in integers
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        x = np.asarray(im).astype(np.int64)
        gray = (np.clip(x, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _expanduser(s: str) -> Path:
    """`~` and `~user` expanded; a `~user` with no such user stays literal (and then names no file)."""
    try:
        return Path(s).expanduser()
    except RuntimeError:
        return Path(s)


def _glob(pattern: str) -> list[Path]:
    """Files matching a pattern (`**` = any depth), hidden names left out. pathlib's `**` does not
    descend into symbolic links to folders, so a link loop cannot make the search explode."""
    parts = _expanduser(pattern).parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = Path(*parts[:first]) if first else Path(".")
    try:
        return [q for q in root.glob(str(Path(*parts[first:]))) if q.is_file() and not q.name.startswith(".")]
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{pattern}: cannot be searched ({e})") from None


def _walk(folder: Path, recursive: bool) -> list[Path]:
    """The photo candidates of a folder: its files whose suffix is a photo format (`image_extensions`),
    hidden names left out, and with `recursive` those of its subfolders (hidden ones too, as
    `Path.rglob` walks them). Symbolic links to folders are not followed, as `**` patterns do not
    follow them: with `recursive` each is a candidate that the per-file check skips with its reason.
    So are entries that are no usable file (a dangling link, a link loop, a pipe with a photo suffix)
    and subfolders that cannot be listed: nothing in the folder is silently lost."""
    found: list[Path] = []

    def visit(d: Path) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if d == folder:
                raise
            found.append(d)
            return
        for e in entries:
            try:
                is_dir = e.is_dir()          # True for a link to a folder too
            except OSError:                  # a link loop, say: a candidate if named as a photo
                is_dir = False
            if is_dir:
                if recursive:
                    found.append(d / e.name) if e.is_symlink() else visit(d / e.name)
            elif not e.name.startswith(".") and Path(e.name).suffix.lower() in image_extensions():
                found.append(d / e.name)
    visit(folder)
    return found


def expand_paths(args: Iterable[str | Path] | str | Path, recursive: bool = False) -> list[Path]:
    """PATH arguments (files, folders, glob patterns; or one path as a str or Path) → a sorted list of
    unique files.

    A file is taken as given; a folder gives its photo candidates (see `_walk`: by suffix, hidden files
    skipped, subfolders too when `recursive`); a pattern with * ? [ gives every file it matches (`**`
    recurses). Raises InvalidInputError for an empty path, one that names nothing, or a folder/pattern
    without images."""
    out: set[Path] = set()
    if not isinstance(args, (str, os.PathLike, Iterable)) or isinstance(args, bytes):
        raise InvalidInputError(f"paths must be a path or a list of paths (files, folders, patterns), not "
                                f"{type(args).__name__}")
    for arg in [args] if isinstance(args, (str, os.PathLike)) else args:
        s = str(check_path(arg))
        p = _expanduser(s)
        if p.is_dir():
            try:
                found = _walk(p, recursive)
            except OSError as e:
                raise InvalidInputError(f"{s}: folder cannot be read ({os_error_message(e)})") from None
            if not found:
                raise InvalidInputError(f"{s}: is a folder with no image files in it (none with a suffix Pillow "
                                        "reads, such as .jpg .png .webp); point at the photos themselves")
            out.update(found)
        elif os.path.lexists(p):   # files, pipes/devices, dangling links, link loops: load_image says why
            out.add(p)
        elif any(c in s for c in "*?["):
            found = _glob(s)
            if not found:
                raise InvalidInputError(f"{s}: pattern matches no files; check it (quote it so the shell "
                                        "does not expand it first)")
            out.update(found)
        else:
            raise InvalidInputError(f"{s}: no such file or folder; check the path")
    return sorted(out, key=str)
