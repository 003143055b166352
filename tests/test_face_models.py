"""Random-weight face models (reference/arc2face_ref/face_models.py): the real files' I/O layout, checked
with the `onnx` package; onnxruntime vs torch parity; the runtime front end on them, end to end."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from arc2face_ref.face_models import RandomScrfd, build_detector, build_recognizer, write_face_models
from arc2face_ref.iresnet import IBasicBlock, iresnet100
from arc2face_rt.face import ArcFaceRecognizer, ScrfdDetector, align_face, choose_face
from face_fixtures import astronaut, tiny_models_dir


def shape_of(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_detector_has_scrfd_layout():
    m = onnx.load(str(tiny_models_dir() / "scrfd_10g_bnkps.onnx"))
    assert m.ir_version <= 10 and m.opset_import[0].version == 17
    assert [(i.name, shape_of(i)) for i in m.graph.input] == [("input.1", [1, 3, 640, 640])]
    n = {8: 12800, 16: 3200, 32: 800}
    want = [[n[s], c] for c in (1, 4, 10) for s in (8, 16, 32)]
    assert [shape_of(o) for o in m.graph.output] == want


def test_recognizer_layout_and_convention():
    p = tiny_models_dir() / "arcface.onnx"
    m = onnx.load(str(p))
    assert m.ir_version <= 10
    assert [shape_of(i) for i in m.graph.input] == [["N", 3, 112, 112]]
    assert [shape_of(o) for o in m.graph.output] == [["N", 512]]
    rec = ArcFaceRecognizer.from_file(p, device="cpu")
    assert rec.graph_normalises is False and rec.input_mean == 127.5   # a torch export: Conv first


def _ort(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def test_onnx_matches_torch():
    gen = torch.Generator().manual_seed(0)      # the input must not depend on what this worker ran before
    x = torch.rand(1, 3, 640, 640, generator=gen) * 2 - 1
    with torch.no_grad():
        ref = build_detector(0)(x)
    got = _ort(tiny_models_dir() / "scrfd_10g_bnkps.onnx", {"input.1": x.numpy()})
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)
    x = torch.rand(3, 3, 112, 112, generator=gen) * 2 - 1
    with torch.no_grad():
        ref = build_recognizer(0)(x).numpy()
    got = _ort(tiny_models_dir() / "arcface.onnx", {"input.1": x.numpy()})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_seeded():
    a, b, c = (build_recognizer(s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    with pytest.raises(ValueError, match="tiny' or 'full"):
        write_face_models("/nonexistent", size="huge")


@pytest.mark.parametrize("image_name", ["astronaut", "chelsea"])
def test_random_detector_fires_once_near_the_centre(image_name):
    import skimage.data
    img = getattr(skimage.data, image_name)()
    det = ScrfdDetector.from_file(tiny_models_dir() / "scrfd_10g_bnkps.onnx", device="cpu")
    faces = det.detect(img)
    assert len(faces) == 1 and faces[0].score > 0.9           # it is random: it "finds" a face in a cat too
    face, n = choose_face(faces)
    scale = max(img.shape[:2]) / 640
    np.testing.assert_allclose(face.box, np.array([208, 208, 432, 464]) * scale, rtol=0.1)
    crop = align_face(img, face.kps)
    rec = ArcFaceRecognizer.from_file(tiny_models_dir() / "arcface.onnx", device="cpu")
    emb = rec.embed(crop)
    assert emb.shape == (1, 512) and abs(np.linalg.norm(emb) - 1) < 1e-5


def test_iresnet100_architecture():
    m = iresnet100()
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 13, 30, 3]
    assert all(isinstance(b, IBasicBlock) for i in range(1, 5) for b in getattr(m, f"layer{i}"))
    assert m.fc.in_features == 512 * 7 * 7 and m.fc.out_features == 512
    assert sum(p.numel() for p in m.parameters()) == 65_156_160      # insightface's r100: 65.2 M
    keys = set(m.state_dict())   # insightface arcface_torch checkpoint names
    for k in ["conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
              "layer1.0.bn2.weight", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean", "layer3.29.conv2.weight",
              "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_var"]:
        assert k in keys


@pytest.mark.slow
def test_full_size_models_load_and_run(tmp_path):
    paths = write_face_models(tmp_path, seed=0, size="full")
    assert paths["recognizer"].stat().st_size > 200e6
    out = _ort(paths["recognizer"], {"input.1": np.random.rand(1, 3, 112, 112).astype(np.float32) * 2 - 1})[0]
    assert out.shape == (1, 512) and np.all(np.isfinite(out))
    det = ScrfdDetector.from_file(paths["detector"], device="cpu")
    assert len(det.detect(astronaut())) == 1
    assert isinstance(build_detector(0, "full"), RandomScrfd)
