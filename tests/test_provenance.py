"""Every setting that changes pixels is recorded in each PNG and in dataset.json, and `--resume` (generate
and dataset) refuses a change of any of them before a graph is opened: the backend, the precision that
actually runs (OpenVINO int8's float part, TensorRT's built plans), the engine id over every file the run
loads (OpenVINO int8 IR, TensorRT plans, ONNX Runtime's fused graphs), ONNX Runtime's device and TF32."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arc2face_rt import folder_setup, provenance
from arc2face_rt.cli import main as rt_main
from arc2face_rt.images import read_params
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, identity_fingerprint, random_identity



@pytest.fixture
def ov():
    """The OpenVINO backend module, for the tests that need OpenVINO (the others run without it)."""
    pytest.importorskip("openvino")
    from arc2face_rt.backends import openvino
    return openvino


def _fake_int8(engines: Path, digest: str) -> None:
    """An `openvino_int8` manifest section (never opened here: only recorded)."""
    m = json.loads((engines / "manifest.json").read_text())
    m["openvino_int8"] = {"step_cfg": {"file": "step_cfg.ov-int8.xml", "files": {
        "step_cfg.ov-int8.xml": {"sha256": digest * 64, "bytes": 1}}}}
    (engines / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def engines(tiny_engines, tmp_path):
    d = tmp_path / "e"
    shutil.copytree(tiny_engines, d, ignore=shutil.ignore_patterns("openvino_cache"))
    return d


def _isa(ov, bf16: bool):
    return ov.CpuIsa("test CPU", (), ("FP32", "INT8") + (("BF16",) if bf16 else ()))


def test_requantised_openvino_int8_graphs_change_the_engine_id(engines, monkeypatch, ov):
    """Re-quantised int8 step graphs give another engine id; fp32 runs do not depend on the int8 section."""
    monkeypatch.setattr(ov, "cpu_isa", lambda: _isa(ov, True))
    ids, fp32 = {}, {}
    for digest in "ab":
        _fake_int8(engines, digest)
        with Arc2FacePipeline(engines, backend="openvino", cpu_precision="int8", verify=False) as p:
            ids[digest] = p.engine_id
        with Arc2FacePipeline(engines, backend="openvino", cpu_precision="fp32", verify=False) as p:
            fp32[digest] = p.engine_id
    assert ids["a"] != ids["b"] and fp32["a"] == fp32["b"] and ids["a"] != fp32["a"]


@pytest.mark.parametrize("bf16,label", [(True, "int8 (bf16 float)"), (False, "int8 (fp32 float)")])
def test_openvino_int8_records_the_float_precision_of_the_rest(engines, monkeypatch, ov, bf16, label):
    """int8 runs the VAE and the step graphs' float ops in bf16 where the CPU has it, else fp32: the two
    give other pixels, so the PNGs record which."""
    _fake_int8(engines, "a")
    monkeypatch.setattr(ov, "cpu_isa", lambda: _isa(ov, bf16))
    with Arc2FacePipeline(engines, backend="openvino", cpu_precision="int8", verify=False) as p:
        params = p.image_params(GenerationOptions(), 0, random_identity(1))
    assert params["precision"] == label and params["backend"] == "openvino"


def test_trt_records_built_plans_and_ort_gpu_records_device_fused_tf32(monkeypatch):
    """GPU-only paths, through the record they make (no GPU here): TensorRT's precision is the plans'
    built one and its id covers the plans; ONNX Runtime on CUDA records device, fused graphs and TF32."""
    f = lambda d: {"file": "x", "files": {"x": {"sha256": d * 64, "bytes": 1}}}   # noqa: E731
    m = {"precision": "fp16", "stages": {"step_cfg": f("1")}, "ort_cuda": {"step_cfg": f("2")},
         "plans": {"step_cfg": {"file": "p", "sha256": "3" * 64, "bytes": 1, "build": {"precision": "int8"}}}}
    trt = provenance.run_record(m, "trt")
    assert trt["precision"] == "int8"
    assert provenance.run_record({**m, "plans": {"step_cfg": {**m["plans"]["step_cfg"], "sha256": "4" * 64}}},
                                 "trt")["engines"] != trt["engines"]
    cpu, gpu = provenance.run_record(m, "ort"), provenance.run_record(m, "ort", on_gpu=True, fused=True)
    assert "device" not in cpu and gpu["device"] == "cuda" and gpu["ort_graphs"] == "fused"
    assert gpu["engines"] != cpu["engines"] == provenance.run_record(m, "ort", fused=True)["engines"]
    monkeypatch.setenv("ARC2FACE_ORT_FUSED", "0")
    assert "ort_graphs" not in provenance.run_record(m, "ort", on_gpu=True,
                                                     fused=provenance.ort_fused_wanted(m))
    monkeypatch.setenv("ARC2FACE_ORT_TF32", "1")
    assert "tf32" not in gpu and provenance.run_record({**m, "precision": "fp32"}, "ort", on_gpu=True)["tf32"]
    monkeypatch.setenv("ARC2FACE_ORT_FUSE_CONV_BIAS", "1")      # other cuDNN kernels, TF32 on: other pixels
    assert "ort_conv_bias" not in gpu and provenance.run_record(m, "ort", on_gpu=True, fused=True)["ort_conv_bias"]
    assert "ort_conv_bias" not in provenance.run_record(m, "ort", on_gpu=True)        # the plain graphs ignore it
    # only the generation stages' plans are in the id: not the face models' (build-engines adds them), nor others
    face = {**m, "plans": {**m["plans"], "detector": f("5"), "arcface": f("6"), "some_future_plan": f("7")}}
    assert provenance.run_record(face, "trt")["engines"] == trt["engines"]


def test_an_explicit_cuda_device_is_predicted_without_probing(engines, monkeypatch):
    """`--device cuda` is taken at its word: a Ray head without a GPU records what its GPU actors make."""
    monkeypatch.setattr(folder_setup, "ort_gpu_usable", lambda device: False)     # this machine: no GPU
    with Arc2FacePipeline(engines, backend="ort", device="cuda", verify=False) as p:
        assert p.run_params()["device"] == "cuda"


def test_ort_records_the_predicted_gpu_before_loading(engines, monkeypatch):
    monkeypatch.setattr(folder_setup, "ort_gpu_usable", lambda device: True)
    monkeypatch.setenv("ARC2FACE_ORT_TF32", "1")
    with Arc2FacePipeline(engines, backend="ort", verify=False) as p:     # tiny engines: fp32
        params = p.image_params(GenerationOptions(), 0, random_identity(1))
    assert params["device"] == "cuda" and params["tf32"] is True


def _no_graphs(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"graph {name} opened before the --resume check")
    monkeypatch.setattr(Arc2FacePipeline, "session", refuse)


GEN = ["generate", "--random-id", "--seed", "7", "-n", "2", "--steps", "2", "--batch", "1"]


@pytest.fixture(scope="module")
def two_images(tiny_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "r"
    assert rt_main(GEN + ["--engines", str(tiny_engines), "--out", str(out), "--backend", "ort", "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("change", [["--guidance", "2.5"], ["--backend", "openvino", "--cpu-precision", "fp32"],
                                    ["--steps", "3"], ["--scheduler", "ddim"]])
def test_generate_resume_with_a_change_is_refused_before_graphs_open(tiny_engines, two_images, tmp_path, monkeypatch,
                                                                     capsys, change):
    out = tmp_path / "r"
    shutil.copytree(two_images, out)
    base = GEN + ["--engines", str(tiny_engines), "--out", str(out)]
    (out / "arc2face_7_0001.png").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _no_graphs(monkeypatch)
    argv = base + ["--backend", "ort", "--device", "cpu"] + change + ["--resume"]
    capsys.readouterr()
    assert rt_main(argv) == 2
    err = capsys.readouterr().err
    assert "was made with other parameters" in err and "--resume only continues the same run" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


DS = ["dataset", "--identities", "2", "--per-identity", "1", "--steps", "1", "--shard-size", "1", "--seed", "5"]


def test_dataset_resume_refuses_another_backend_or_precision(tiny_engines, tmp_path, monkeypatch, capsys):
    out = tmp_path / "d"
    base = DS + ["--engines", str(tiny_engines), "--out", str(out)]
    assert rt_main(base + ["--backend", "ort", "--device", "cpu"]) == 0
    (out / "shards" / "shard-000001.json").unlink()           # = killed before shard 1 committed
    _no_graphs(monkeypatch)
    for change, key in ((["--backend", "openvino", "--cpu-precision", "fp32"], "backend"),
                        (["--backend", "ort", "--guidance", "2"], "guidance")):
        capsys.readouterr()
        assert rt_main(base + change + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert "made with other settings" in err and key in err, err
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["backend"], meta["precision"]) == ("ort", "fp32")
    # a dataset.json from before backend and precision were recorded: refused, naming the fields to add
    old = {k: v for k, v in meta.items() if k not in ("backend", "precision")}
    (out / "dataset.json").write_text(json.dumps(old))
    assert rt_main(base + ["--backend", "ort", "--device", "cpu", "--resume"]) == 2
    err = capsys.readouterr().err
    assert 'does not record the backend' in err and '"backend": "ort", "precision": "fp32"' in err, err


def _legacy_ort_cuda(engines: Path) -> str:
    """Give a folder an `ort_cuda` section (never opened on the CPU) and return the engine id versions
    before provenance recorded (sha over `stages` + `ort_cuda`, whatever ran)."""
    m = json.loads((engines / "manifest.json").read_text())
    m["ort_cuda"] = {"step_cfg": m["stages"]["step_cfg"]}
    (engines / "manifest.json").write_text(json.dumps(m))
    return provenance.engine_id(m, ("stages", "ort_cuda"))


def test_older_pngs_of_a_folder_with_fused_graphs_still_resume(engines, tmp_path, capsys):
    """A PNG an older version made with ONNX Runtime on the CPU records the old engine id (which also
    covered the unused fused graphs): the same pixels, so --resume keeps it; another stages' id is refused."""
    from PIL import Image

    from arc2face_rt.images import save_png

    legacy = _legacy_ort_cuda(engines)
    out = tmp_path / "g"
    args = GEN + ["--engines", str(engines), "--out", str(out), "--backend", "ort", "--device", "cpu"]
    assert rt_main(args) == 0
    png = out / "arc2face_7_0000.png"
    params = read_params(png)
    assert params["engines"] != legacy
    save_png(png, np.asarray(Image.open(png)), {**params, "engines": legacy}, overwrite=True)   # as an older version
    (out / "arc2face_7_0001.png").unlink()
    capsys.readouterr()
    assert rt_main(args + ["--resume"]) == 0, capsys.readouterr().err
    save_png(png, np.asarray(Image.open(png)), {**params, "engines": "0" * 16}, overwrite=True)
    (out / "arc2face_7_0001.png").unlink()
    assert rt_main(args + ["--resume"]) == 2
    assert "engines: '0000000000000000' there" in capsys.readouterr().err


