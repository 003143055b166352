"""Command-line flags shared by every command that reads photos (`arc2face-rt embed`, `score`,
`generate --image/--control-image`, `arc2face-train prepare`), and what they set."""
from __future__ import annotations

from .. import argtypes
from .image_io import DEFAULT_LIMITS, ImageLimits


def add_max_pixels(p) -> None:
    """`--max-pixels N` on the parser `p`."""
    p.add_argument("--max-pixels", type=argtypes.count(1, name="a pixel count"), default=DEFAULT_LIMITS.max_pixels,
                   metavar="N",
                   help=f"refuse images with more than N pixels, checked before decoding "
                        f"(default {DEFAULT_LIMITS.max_pixels / 1e6:g}e6)")


def limits_from(args) -> ImageLimits:
    """The image limits a command's --max-pixels sets."""
    return ImageLimits(max_bytes=DEFAULT_LIMITS.max_bytes, max_pixels=args.max_pixels)
