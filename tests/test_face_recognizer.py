"""ArcFace recognizer: input convention read from the graph (on hand-made ONNX graphs, run by onnxruntime),
the protobuf node reader vs the `onnx` package, L2 normalisation, graph validation, identities, batches."""
import numpy as np
import onnx
import pytest
from PIL import Image

from arc2face_rt.errors import InvalidInputError, MissingWeightsError, ModelFormatError, NoFaceError
from arc2face_rt.face._onnx import first_nodes
from arc2face_rt.face.detector import ScrfdDetector
from arc2face_rt.face.identity import combine_embeddings, embed_images
from arc2face_rt.face.recognizer import ArcFaceRecognizer, graph_normalises, l2_normalize
from face_fixtures import FakeSession, astronaut, recognizer_graph, scrfd_session, write_onnx

W = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)


def crops(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def expected_raw(c, mean, std):
    """What the toy graphs compute, in float64: mean over H, W of the normalised input, times W."""
    x = (c.astype(np.float64) - mean) / std
    return x.mean(axis=(1, 2)) @ W.astype(np.float64)


@pytest.mark.parametrize("normalising", [True, False])
def test_convention_detected_from_graph_head(tmp_path, normalising):
    p = recognizer_graph(tmp_path / "r.onnx", normalising, W)
    rec = ArcFaceRecognizer.from_file(p, device="cpu")
    assert rec.graph_normalises is normalising
    assert (rec.input_mean, rec.input_std) == ((0.0, 1.0) if normalising else (127.5, 127.5))
    assert ("raw" in rec.convention) is normalising
    c = crops()
    # either way the graph sees (x − 127.5)/127.5 once: the normalising graph does it itself
    ref = expected_raw(c, 127.5, 127.5)
    np.testing.assert_allclose(rec.embed_raw(c), ref, rtol=1e-4, atol=1e-5)
    emb = rec.embed(c)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("sub,mul,expected", [("Sub_0", "Mul_1", True), ("_minusscalar0", "_mulscalar0", True),
                                              ("norm/sub", "norm/mul", False), ("Sub_0", "scale", False)])
def test_insightface_rule_matches_node_names(tmp_path, sub, mul, expected):
    # insightface looks at node names (MXNet-converted models), not op types; so do we
    p = recognizer_graph(tmp_path / "r.onnx", True, W, sub_name=sub, mul_name=mul)
    assert ArcFaceRecognizer.from_file(p, device="cpu").graph_normalises is expected


def test_only_first_eight_nodes_count():
    head = [(f"Conv_{i}", "Conv") for i in range(8)]
    assert graph_normalises([("Sub_0", "Sub"), ("Mul_1", "Mul")] + head)
    assert not graph_normalises(head + [("Sub_0", "Sub"), ("Mul_1", "Mul")])


def test_first_nodes_match_onnx_package(tmp_path):
    p = recognizer_graph(tmp_path / "r.onnx", True, W)
    ref = [(n.name, n.op_type) for n in onnx.load(str(p)).graph.node]
    assert first_nodes(p, 8) == ref[:8] and first_nodes(p, 2) == ref[:2]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ModelFormatError, match="not a readable ONNX model"):
        first_nodes(bad)