def test_an_older_dataset_resumes_once_the_advised_fields_are_added(engines, tmp_path, capsys):
    legacy = _legacy_ort_cuda(engines)
    out = tmp_path / "d"
    base = DS + ["--engines", str(engines), "--out", str(out), "--backend", "ort", "--device", "cpu"]
    assert rt_main(base) == 0
    (out / "shards" / "shard-000001.json").unlink()
    meta = json.loads((out / "dataset.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("backend", "precision")}
    (out / "dataset.json").write_text(json.dumps({**old, "engines": legacy}))    # as an older version wrote it
    capsys.readouterr()
    assert rt_main(base + ["--resume"]) == 2
    assert '"backend": "ort", "precision": "fp32"' in capsys.readouterr().err
    (out / "dataset.json").write_text(json.dumps({**old, "engines": legacy, "backend": "ort", "precision": "fp32"}))
    assert rt_main(base + ["--resume"]) == 0, capsys.readouterr().err
    (out / "shards" / "shard-000001.json").unlink()
    (out / "dataset.json").write_text(json.dumps({**old, "engines": "0" * 16}))   # other graphs: cannot continue
    assert rt_main(base + ["--resume"]) == 2
    assert "does not record enough to continue it: use another --out" in capsys.readouterr().err
    from arc2face_rt.dataset.runner import check_output
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.errors import InvalidInputError

    (out / "dataset.json").write_text(json.dumps({**old, "engines": legacy}))    # --ray: its actors cannot tell
    with pytest.raises(InvalidInputError, match="resume it once without --ray"):
        check_output(out, DatasetSpec(2, 1, GenerationOptions()), np.zeros((2, 512), np.float32), None, True)


def test_a_worker_that_would_make_other_pixels_refuses(tiny_engines, tmp_path):
    """A Ray actor whose machine resolves another setup than the driver recorded refuses its shards."""
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.dataset.worker import ShardWorker, WorkerConfig
    from arc2face_rt.errors import EngineMismatchError

    spec = DatasetSpec(identities=1, per_identity=1, options=GenerationOptions(steps=1, batch_size=1))
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as p:
        run = {**p.run_params(), "precision": "bf16"}
        config = WorkerConfig(out=tmp_path / "o", spec=spec, engines=tiny_engines, backend="ort", device="cpu", run=run)
        with pytest.raises(EngineMismatchError, match="precision: 'bf16' there, 'fp32' here"):
            ShardWorker(config, random_identity(1)[None], pipe=p)


def test_a_restarted_ray_actor_that_would_make_other_pixels_refuses_its_shard_in_one_line(tiny_engines, tmp_path,
                                                                                          capsys):
    """Ray re-creates a dead actor from its first arguments, perhaps on another machine, and nothing
    compared it with the others: every `--ray` shard task carries the run record the actors agreed on.
    The refusal reaches the driver wrapped in Ray's RayTaskError, and is still the worker's one line."""
    ray_exceptions = pytest.importorskip("ray.exceptions")
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.dataset.worker import ShardWorker, WorkerConfig
    from arc2face_rt.errors import EngineMismatchError
    from arc2face_rt.exits import run_cli

    spec = DatasetSpec(identities=1, per_identity=1, options=GenerationOptions(steps=1, batch_size=1))
    out = tmp_path / "o"
    out.mkdir()                                                   # as the driver leaves it for the actors
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as p:
        agreed = {**p.run_params(), "precision": "bf16"}          # what the other actors resolved
        restarted = ShardWorker(WorkerConfig(out=out, spec=spec, engines=tiny_engines, backend="ort", device="cpu"),
                                random_identity(1)[None], pipe=p)
        with pytest.raises(EngineMismatchError, match="precision: 'bf16' there, 'fp32' here") as refused:
            restarted.run(0, expect=agreed)
        assert not list(out.rglob("*"))                           # refused before anything was written
        assert restarted.run(0, expect=p.run_params())["counts"]["generated"] == 1

    def driver():
        raise ray_exceptions.RayTaskError("ShardWorker.run", "Traceback (most recent call last):\n  ...",
                                          refused.value).as_instanceof_cause()
    assert run_cli(driver, "arc2face-rt") == 2
    assert capsys.readouterr().err == f"arc2face-rt: error: {refused.value}\n"


def test_a_ray_actor_that_refuses_the_dataset_being_resumed_is_one_line(tiny_engines, tmp_path, capsys):
    """A real local Ray: an actor whose setup differs from the dataset's refuses in its constructor. Ray
    reports a constructor that raised as ActorDiedError with its traceback as text; the actor keeps the
    error for its first call instead, so the command ends in the worker's one line and exit 2."""
    pytest.importorskip("ray")
    out = tmp_path / "d"
    args = DS + ["--engines", str(tiny_engines), "--out", str(out), "--backend", "ort", "--device", "cpu"]
    assert rt_main(args) == 0, capsys.readouterr().err
    meta = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**meta, "precision": "bf16"}))   # made on another kind of CPU
    (out / "shards" / "shard-000001.json").unlink()
    code = "import sys; from arc2face_rt.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, *args, "--ray", "--workers", "1", "--resume"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("arc2face-rt: error: ")]
    assert len(errors) == 1 and "would make other pixels than the dataset (precision: 'bf16' there, 'fp32' here)" \
        in errors[0], r.stderr[-3000:]


