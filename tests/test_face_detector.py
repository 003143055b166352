"""SCRFD front end: preprocessing vs cv2.dnn.blobFromImage, decoding vs insightface's formulas written out
plainly here, NMS vs cv2.dnn.NMSBoxes, output identification and graph validation, face choice."""
import cv2
import numpy as np
import pytest

from arc2face_rt.errors import InvalidInputError, ModelFormatError, NoFaceError
from arc2face_rt.face.detector import Face, ScrfdDetector, anchor_centers, choose_face, decode, nms, preprocess
from face_fixtures import FakeSession, OUTPUT_NAMES, SIZE, STRIDES, scrfd_outputs, scrfd_session, write_onnx


# ---- preprocessing ----------------------------------------------------------------------------------

def insightface_blob(rgb):
    """insightface SCRFD.detect + forward on the BGR image it would have read with cv2."""
    bgr = rgb[..., ::-1]
    im_ratio = float(bgr.shape[0]) / bgr.shape[1]
    if im_ratio > 1.0:
        new_height = SIZE
        new_width = int(new_height / im_ratio)
    else:
        new_width = SIZE
        new_height = int(new_width * im_ratio)
    det_scale = float(new_height) / bgr.shape[0]
    det_img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    det_img[:new_height, :new_width, :] = cv2.resize(bgr, (new_width, new_height))
    blob = cv2.dnn.blobFromImage(det_img, 1.0 / 128.0, (SIZE, SIZE), (127.5, 127.5, 127.5), swapRB=True)
    return blob, det_scale


@pytest.mark.parametrize("h,w", [(512, 512), (480, 1280), (1000, 333), (97, 211), (700, 640)])
def test_preprocess_matches_insightface_blob(h, w):
    rng = np.random.default_rng(h * w)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # a strong red channel: a channel swap cannot go unnoticed
    blob, scale = preprocess(rgb)
    ref, ref_scale = insightface_blob(rgb)
    assert blob.shape == (1, 3, SIZE, SIZE) and blob.dtype == np.float32
    assert scale == ref_scale
    np.testing.assert_allclose(blob, ref, rtol=0, atol=1e-6)
    assert blob[0, 0, 0, 0] == pytest.approx((255 - 127.5) / 128)   # channel 0 is red: RGB in
    if h != w:
        assert blob[0, :, -1, -1] == pytest.approx(-127.5 / 128)     # bottom-right padding is black


# ---- decode -----------------------------------------------------------------------------------------

def distance2bbox(points, distance):
    x1 = points[:, 0] - distance[:, 0]
    y1 = points[:, 1] - distance[:, 1]
    x2 = points[:, 0] + distance[:, 2]
    y2 = points[:, 1] + distance[:, 3]
    return np.stack([x1, y1, x2, y2], axis=-1)


def distance2kps(points, distance):
    preds = []
    for i in range(0, distance.shape[1], 2):
        px = points[:, i % 2] + distance[:, i]
        py = points[:, i % 2 + 1] + distance[:, i + 1]
        preds.append(px)
        preds.append(py)
    return np.stack(preds, axis=-1)


def insightface_centers(stride):
    height = width = SIZE // stride
    c = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    c = (c * stride).reshape((-1, 2))
    return np.stack([c] * 2, axis=1).reshape((-1, 2))


def test_anchor_centers_match_insightface():
    for s in STRIDES:
        np.testing.assert_array_equal(anchor_centers(SIZE, s), insightface_centers(s))


def test_decode_matches_insightface_formulas():
    rng = np.random.default_rng(1)
    scores, boxes, kps = scrfd_outputs()
    for s in scores:   # distinct scores, so the descending order has no ties to break
        s[:] = (rng.permutation(len(s))[:, None] + 0.5) / len(s)
    dets, kpss = decode(list(zip(scores, boxes, kps)), threshold=0.9)
    ref_s, ref_b, ref_k = [], [], []
    for i, stride in enumerate(STRIDES):
        c = insightface_centers(stride)
        pos = np.where(scores[i] >= 0.9)[0]
        ref_s.append(scores[i][pos])
        ref_b.append(distance2bbox(c, boxes[i] * stride)[pos])
        ref_k.append(distance2kps(c, kps[i] * stride).reshape(-1, 5, 2)[pos])
    ref_s, ref_b, ref_k = np.vstack(ref_s)[:, 0], np.vstack(ref_b), np.vstack(ref_k)
    order = np.argsort(-ref_s, kind="stable")
    assert len(dets) == len(ref_s) > 100
    np.testing.assert_array_equal(dets[:, 4], ref_s[order])
    np.testing.assert_allclose(dets[:, :4], ref_b[order], atol=1e-4)
    np.testing.assert_allclose(kpss, ref_k[order], atol=1e-4)


