"""5-point alignment against scikit-image's SimilarityTransform (what insightface's norm_crop uses)."""
import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from arc2face_rt.errors import NoFaceError
from arc2face_rt.face.align import ARCFACE_TEMPLATE, align_face, align_matrix, template, umeyama
from face_fixtures import astronaut


def skimage_matrix(src, dst):
    if hasattr(SimilarityTransform, "from_estimate"):      # scikit-image ≥ 0.26
        return SimilarityTransform.from_estimate(src, dst).params
    t = SimilarityTransform()
    assert t.estimate(src, dst)
    return t.params


def keypoint_sets(n=40, seed=0):
    """Face-like keypoints: the template moved by random similarities, plus noise; some mirrored."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        a, s = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 8)
        r = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = ARCFACE_TEMPLATE.astype(np.float64) @ r.T + rng.uniform(-500, 1500, 2)
        pts += rng.normal(0, 3 * s, pts.shape)
        if k % 4 == 3:
            pts[:, 0] *= -1          # a reflection: the best similarity must still be a proper rotation
        yield pts


def test_umeyama_matches_skimage():
    for src in keypoint_sets():
        ours = umeyama(src, ARCFACE_TEMPLATE)
        ref = skimage_matrix(src, ARCFACE_TEMPLATE.astype(np.float64))
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
        assert np.linalg.det(ours[:2, :2]) > 0


def test_umeyama_collinear_points_match_skimage():
    src = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], np.float64)
    np.testing.assert_allclose(umeyama(src, ARCFACE_TEMPLATE), skimage_matrix(src, ARCFACE_TEMPLATE.astype(np.float64)),
                               atol=1e-9)


def test_degenerate_keypoints():
    with pytest.raises(NoFaceError, match="coincide"):
        umeyama(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_exact_similarity_recovered():
    a, s, t = 0.3, 2.5, np.array([40.0, -7.0])
    m = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    src = (ARCFACE_TEMPLATE - t) @ np.linalg.inv(m).T     # so that m @ src + t == template
    np.testing.assert_allclose(align_matrix(src), np.hstack([m, t[:, None]]), atol=1e-9)


def test_align_face_is_insightface_norm_crop():
    img = astronaut()
    kps = np.array([[185, 100], [247, 104], [218, 135], [190, 160], [240, 163]], np.float32)
    crop = align_face(img, kps)
    m = skimage_matrix(kps.astype(np.float64), ARCFACE_TEMPLATE.astype(np.float64))[:2]
    ref = cv2.warpAffine(img, m, (112, 112), borderValue=0.0)   # insightface face_align.norm_crop
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, ref)


def test_border_is_black():
    img = np.full((50, 50, 3), 200, np.uint8)
    kps = ARCFACE_TEMPLATE + 30    # crop pixel p samples image pixel p + 30: beyond 50 is outside
    crop = align_face(img, kps)
    assert crop[-1, -1].tolist() == [0, 0, 0] and crop[0, 0].tolist() == [200, 200, 200]


def test_template_sizes_like_insightface_estimate_norm():
    for size in (112, 224, 128, 256):
        ratio = size / 112.0 if size % 112 == 0 else size / 128.0
        diff_x = 0.0 if size % 112 == 0 else 8.0 * ratio
        ref = ARCFACE_TEMPLATE * ratio
        ref[:, 0] += diff_x
        np.testing.assert_allclose(template(size), ref, rtol=1e-6)