def test_ray_dataset_records_the_actors_run_not_the_gpu_less_heads(tiny_engines, tmp_path, monkeypatch, capsys):
    """`dataset --ray` from a head without a GPU whose actors run on GPUs (simulated: Ray's actor start and
    pool replaced by in-process ShardWorkers whose sessions report CUDA): dataset.json records the actors'
    run, not the head's prediction; a resume on GPU actors continues, on a CPU actor or in-process on the
    CPU it is refused."""
    from contextlib import contextmanager

    from arc2face_rt.dataset import ray_runner
    from arc2face_rt.dataset.worker import ShardWorker, same_record

    @contextmanager
    def actors(config, identities, address, workers, shards, log):
        ws = [ShardWorker(config, identities) for _ in range(2)]
        try:
            yield ws, same_record([w.record() for w in ws])
        finally:
            for w in ws:
                w.close()

    monkeypatch.setattr(folder_setup, "ort_gpu_usable", lambda device: False)      # the head: no GPU
    monkeypatch.setattr(ray_runner, "ray_actors", actors)
    expected = []
    monkeypatch.setattr(ray_runner, "run_on_ray",
                        lambda ws, todo, record: (expected.append(record) or ws[0].run(s, expect=record) for s in todo))
    out = tmp_path / "d"
    args = DS + ["--engines", str(tiny_engines), "--out", str(out), "--backend", "ort", "--ray"]
    with monkeypatch.context() as m:
        m.setattr(provenance, "from_sessions", lambda sessions, files: (True, False))   # the actors: on CUDA
        assert rt_main(args) == 0, capsys.readouterr().err
        assert json.loads((out / "dataset.json").read_text())["device"] == "cuda"
        assert expected and all(r["device"] == "cuda" for r in expected)   # each shard checked against it
        (out / "shards" / "shard-000001.json").unlink()
        assert rt_main(args + ["--resume"]) == 0, capsys.readouterr().err
    (out / "shards" / "shard-000001.json").unlink()
    capsys.readouterr()
    assert rt_main(args + ["--resume"]) == 2                                   # the actors on CPUs this time
    assert "device: 'cuda' there, None here" in capsys.readouterr().err
    assert rt_main([a for a in args if a != "--ray"] + ["--resume"]) == 2       # in-process on this CPU
    assert "device: 'cuda' there, None now" in capsys.readouterr().err