# ---- NMS --------------------------------------------------------------------------------------------

def iou(a, b, plus=0.0):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + plus)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + plus)
    inter = w * h
    area = lambda r: (r[2] - r[0] + plus) * (r[3] - r[1] + plus)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_opencv_where_plus_one_is_negligible(seed):
    # boxes tens of thousands of pixels wide: the +1 moves IoUs by ~1e-4; skip cases near the threshold
    rng = np.random.default_rng(seed)
    n = 60
    while True:
        xy = rng.uniform(0, 200_000, (n, 2))
        wh = rng.uniform(20_000, 60_000, (n, 2))
        boxes = np.hstack([xy, xy + wh])
        ious = [iou(boxes[i], boxes[j]) for i in range(n) for j in range(i)]
        if min(abs(v - 0.4) for v in ious) > 1e-3:   # no pair on the threshold
            break
    scores = rng.permutation(n) / n + 0.01
    dets = np.hstack([boxes, scores[:, None]]).astype(np.float64)
    ours = nms(dets, 0.4)
    ref = cv2.dnn.NMSBoxes([[float(x), float(y), float(w), float(h)] for (x, y), (w, h) in zip(xy, wh)],
                           scores.tolist(), 0.0, 0.4)
    assert 1 < len(ours) < n
    assert ours == [int(i) for i in np.asarray(ref).ravel()]


def test_nms_plus_one_convention():
    # box B is A shifted down 4.5 px: IoU 0.379 by continuous areas, 0.419 with insightface's +1 areas
    a, b = [0, 0, 10, 10], [0, 4.5, 10, 14.5]
    assert iou(a, b) < 0.4 < iou(a, b, plus=1.0)
    dets = np.array([a + [0.9], b + [0.8]], dtype=np.float32)
    assert nms(dets, 0.4) == [0]                                # +1 areas: B suppressed
    assert list(np.asarray(cv2.dnn.NMSBoxes([[0, 0, 10, 10], [0, 4.5, 10, 10]], [0.9, 0.8], 0.0, 0.4)).ravel()) == [0, 1]
    # a box is suppressed only when IoU is strictly above the threshold
    assert nms(dets, iou(a, b, plus=1.0) + 1e-6) == [0, 1]
    assert nms(np.zeros((0, 5), np.float32)) == []


# ---- the detector around a session ------------------------------------------------------------------

KPS = np.array([-1, -1, 1, -1, 0, 0, -0.8, 1, 0.8, 1], np.float32)


def one_face(blob):
    return [(16, 10, 20, 1, 0.9, [2, 3, 4, 5], KPS)]


def test_detect_rescales_to_original_pixels():
    det = ScrfdDetector(scrfd_session(one_face))
    image = np.zeros((960, 1280, 3), np.uint8)       # → 640x480 on the canvas, det_scale 0.5
    (face,) = det.detect(image)
    # centre (x=20·16, y=10·16) = (320, 160); box = centre ∓ d·16 on the canvas, then / 0.5
    np.testing.assert_allclose(face.box, [(320 - 32) * 2, (160 - 48) * 2, (320 + 64) * 2, (160 + 80) * 2])
    np.testing.assert_allclose(face.kps, ((np.tile([320, 160], 5) + KPS * 16) * 2).reshape(5, 2), atol=1e-4)
    assert face.score == pytest.approx(0.9)


@pytest.mark.parametrize("batched", [False, True])
def test_outputs_identified_by_shape_not_order(batched):
    image = np.zeros((400, 300, 3), np.uint8)
    ref = ScrfdDetector(scrfd_session(one_face)).detect(image)
    order = list(np.random.default_rng(0).permutation(9))
    got = ScrfdDetector(scrfd_session(one_face, order=order, batched=batched)).detect(image)
    assert len(got) == len(ref) == 1
    np.testing.assert_array_equal(got[0].box, ref[0].box)
    np.testing.assert_array_equal(got[0].kps, ref[0].kps)


def test_nms_and_threshold_inside_detect():
    def hits(blob):
        return [(8, 30, 30, 0, 0.8, [3, 3, 3, 3], KPS), (8, 30, 30, 1, 0.7, [3, 3, 3, 3.2], KPS),  # overlap
                (32, 15, 5, 0, 0.6, [2, 2, 2, 2], KPS), (32, 2, 2, 0, 0.45, [1, 1, 1, 1], KPS)]
    det = ScrfdDetector(scrfd_session(hits))
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert [f.score for f in det.detect(image)] == pytest.approx([0.8, 0.6])
    assert [f.score for f in det.detect(image, score_threshold=0.4)] == pytest.approx([0.8, 0.6, 0.45])
    assert ScrfdDetector(scrfd_session(hits), score_threshold=0.75).detect(image)[0].score == pytest.approx(0.8)


