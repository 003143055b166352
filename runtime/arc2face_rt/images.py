"""Writing generated images: PNG with the generation parameters in a text chunk, written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_write

PARAMS_KEY = "arc2face-rt"   # PNG tEXt key holding the JSON parameters


def save_png(path: str | Path, image: np.ndarray, params: dict, overwrite: bool = False) -> Path:
    """image [H, W, 3] uint8 RGB -> PNG at `path`, written atomically, never over an existing file
    unless `overwrite`."""
    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
    pil = Image.fromarray(np.ascontiguousarray(image), "RGB")
    return atomic_write(path, lambda f: pil.save(f, format="PNG", pnginfo=info), overwrite=overwrite,
                        hint="choose another --out or pass --overwrite")


def read_params(path: str | Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[PARAMS_KEY])