def test_a_scaled_identity_is_documented_as_another_identity():
    """The identity is normalised from its float32 values: a power-of-two scale is exact (the same identity),
    another scale rounds differently and is, bit for bit, another identity (as documented)."""
    v = random_identity(7)
    assert identity_fingerprint(v * 2) == identity_fingerprint(v) == identity_fingerprint(v[None] * 0.25)
    assert identity_fingerprint((v * 5).astype(np.float32)) != identity_fingerprint(v)
    assert "power of two" in Arc2FacePipeline.generate.__doc__


def test_an_identity_is_normalised_from_the_values_it_is_given():
    """As documented (and as every run so far recorded it, so that runs resume): a float64 copy of float32
    values is the same identity; float64 values rounded to float32 are another one."""
    v32 = (np.random.default_rng(5).standard_normal(512) * 23.0).astype(np.float32)
    assert identity_fingerprint(v32.astype(np.float64)) == identity_fingerprint(v32)
    v64 = np.random.default_rng(5).standard_normal(512) * 23.0
    assert identity_fingerprint(v64.astype(np.float32)) != identity_fingerprint(v64)


def test_png_records_the_run(tiny_engines, tmp_path):
    out = tmp_path / "p"
    assert rt_main(GEN + ["--engines", str(tiny_engines), "--out", str(out), "--backend", "ort", "--device", "cpu",
                          "-n", "1"]) == 0
    p = read_params(out / "arc2face_7_0000.png")
    with Arc2FacePipeline(tiny_engines, backend="ort", device="cpu") as pipe:
        assert {k: p[k] for k in provenance.RUN_KEYS if k in p} == pipe.run_params()
    assert "device" not in p          # ONNX Runtime on the CPU: as before, so older PNGs still resume
