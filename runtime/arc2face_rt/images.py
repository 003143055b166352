"""Writing generated images: PNG with the generation parameters in a text chunk, written atomically."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_write

PARAMS_KEY = "arc2face-rt"   # PNG tEXt key holding the JSON parameters


def png_bytes(image: np.ndarray, params: dict) -> bytes:
    """image [H, W, 3] uint8 RGB -> PNG file content with `params` in a text chunk."""
    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | Path, image: np.ndarray, params: dict, overwrite: bool = False) -> Path:
    """image [H, W, 3] uint8 RGB -> PNG at `path`, written atomically, never over an existing file
    unless `overwrite`."""
    return atomic_write(path, png_bytes(image, params), overwrite=overwrite,
                        hint="choose another --out or pass --overwrite")


def read_params(path: str | Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[PARAMS_KEY])
