"""Writing generated images: PNG with the generation parameters in a text chunk, written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import OutputExistsError
from .manifest import publish_mode

PARAMS_KEY = "arc2face-rt"   # PNG tEXt key holding the JSON parameters


def save_png(path: str | Path, image: np.ndarray, params: dict, overwrite: bool = False) -> Path:
    """image [H, W, 3] uint8 RGB -> PNG at `path` via a temporary file and an atomic rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists; choose another --out or pass --overwrite")
    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        publish_mode(fd)
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(image), "RGB").save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)      # fails if `path` appeared meanwhile: never clobber
            except FileExistsError:
                raise OutputExistsError(f"{path}: appeared while writing; not overwritten") from None
            except OSError:             # filesystems without hard links
                os.replace(tmp, path)
            Path(tmp).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_params(path: str | Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[PARAMS_KEY])
