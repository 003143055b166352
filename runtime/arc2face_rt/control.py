"""ControlNet (pose) condition images: file -> the array the control step graphs take.

Arc2Face's pose ControlNet is conditioned on a normal-map rendering of the target head pose (the
official demo renders it with EMOCA, a 3D face reconstruction model; README "ControlNet pose"). The
preprocessing is exactly that of diffusers' StableDiffusionControlNetPipeline given the image as
`diffusers.utils.load_image` reads it, called with height=width=512 (the engines' size; without them
diffusers would generate at the control image's own size): EXIF orientation applied, RGB by Pillow's
`convert("RGB")` as load_image does (an alpha channel or a palette's transparency is dropped, not
composited: a normal map rendered on a transparent background keeps its colours), resized to
512x512 with PIL's Lanczos filter (VaeImageProcessor, `resample="lanczos"`), float32 in [0, 1] (not
[-1, 1]), NCHW. The
pipeline duplicates it for the CFG batch inside the step graph, as diffusers does (not guess mode).

What is refused, in one line each: what `face.image_io.load_image` refuses (unreadable, empty, huge
files), images that are not square (diffusers would stretch them, distorting the pose), smaller than
64 pixels, or greyscale (a normal map is a colour rendering: its three channels are the normal's
x, y, z). A `Control` built from arrays must hold finite float32 values in [0, 1].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checks
from .errors import InvalidInputError
from .specs import DEFAULT_CONTROL_SCALE, IMAGE_SIZE

MIN_SIDE = 64
MAX_SCALE = 10.0


def preprocess_control(rgb: np.ndarray, name: str = "control image") -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [3, 512, 512] float32 in [0, 1] (diffusers' ControlNet preprocessing)."""
    from PIL import Image

    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InvalidInputError(f"{name}: expected a uint8 [H, W, 3] RGB array (got {got}); drop an alpha "
                                "channel with rgba[..., :3] (as diffusers' load_image does), or pass the file to "
                                "load_control_image")
    h, w = rgb.shape[:2]
    if h != w:
        raise InvalidInputError(f"{name}: {w}x{h} is not square; the control image is a square normal-map "
                                f"rendering of the head ({IMAGE_SIZE}x{IMAGE_SIZE}): crop or pad it to a square")
    if h < MIN_SIDE:
        raise InvalidInputError(f"{name}: {w}x{h} is too small (at least {MIN_SIDE}x{MIN_SIDE}; the model sees "
                                f"it at {IMAGE_SIZE}x{IMAGE_SIZE})")
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        raise InvalidInputError(f"{name}: is greyscale; the control image is a colour normal-map rendering "
                                "(README: ControlNet pose)")
    im = Image.fromarray(np.ascontiguousarray(rgb, np.uint8), "RGB")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
    return (np.asarray(im).astype(np.float32) / 255.0).transpose(2, 0, 1).copy()


def load_control_image(path: str | Path, limits=None) -> np.ndarray:
    """A condition image file -> [3, 512, 512] float32 in [0, 1] (`limits`: an ImageLimits, default
    DEFAULT_LIMITS)."""
    from .face.image_io import DEFAULT_LIMITS, load_image

    return preprocess_control(load_image(path, limits or DEFAULT_LIMITS, pillow_rgb=True), str(path))


@dataclass(frozen=True)
class Control:
    """The pose condition of a run: one image for every image of the run, or one per image
    (`images[i]` for image index i), and its scale (diffusers' controlnet_conditioning_scale)."""
    images: np.ndarray                   # [1 or N, 3, 512, 512] float32 in [0, 1]
    scale: float = DEFAULT_CONTROL_SCALE
    fingerprints: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        imgs = self.images
        if not isinstance(imgs, np.ndarray):
            raise InvalidInputError(f"control images must be a numpy float32 array [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] "
                                    f"in [0, 1] (got {type(imgs).__name__}); Control.from_files reads image files")
        if imgs.ndim != 4 or imgs.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE) or imgs.dtype != np.float32 \
                or len(imgs) == 0:
            raise InvalidInputError(f"control images must be float32 [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] "
                                    f"(got {imgs.dtype} {imgs.shape})")
        if not np.all(np.isfinite(imgs)) or imgs.min() < 0 or imgs.max() > 1:
            bad = "NaN or infinity" if not np.all(np.isfinite(imgs)) else f"values {imgs.min():g}..{imgs.max():g}"
            raise InvalidInputError(f"control images: {bad}; they must be in [0, 1] (an 8-bit image divided by "
                                    "255, as load_control_image gives)")
        scale = checks.real(self.scale, "control scale (--control-scale)")     # a Python float: PNGs record it
        if not np.isfinite(scale) or not 0 <= scale <= MAX_SCALE:
            raise InvalidInputError(f"--control-scale must be a number in 0..{MAX_SCALE:g} (got {self.scale!r}; "
                                    f"diffusers' default is {DEFAULT_CONTROL_SCALE:g})")
        object.__setattr__(self, "scale", scale)
        imgs = imgs.copy()               # a read-only copy: the fingerprints below describe what every run uses
        imgs.flags.writeable = False
        object.__setattr__(self, "images", imgs)
        object.__setattr__(self, "fingerprints", tuple(hashlib.sha256(np.ascontiguousarray(a).tobytes())
                                                       .hexdigest()[:16] for a in imgs))

    @classmethod
    def from_files(cls, paths, scale: float = DEFAULT_CONTROL_SCALE, count: int | None = None,
                   limits=None) -> "Control":
        """One file for every image, or exactly `count` files (one per image, in order); `paths`: a
        list of files, or one file (a str or Path); `limits`: as load_control_image."""
        if count is not None:
            count = checks.whole(count, "count")
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise InvalidInputError("--control-image: no files given; give one for all images or one per image")
        if count is not None and len(paths) not in (1, count):
            raise InvalidInputError(f"--control-image: {len(paths)} files for {count} images; give one for all "
                                    "images or one per image")
        return cls(np.stack([load_control_image(p, limits) for p in paths]), scale)

    def check_indices(self, indices) -> None:
        if len(self.images) > 1 and max(indices) >= len(self.images):
            raise InvalidInputError(f"{len(self.images)} control images, but image index {max(indices)} is asked "
                                    "for; give one control image for all images or one per image")

    def batch(self, indices) -> np.ndarray:
        """[len(indices), 3, 512, 512]: the control image of each image index."""
        if len(self.images) == 1:
            return np.repeat(self.images, len(indices), axis=0)
        return self.images[list(indices)]

    def params(self, index: int) -> dict:
        """What an image records of its condition (the image's fingerprint, not the image)."""
        return {"control": self.fingerprints[0 if len(self.images) == 1 else index], "control_scale": self.scale}