def test_detector_rejects_bad_image():
    with pytest.raises(InvalidInputError, match="uint8 RGB"):
        ScrfdDetector(scrfd_session(one_face)).detect(np.zeros((10, 10), np.uint8))


def test_six_output_graph_refused_with_hint():
    sess = FakeSession(lambda f: {}, output_names=OUTPUT_NAMES[:6])
    with pytest.raises(ModelFormatError, match="6 outputs: an SCRFD without keypoints") as e:
        ScrfdDetector(sess)
    assert "expected 1 input [1,3,640,640] and 9 outputs" in str(e.value)


def test_wrong_output_shapes_refused():
    def fn(feeds):
        return {n: np.zeros((100, 4), np.float32) for n in OUTPUT_NAMES}
    with pytest.raises(ModelFormatError, match=r"expected .*\[12800,1\].*found .*\[100, 4\]"):
        ScrfdDetector(FakeSession(fn, output_names=OUTPUT_NAMES)).detect(np.zeros((64, 64, 3), np.uint8))


def _identity_nodes(n_out):
    from onnx import helper
    return [helper.make_node("Identity", ["input.1"], [f"o{i}"], name=f"id{i}") for i in range(n_out)]


def test_onnx_detector_with_unexpected_inputs_refused(tmp_path):
    # a real ONNX file (an ArcFace-shaped graph passed as --detector): input 112x112, 1 output
    p = write_onnx(tmp_path / "wrong.onnx", _identity_nodes(1), [("input.1", (1, 3, 112, 112))],
                   [("o0", (1, 3, 112, 112))])
    with pytest.raises(ModelFormatError) as e:
        ScrfdDetector.from_file(p, device="cpu")
    msg = str(e.value)
    assert "expected 1 input [1,3,640,640] and 9 outputs" in msg and "[1, 3, 112, 112]" in msg and "1 outputs" in msg
    # two inputs
    from onnx import helper
    nodes = [helper.make_node("Add", ["a", "b"], [f"o{i}"], name=f"n{i}") for i in range(9)]
    p = write_onnx(tmp_path / "two.onnx", nodes, [("a", (1, 3, 640, 640)), ("b", (1, 3, 640, 640))],
                   [(f"o{i}", (1, 3, 640, 640)) for i in range(9)])
    with pytest.raises(ModelFormatError, match=r"found inputs \['a', 'b'\]"):
        ScrfdDetector.from_file(p, device="cpu")


def test_missing_detector_file_names_the_download(tmp_path):
    from arc2face_rt.errors import MissingWeightsError
    with pytest.raises(MissingWeightsError, match="antelopev2"):
        ScrfdDetector.from_file(tmp_path / "scrfd_10g_bnkps.onnx")
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(b"\x08\x08garbage")
    with pytest.raises(MissingWeightsError, match="not a loadable ONNX file"):
        ScrfdDetector.from_file(bad, device="cpu")


# ---- the whole detector vs insightface's SCRFD.detect, written out plainly ---------------------------

def insightface_nms(dets, thresh=0.4):
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr <= thresh)[0]
        order = order[inds + 1]
    return keep


def insightface_detect(net_outs, det_scale, threshold=0.5):
    """insightface SCRFD.forward + SCRFD.detect after the network (net_outs in the graph's output order)."""
    scores_list, bboxes_list, kpss_list = [], [], []
    for idx, stride in enumerate(STRIDES):
        scores = net_outs[idx]
        bbox_preds = net_outs[idx + 3] * stride
        kps_preds = net_outs[idx + 6] * stride
        anchor_centers = insightface_centers(stride)
        pos_inds = np.where(scores >= threshold)[0]
        bboxes = distance2bbox(anchor_centers, bbox_preds)
        scores_list.append(scores[pos_inds])
        bboxes_list.append(bboxes[pos_inds])
        kpss = distance2kps(anchor_centers, kps_preds).reshape((-1, 5, 2))
        kpss_list.append(kpss[pos_inds])
    scores = np.vstack(scores_list)
    order = scores.ravel().argsort()[::-1]
    bboxes = np.vstack(bboxes_list) / det_scale
    kpss = np.vstack(kpss_list) / det_scale
    pre_det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)[order, :]
    keep = insightface_nms(pre_det)
    return pre_det[keep, :], kpss[order, :, :][keep, :, :]


