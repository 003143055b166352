"""Writing generated images: PNG with the generation parameters in a text chunk (or, for `dataset
--image-format jpg`, JPEG with them in its comment), written atomically."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from . import checks
from .atomic import atomic_write
from .errors import ImageDecodeError, InvalidInputError
from .fileio import loads_json, read_regular_file
from .specs import IMAGE_SIZE

PARAMS_KEY = "arc2face-rt"   # PNG tEXt key holding the JSON parameters
MAX_PNG_BYTES = 64 << 20     # ours are under 1 MB (512x512 RGB); a larger file is not one of them
# `generate`'s PNGs at zlib level 4, not Pillow's 6: on five photographs made 512x512 (scikit-image's
# astronaut, and chelsea, coffee, rocket, immunohistochemistry resized bicubically) it wrote 0-4% larger
# files 1.5-2.2x faster (astronaut: 424 kB either way, 63 instead of 93 ms on a 2-core AMD EPYC).
# `dataset` keeps level 6: a shard made again is compared byte for byte with what an earlier run (of
# an earlier version, too) left in place, and a --resume must find the same bytes.
PNG_COMPRESS_LEVEL = 4
DATASET_PNG_LEVEL = 6


def check_rgb8(image, name: str = "image", fix: str = "GenerationResult.images[i] is one") -> None:
    """InvalidInputError naming `name` unless `image` is a uint8 [H, W, 3] RGB array; `fix` says where one
    comes from."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidInputError(f"{name} must be a uint8 [H, W, 3] RGB array (got {got}); {fix}")


def png_bytes(image: np.ndarray, params: dict, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """image [H, W, 3] uint8 RGB -> PNG file content with `params` in a text chunk."""
    check_rgb8(image)
    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG", pnginfo=info,
                                                             compress_level=compress_level)
    return buf.getvalue()


IMAGE_FORMATS = ("png", "jpg")   # `dataset --image-format`; `generate` writes PNG
DEFAULT_JPEG_QUALITY = 95


def image_bytes(image: np.ndarray, params: dict, image_format: str = "png",
                quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """A dataset sample's file content, image [H, W, 3] uint8 RGB: "png" (lossless, at
    DATASET_PNG_LEVEL; `params` in a text chunk, which `read_params` reads) or "jpg" (baseline JPEG at
    `quality`, 4:2:0 chroma; `params` as the same JSON in its comment segment, which Pillow shows as
    `Image.info["comment"]`)."""
    if image_format == "png":
        return png_bytes(image, params, DATASET_PNG_LEVEL)          # which checks the image
    if image_format != "jpg":
        raise InvalidInputError(f"image format must be one of {', '.join(IMAGE_FORMATS)} (got {image_format!r})")
    check_rgb8(image)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(
        buf, format="JPEG", quality=quality, comment=json.dumps(params, sort_keys=True).encode())
    return buf.getvalue()


def save_png(path: str | Path, image: np.ndarray, params: dict, overwrite: bool = False) -> Path:
    """image [H, W, 3] uint8 RGB -> PNG at `path`, written atomically, never over an existing file
    unless `overwrite`."""
    return atomic_write(path, png_bytes(image, params), overwrite=overwrite,
                        hint="choose another --out or pass --overwrite")


def read_params(path: str | Path) -> dict:
    """The generation parameters an arc2face-rt PNG records (a JSON object in its text chunk): the options
    (seed, index, steps, guidance, scheduler), the identity (and control image) fingerprint, and how the
    pixels were made (backend, precision, engines; ONNX Runtime on a GPU also device, ort_graphs, tf32:
    `provenance`, whose keys an older PNG may lack). README: Commands. Also the JPEGs of `dataset
    --image-format jpg`, which record the same JSON in their comment.

    Raises InvalidInputError (no such file, a folder or pipe, an image without arc2face-rt parameters)
    or ImageDecodeError (not a PNG or JPEG, truncated or corrupt)."""
    params, _, _ = read_png_params(path, jpeg=True)
    return params


def read_png_params(path: str | Path, jpeg: bool = False,
                    size: tuple[int, int] | None = None) -> tuple[dict, tuple[int, int], str]:
    """(parameters, image size, image mode) of an arc2face-rt PNG (with `jpeg`, or JPEG); errors as
    `read_params`. The whole file is checked (every PNG chunk present and its CRC right, up to IEND, and
    its pixels decode; a JPEG's pixels all decode), not only the parameters. With `size` (width, height),
    an image of another size is refused (InvalidInputError) from its header, before any pixel is decoded."""
    data = read_regular_file(checks.path(path, "path"), MAX_PNG_BYTES, what="image" if jpeg else "PNG image")
    want = size
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size, mode = im.format, im.size, im.mode
            if want is not None and size != tuple(want):
                raise InvalidInputError(f"{path}: is {size[0]}x{size[1]}; arc2face-rt's images here are "
                                        f"{want[0]}x{want[1]}, so this is not one of them")
            text = im.info.get(PARAMS_KEY) if fmt == "PNG" else None   # our tEXt chunk precedes the pixels
            if fmt == "PNG":
                im.verify()                     # every chunk's CRC, up to IEND
            elif fmt == "JPEG" and jpeg:
                im.load()                       # truncated data raises here
                text = im.info.get("comment")
                text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        if fmt == "PNG":                        # the pixels decode: CRCs hold over a damaged zlib stream or
            with Image.open(io.BytesIO(data)) as im:    # missing IDAT chunks
                im.load()
                if text is None:                # a text chunk after the pixels (a re-saving tool moved it)
                    text = im.text.get(PARAMS_KEY)
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as e:    # intact, but more pixels than Pillow will decode
        raise ImageDecodeError(f"{path}: over Pillow's decompression-bomb pixel limit ({e}); arc2face-rt's PNGs "
                               f"are {IMAGE_SIZE}x{IMAGE_SIZE}, so this is not one of them") from None
    except UnidentifiedImageError:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):     # a PNG whose header chunks are broken (a bad CRC)
            raise ImageDecodeError(f"{path}: truncated or corrupt PNG (Pillow cannot read its header chunks); "
                                   "re-generate it") from None
        raise ImageDecodeError(f"{path}: not an image (or one Pillow cannot read); read_params reads the PNGs "
                               "arc2face-rt generates") from None
    except Exception as e:              # truncated data, a bad CRC, broken chunks: Pillow raises many types
        kind = "JPEG" if data.startswith(b"\xff\xd8") else "PNG"
        raise ImageDecodeError(f"{path}: truncated or corrupt {kind} ({' '.join(str(e).split()) or type(e).__name__})"
                               "; re-generate it") from None
    if fmt != "PNG" and not (jpeg and fmt == "JPEG"):
        raise InvalidInputError(f"{path}: is a {fmt} image, not a PNG; arc2face-rt records its parameters only "
                                "in the PNGs it generates" + (" (and the JPEGs of `dataset --image-format jpg`)"
                                                              if jpeg else ""))
    where = f"'{PARAMS_KEY}' text chunk" if fmt == "PNG" else "JPEG comment"
    if text is None:
        raise InvalidInputError(f"{path}: has no arc2face-rt parameters (no {where}); it was "
                                "not written by arc2face-rt, or an editor dropped them")
    try:
        params = loads_json(text)
    except ValueError as e:
        raise InvalidInputError(f"{path}: its {where} is not valid JSON ({e}); the file was "
                                "edited or damaged, or another program wrote it") from None
    if not isinstance(params, dict):
        raise InvalidInputError(f"{path}: its {where} holds {type(params).__name__} "
                                f"{str(params)[:40]}, not a JSON object of parameters; the file was edited")
    return params, size, mode
