"""Render an example ControlNet pose condition: the normal map of a shaded ellipsoid head.

Arc2Face's pose ControlNet is conditioned on a normal-map rendering of a 3D face (the official demo
reconstructs it with EMOCA from a photo; README "ControlNet pose"). This script stands in for that
without EMOCA: an ellipsoid head with an ellipsoid nose, turned by --yaw/--pitch, rendered
orthographically at 512x512 with each visible surface normal n (camera space, x right, y up, z
towards the camera) stored as RGB = round((n + 1) / 2 * 255), on a black background. It is only
an illustration of the input's form; a real rendering of a face gives the model far more to go on.

    python examples/pose_normal_map.py --yaw 30 --out examples/pose_yaw30.png

Needs numpy and pillow only.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from PIL import Image

SIZE = 512
# (centre xyz, semi-axes xyz) in head units; the head spans about [-1, 1] vertically
HEAD = (np.array([0.0, 0.0, 0.0]), np.array([0.72, 0.95, 0.82]))
NOSE = (np.array([0.0, -0.08, 0.80]), np.array([0.11, 0.22, 0.16]))


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    return ry @ rx


def _hit(ellipsoid, rot, px, py):
    """Depth z and camera-space unit normal where the ray (px, py, +inf -> -inf) meets the rotated
    ellipsoid (front surface), or z = -inf where it misses. px, py: [H, W]."""
    centre, axes = ellipsoid
    inv = rot.T                                        # camera -> model
    c = rot @ centre
    o = np.stack([px - c[0], py - c[1], np.zeros_like(px) - c[2]], -1) @ inv.T   # ray origin in model space
    d = np.array([0.0, 0.0, -1.0]) @ inv.T                                        # ray direction (towards -z)
    o_s, d_s = o / axes, d / axes
    a = float(d_s @ d_s)
    b = 2 * (o_s @ d_s)
    cc = (o_s ** 2).sum(-1) - 1
    disc = b * b - 4 * a * cc
    hit = disc >= 0
    t = np.where(hit, (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a), 0.0)   # nearest: largest camera z
    p_model = o + t[..., None] * d
    n_model = p_model / axes ** 2
    n = n_model @ rot.T
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    n[~hit] = 0
    z = np.where(hit, c[2] - t, -np.inf)
    return z, n


def render(yaw: float = 0.0, pitch: float = 0.0, size: int = SIZE) -> np.ndarray:
    """[size, size, 3] uint8 normal map of the ellipsoid head turned by yaw/pitch (degrees)."""
    rot = _rotation(yaw, pitch)
    lin = (np.arange(size) + 0.5) / size * 2.4 - 1.2
    px, py = np.meshgrid(lin, -lin)                    # image rows go down, y goes up
    z_head, n_head = _hit(HEAD, rot, px, py)
    z_nose, n_nose = _hit(NOSE, rot, px, py)
    nose_front = z_nose > z_head
    n = np.where(nose_front[..., None], n_nose, n_head)
    seen = np.isfinite(np.maximum(z_head, z_nose))
    rgb = np.round((n + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
    rgb[~seen] = 0
    return rgb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yaw", type=float, default=30.0, help="degrees, positive turns the face to its left")
    ap.add_argument("--pitch", type=float, default=0.0, help="degrees, positive tilts the face up")
    ap.add_argument("--out", default="pose.png")
    args = ap.parse_args()
    Image.fromarray(render(args.yaw, args.pitch)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