def crowd(blob):
    """Clusters of overlapping hits with distinct scores, at all strides."""
    rng = np.random.default_rng(7)
    hits, scores = [], rng.permutation(300) / 600 + 0.4
    for k in range(300):
        s = STRIDES[k % 3]
        n = SIZE // s
        cy, cx = rng.integers(n // 4, n // 2, 2)
        d = rng.uniform(1, 4, 4) * 8 / s
        hits.append((s, int(cy), int(cx), int(k % 2), float(scores[k]), d, rng.uniform(-2, 2, 10)))
    return hits


@pytest.mark.parametrize("h,w", [(640, 640), (2560, 1800), (160, 200), (333, 1000)])
def test_detector_matches_insightface_detect(h, w):
    image = np.zeros((h, w, 3), np.uint8)
    faces = ScrfdDetector(scrfd_session(crowd)).detect(image)
    _, det_scale = preprocess(image)
    s, b, k = scrfd_outputs(crowd(None))
    ref_det, ref_kps = insightface_detect(s + b + k, det_scale)
    assert 3 < len(faces) == len(ref_det)
    np.testing.assert_allclose(np.array([f.box for f in faces]), ref_det[:, :4], rtol=1e-6)
    np.testing.assert_allclose(np.array([f.score for f in faces]), ref_det[:, 4])
    np.testing.assert_allclose(np.array([f.kps for f in faces]), ref_kps, rtol=1e-5, atol=1e-4)


def test_nms_runs_in_image_pixels():
    # on the canvas the two boxes overlap with IoU(+1) 0.419 (> 0.4); in a 4x larger photo, 0.390 (kept)
    def hits(blob):
        return [(8, 10, 10, 0, 0.9, np.array([5, 5, 5, 5]) / 8, KPS),
                (8, 10, 10, 1, 0.8, np.array([5, 0.5, 5, 9.5]) / 8, KPS)]
    det = ScrfdDetector(scrfd_session(hits))
    assert len(det.detect(np.zeros((SIZE, SIZE, 3), np.uint8))) == 1
    assert len(det.detect(np.zeros((4 * SIZE, 4 * SIZE, 3), np.uint8))) == 2


# ---- face choice ------------------------------------------------------------------------------------

def face(x1, y1, x2, y2, score=0.9):
    return Face(np.array([x1, y1, x2, y2], np.float32), score, np.zeros((5, 2), np.float32))


def test_largest_face_like_arc2face():
    faces = [face(0, 0, 50, 50, 0.99), face(100, 100, 200, 180, 0.8), face(300, 0, 380, 100, 0.7)]
    # Arc2Face: sorted(faces, key=lambda x: (x.bbox[2]-x.bbox[0])*(x.bbox[3]-x.bbox[1]))[-1]
    ref = sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))[-1]
    chosen, n = choose_face(faces)
    assert chosen is ref and n == 3
    tie = [face(0, 0, 10, 10, 0.9), face(20, 0, 30, 10, 0.8)]
    assert choose_face(tie)[0] is sorted(tie, key=lambda f: f.area)[-1]


def test_face_by_index_and_min_size():
    faces = [face(0, 0, 20, 20, 0.99), face(100, 100, 200, 180, 0.8), face(300, 0, 380, 100, 0.7)]
    assert choose_face(faces, 0)[0] is faces[0]
    assert choose_face(faces, -1)[0] is faces[2]
    chosen, n = choose_face(faces, 0, min_size=50)      # the 20 px face no longer counts
    assert chosen is faces[1] and n == 2
    with pytest.raises(InvalidInputError, match="face index 3 but only 3"):
        choose_face(faces, 3, name="x.jpg")
    with pytest.raises(InvalidInputError):
        choose_face(faces, "biggest")


def test_no_face_and_too_small():
    with pytest.raises(NoFaceError, match="x.jpg: no face found"):
        choose_face([], name="x.jpg")
    with pytest.raises(NoFaceError, match=r"2 face\(s\) found but all smaller than 100 px \(largest 80x60\)"):
        choose_face([face(0, 0, 80, 60), face(0, 0, 10, 10)], min_size=100)


def test_several_faces_flagged_through_detector():
    def hits(blob):
        return [(32, 5, 5, 0, 0.9, [2, 2, 2, 2], KPS), (32, 12, 12, 0, 0.8, [3, 3, 3, 3], KPS)]
    faces = ScrfdDetector(scrfd_session(hits)).detect(np.zeros((SIZE, SIZE, 3), np.uint8))
    chosen, n = choose_face(faces)
    assert n == 2 and chosen is faces[1]
