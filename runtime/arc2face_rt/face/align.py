"""5-point similarity alignment to the ArcFace 112x112 template (insightface `face_align.norm_crop`).

insightface estimates the transform with skimage's SimilarityTransform.estimate, which is Umeyama's
least-squares similarity (no RANSAC); we compute the same closed form in numpy (skimage is not a
runtime dependency) and warp with cv2.warpAffine (bilinear, constant border 0), as insightface does.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import NoFaceError

# Left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop (insightface arcface_dst).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
CROP_SIZE = 112


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src → dst.

    src, dst: [N, 2]. Returns the [3, 3] homogeneous matrix T with dst ≈ T @ [src; 1].
    Umeyama 1991, "Least-squares estimation of transformation parameters between two point patterns",
    eqs. (34)-(43) in 2-D."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_s, dst - mu_d
    var_s = (src_c ** 2).sum() / n                       # σ²_x, eq. (36)
    if not np.isfinite(var_s) or var_s <= 1e-12:
        raise NoFaceError("the 5 face keypoints coincide; this detection cannot be aligned")
    cov = dst_c.T @ src_c / n                            # Σ_xy, eq. (38)
    u, sv, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:                           # eq. (39): forbid a reflection
        d[-1] = -1.0
    if np.linalg.matrix_rank(cov) == 1:                  # eq. (43): collinear points
        d = np.ones(2) if np.linalg.det(u) * np.linalg.det(vt) > 0 else np.array([1.0, -1.0])
    rot = u @ np.diag(d) @ vt                            # eq. (40)
    scale = (sv * d).sum() / var_s                       # eq. (42)
    t = np.eye(3)
    t[:2, :2] = scale * rot
    t[:2, 2] = mu_d - scale * rot @ mu_s                 # eq. (41)
    return t


def template(size: int = CROP_SIZE) -> np.ndarray:
    """The 5-point template for a `size` crop, scaled as insightface's estimate_norm does."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    ratio = size / 128.0
    return ARCFACE_TEMPLATE * ratio + np.float32(8.0 * ratio) * np.array([1, 0], np.float32)


def align_matrix(kps: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """[2, 3] affine matrix taking image pixels to the aligned crop. kps: [5, 2] (x, y)."""
    return umeyama(np.asarray(kps, np.float64).reshape(5, 2), template(size))[:2]


def align_face(image: np.ndarray, kps: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Crop the face with keypoints `kps` [5, 2] out of `image` [H, W, 3] → [size, size, 3], same dtype."""
    m = align_matrix(kps, size)
    return cv2.warpAffine(image, m, (size, size), borderValue=0.0)
