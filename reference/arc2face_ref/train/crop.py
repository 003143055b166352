"""The training view: a fixed similarity crop of the face, framed as Arc2Face's outputs are (FFHQ style).

Arc2Face was fine-tuned on FFHQ and CelebA-HQ, whose 1024² images are aligned by FFHQ's recipe
(NVlabs/ffhq-dataset `recreate_aligned_images`): with e = eye midpoint, m = mouth midpoint,
    centre = e + 0.1·(m − e),   side = 2·max(2.0·|eye-to-eye|, 1.8·|m − e|),
upright square. We apply that recipe once to the ArcFace 5-point template (the same face shape every
aligned crop has), which gives a fixed square in template coordinates; the crop of a photo is then the
least-squares similarity (Umeyama, as for the 112x112 ArcFace crop) from its 5 detected keypoints to
the template placed in that square, so every photo is framed identically. Pixels outside the photo
are filled by reflection (FFHQ pads by reflection too, and then blurs; we do not blur).
"""
from __future__ import annotations

import cv2
import numpy as np

from arc2face_rt.face.align import ARCFACE_TEMPLATE, umeyama

TRAIN_SIZE = 512


def _ffhq_square(tpl: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre [2], side) of FFHQ's crop square for 5 points (left eye, right eye, nose, mouth l/r)."""
    eye_l, eye_r, mouth = tpl[0], tpl[1], (tpl[3] + tpl[4]) / 2
    eye = (eye_l + eye_r) / 2
    eye_to_mouth = mouth - eye
    side = 2 * max(2.0 * np.linalg.norm(eye_r - eye_l), 1.8 * np.linalg.norm(eye_to_mouth))
    return eye + 0.1 * eye_to_mouth, float(side)


def train_template(size: int = TRAIN_SIZE) -> np.ndarray:
    """The 5 keypoints' places in a size x size training crop. [5, 2]"""
    tpl = ARCFACE_TEMPLATE.astype(np.float64)
    centre, side = _ffhq_square(tpl)
    return (tpl - centre) * (size / side) + size / 2


def train_crop(image: np.ndarray, kps: np.ndarray, size: int = TRAIN_SIZE) -> np.ndarray:
    """image [H, W, 3] uint8 RGB, kps [5, 2] (x, y) -> the training view [size, size, 3] uint8 RGB."""
    kps = np.asarray(kps, np.float64).reshape(5, 2)
    scale = np.sqrt(abs(np.linalg.det(umeyama(kps, train_template(size))[:2, :2])))
    if scale < 0.5:         # a large photo: shrink by area averaging first (warpAffine would alias)
        h, w = image.shape[:2]
        nw, nh = max(1, round(w * scale * 1.5)), max(1, round(h * scale * 1.5))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        kps = kps * np.array([nw / w, nh / h])
    m = umeyama(kps, train_template(size))[:2]
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