def test_l2_normalize():
    x = np.random.default_rng(1).normal(size=(4, 512)).astype(np.float32) * 50
    np.testing.assert_allclose(l2_normalize(x), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    assert np.all(l2_normalize(np.zeros(512)) == 0)


def test_fixed_batch_graph_runs_one_crop_at_a_time(tmp_path):
    p = recognizer_graph(tmp_path / "r1.onnx", False, W, in_shape=(1, 3, 112, 112))
    rec = ArcFaceRecognizer.from_file(p, device="cpu")
    c = crops(3)
    np.testing.assert_allclose(rec.embed_raw(c), expected_raw(c, 127.5, 127.5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec.embed(c[0]), rec.embed(c[:1]))


def test_unexpected_recognizer_graphs_refused(tmp_path):
    p = recognizer_graph(tmp_path / "r128.onnx", False, W, in_shape=("N", 3, 128, 128))
    with pytest.raises(ModelFormatError, match=r"expected 1 input \[N,3,112,112\].*found inputs \['input.1'\] "
                                               r"with shape \[None, 3, 128, 128\]"):
        ArcFaceRecognizer.from_file(p, device="cpu")
    p = recognizer_graph(tmp_path / "r128d.onnx", False, W[:, :128], out_dim=128)
    rec = ArcFaceRecognizer.from_file(p, device="cpu")
    with pytest.raises(ModelFormatError, match=r"first output has shape \[2, 128\]"):
        rec.embed(crops(2))
    from onnx import helper
    p = write_onnx(tmp_path / "two.onnx", [helper.make_node("Add", ["a", "b"], ["o"], name="add")],
                   [("a", (1, 3, 112, 112)), ("b", (1, 3, 112, 112))], [("o", (1, 3, 112, 112))])
    with pytest.raises(ModelFormatError, match=r"found inputs \['a', 'b'\]"):
        ArcFaceRecognizer.from_file(p, device="cpu")
    with pytest.raises(MissingWeightsError, match="FoivosPar/Arc2Face"):
        ArcFaceRecognizer.from_file(tmp_path / "arcface.onnx")
    with pytest.raises(InvalidInputError, match="aligned"):
        rec.embed(np.zeros((2, 100, 100, 3), np.uint8))


# ---- identities from several photos -----------------------------------------------------------------

def test_combine_mean_and_median():
    rng = np.random.default_rng(2)
    e = rng.normal(size=(5, 512)).astype(np.float32) * rng.uniform(0.5, 20, (5, 1)).astype(np.float32)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    ident = combine_embeddings(e)
    m = u.mean(0)
    np.testing.assert_allclose(ident.embedding, m / np.linalg.norm(m), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ident.cosines, u @ ident.embedding, rtol=1e-5)
    med = np.median(u, 0)
    np.testing.assert_allclose(combine_embeddings(e, "median").embedding, med / np.linalg.norm(med), atol=1e-6)
    assert ident.embedding.dtype == np.float32 and ident.embedding.shape == (512,)
    one = combine_embeddings(e[0])
    np.testing.assert_allclose(one.embedding, u[0], atol=1e-6)
    np.testing.assert_allclose(one.cosines, [1.0], rtol=1e-6)
    with pytest.raises(InvalidInputError, match="mean' or 'median"):
        combine_embeddings(e, "mode")
    with pytest.raises(NoFaceError):
        combine_embeddings(np.zeros((0, 512), np.float32))


def test_folder_batch_skips_and_reports_bad_files(tmp_path):
    img = astronaut()[::2, ::2].copy()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[:, ::-1].copy()).save(tmp_path / "b.jpg")
    Image.fromarray(np.zeros_like(img)).save(tmp_path / "black.png")      # the fake detector finds no face here
    (tmp_path / "c.jpg").write_text("not an image")
    kps = np.array([-1, -1, 1, -1, 0, 0, -0.8, 1, 0.8, 1], np.float32)

    def hits(blob):  # one face, except in an all-black picture
        return [] if np.all(blob == blob.flat[0]) else [(32, 10, 10, 0, 0.9, [3, 3, 3, 3], kps)]

    rec = ArcFaceRecognizer(FakeSession(lambda f: {"emb": f["x"].mean(axis=(2, 3)) @ W}, input_names=["x"],
                                        output_names=["emb"]), graph_normalises=False)
    paths = sorted(tmp_path.iterdir())
    report = embed_images(paths, ScrfdDetector(scrfd_session(hits)), rec)
    assert [r.path.name for r in report.results] == ["a.png", "b.jpg", "black.png", "c.jpg"]
    assert report.n_ok == 2 and [r.path.name for r in report.succeeded] == ["a.png", "b.jpg"]
    failed = {r.path.name: r for r in report.failed}
    assert failed["black.png"].error_type == "NoFaceError" and "no face found" in failed["black.png"].error
    assert failed["c.jpg"].error_type == "ImageDecodeError" and "not an image" in failed["c.jpg"].error
    assert report.embeddings().shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(report.embeddings(), axis=1), 1.0, rtol=1e-6)
    assert all(r.n_faces == 1 and r.face is not None for r in report.succeeded)
