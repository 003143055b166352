"""Property-based fuzzing of the three parsers that read untrusted files: the engines manifest, the
identity .npy and the image decoder. Random and mutated inputs may be accepted, or refused with the
project's own error type; anything else (a KeyError, a MemoryError, a hang) is a bug."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from arc2face_rt.errors import Arc2FaceError, EngineMismatchError, ImageDecodeError, InvalidInputError
from arc2face_rt.face.image_io import ImageLimits, decode_image
from arc2face_rt.manifest import QUANT_SECTIONS, check_manifest, load_manifest
from arc2face_rt.npyio import read_npy
from arc2face_rt.pipeline import load_identity

# CI runs a fixed (derandomised) 150 examples per test; ARC2FACE_FUZZ_EXAMPLES=N runs N random ones.
_EXAMPLES = os.environ.get("ARC2FACE_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 150), deadline=None, derandomize=not _EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


@pytest.fixture(scope="module")
def good_manifest(tiny_engines):
    return json.loads((tiny_engines / "manifest.json").read_text())


def _mutate(obj, path_choice: int, value):
    """Replace one node (chosen by index over a walk of the tree) with `value`."""
    nodes = []

    def walk(o):
        if isinstance(o, dict):
            for k in list(o):
                nodes.append((o, k))
                walk(o[k])
        elif isinstance(o, list):
            for i in range(len(o)):
                nodes.append((o, i))
                walk(o[i])
    walk(obj)
    if nodes:
        parent, key = nodes[path_choice % len(nodes)]
        parent[key] = value
    return obj


@FUZZ
@given(value=json_values)
def test_manifest_random_json(value, tmp_path):
    try:
        check_manifest(value, tmp_path)
    except EngineMismatchError:
        pass


@FUZZ
@given(choice=st.integers(0, 10**6), value=json_values)
def test_manifest_mutated(good_manifest, tiny_engines, choice, value):
    m = _mutate(json.loads(json.dumps(good_manifest)), choice, value)
    try:
        check_manifest(m, tiny_engines)
    except EngineMismatchError:
        return
    # accepted: every record the runtime reads must then be usable without a KeyError/TypeError
    from arc2face_rt.manifest import record_files, stage_file
    for section in ("stages", "face_stages", "plans", *QUANT_SECTIONS.values()):
        for rec in m.get(section, {}).values():
            files = record_files(rec)
            assert all(isinstance(r["bytes"], int) and isinstance(r["sha256"], str) for r in files.values())
            if section != "plans":
                assert stage_file(rec) in files


_FILE = {"sha256": "0" * 64, "bytes": 1}
_IO = {"inputs": [["x", "float32", ["B", 3, 112, 112]]], "outputs": [["y", "float32", ["B", 512]]]}


@FUZZ
@given(choice=st.integers(0, 10**6), value=json_values)
def test_manifest_mutated_build_records(good_manifest, tiny_engines, choice, value):
    """The records build-engines and the TensorRT backend index (a face stage's io and batch_range, a
    plan's io, a quantised graph's file), mutated: accepted only when every field they read is usable."""
    m = json.loads(json.dumps({**good_manifest, "face_stages": {"arcface": {
        "files": {"arcface.onnx": _FILE}, "io": _IO, "batch_range": [1, 1, 16], "graph_normalises": False}},
        "plans": {"step": {"file": "step.plan", **_FILE, "library": {}, "build": {"precision": "fp16"}, "io": _IO}},
        "quantized": {"step": {"file": "step.int8.onnx", "files": {"step.int8.onnx": _FILE}}}}))
    choice %= 60      # the mutation lands in the records above (they come last in the walk) or near them
    m = _mutate(m, -1 - choice, value)
    try:
        check_manifest(m, tiny_engines)
    except EngineMismatchError:
        return
    from arc2face_rt.specs import StageSpec, TensorSpec
    for name, rec in m.get("face_stages", {}).items():     # as face_plans.face_stage_specs reads them
        spec = StageSpec(name, *(tuple(TensorSpec(n, dt, tuple(shape)) for n, dt, shape in rec["io"][k])
                                 for k in ("inputs", "outputs")), tolerance={}, batch_range=tuple(rec["batch_range"]))
        assert all(isinstance(d, int) for t in spec.inputs for d in t.concrete(spec.batch_range[2]))
    for rec in m.get("plans", {}).values():                 # as TrtSession._check_io reads them
        io = rec.get("io") or {"inputs": [], "outputs": []}
        assert all(isinstance(r[0], str) and all(d == "B" or isinstance(d, int) for d in r[2])
                   for r in io["inputs"] + io["outputs"])
    for rec in m.get("quantized", {}).values():             # as trt_build.build_engines reads them
        assert isinstance(rec["file"], str)


@FUZZ
@given(data=st.binary(max_size=300))
def test_manifest_file_bytes(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    (d / "manifest.json").write_bytes(data)
    with pytest.raises(EngineMismatchError):
        load_manifest(d)


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


GOOD_NPY = _npy_bytes(np.random.default_rng(0).standard_normal(512).astype(np.float32))


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.integers(0, len(GOOD_NPY) - 1), st.binary(min_size=1, max_size=40)).map(
        lambda t: GOOD_NPY[:t[0]] + t[1] + GOOD_NPY[t[0] + len(t[1]):]),
    st.integers(0, len(GOOD_NPY)).map(lambda n: GOOD_NPY[:n]),
))
def test_npy_loader(data, tmp_path_factory):
    p = Path(tmp_path_factory.mktemp("n")) / "id.npy"
    p.write_bytes(data)
    try:
        emb = load_identity(p)
    except InvalidInputError:
        return
    assert emb.shape == (512,) and emb.dtype == np.float32 and abs(float(np.linalg.norm(emb)) - 1) < 1e-4


@FUZZ
@given(shape=st.lists(st.integers(0, 10**9), max_size=4), descr=st.sampled_from(["<f4", ">f8", "|u1", "<c8", "O"]))
def test_npy_header_never_allocates_from_the_header(shape, descr, tmp_path_factory):
    p = Path(tmp_path_factory.mktemp("h")) / "x.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        f.write(b"\0" * 128)
    try:
        a = read_npy(p, max_bytes=1 << 20)
    except InvalidInputError:
        return
    assert a.nbytes == 128


def _png(w=40, h=30, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


SEEDS = [_png(), _png(mode="RGBA"), _png(mode="L"), _jpeg()]


@FUZZ
@given(seed=st.sampled_from(SEEDS), pos=st.integers(0, 10**6), junk=st.binary(min_size=1, max_size=16),
       cut=st.booleans())
def test_image_decoder_mutated(seed, pos, junk, cut):
    pos %= len(seed)
    data = seed[:pos] if cut else seed[:pos] + junk + seed[pos + len(junk):]
    try:
        img = decode_image(data, "fuzz", ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000))
    except ImageDecodeError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


@FUZZ
@given(data=st.binary(max_size=500))
def test_image_decoder_random(data):
    try:
        decode_image(data, "fuzz", ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000))
    except Arc2FaceError:
        pass
