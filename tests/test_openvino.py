"""The OpenVINO backend: parity with ONNX Runtime, bf16 that keeps the scheduler in f32, precision
choice, the compiled-blob cache, errors a user can cause, and the face models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino")

from arc2face_rt.backends import openvino as ovb  # noqa: E402
from arc2face_rt.backends.ov_cache import RECORD, CompileCache, choose_cache_dir, user_cache_root  # noqa: E402
from arc2face_rt.cli import main as rt_main  # noqa: E402
from arc2face_rt.errors import InvalidInputError  # noqa: E402
from arc2face_rt.images import read_params  # noqa: E402
from arc2face_rt.manifest import sha256_file  # noqa: E402
from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, pick_backend, random_identity  # noqa: E402

HAS_BF16 = ovb.cpu_isa().bf16
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AMX-BF16/AVX512-BF16")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


@pytest.fixture(scope="module")
def engines(tiny_engines, tmp_path_factory):
    """A private copy: the OpenVINO cache and int8 graphs go into it, not into the shared fixture."""
    d = tmp_path_factory.mktemp("ov") / "fp32"
    shutil.copytree(tiny_engines, d)
    return d


@pytest.fixture(scope="module")
def ort_images(engines):
    with Arc2FacePipeline(engines, backend="ort", device="cpu") as p:
        return p.generate(random_identity(7), 2, GenerationOptions(steps=25, guidance=3.0, seed=11, batch_size=2)).images


def test_fp32_matches_onnxruntime_image_for_image(engines, ort_images):
    """Oracle: ONNX Runtime on the same graphs, same latents (25 DPM++ steps, guidance 3)."""
    manifest_before = sha256_file(engines / "manifest.json")
    with Arc2FacePipeline(engines, backend="openvino", cpu_precision="fp32") as p:
        res = p.generate(random_identity(7), 2, GenerationOptions(steps=25, guidance=3.0, seed=11, batch_size=2))
    assert np.abs(res.images.astype(int) - ort_images.astype(int)).max() <= 1
    assert res.params[0]["backend"] == "openvino" and res.params[0]["precision"] == "fp32"
    assert sha256_file(engines / "manifest.json") == manifest_before     # the export manifest is never rewritten
    cache = user_cache_root() / p.engine_id                      # per user: the engines folder is not written
    rec = json.loads((cache / RECORD).read_text())
    assert rec["openvino"] == ovb.openvino_version() and rec["cpu"] == ovb.cpu_isa().as_dict()
    assert {"projector:f32", "step_cfg:f32", "vae_decoder:f32"} <= set(rec["compiled"])
    assert list(cache.glob("*.blob")) and not (engines / "openvino_cache").exists()


@needs_bf16
def test_bf16_runs_the_unet_in_bf16_and_the_scheduler_in_f32(engines):
    sess = ovb.OpenVinoSession(engines / "step_cfg.onnx", "bf16")
    prec = sess.runtime_precisions()
    assert sess.extra_outputs >= 2 and sess.output_names == ["x_out", "m0"]
    assert any(p == "bf16" for n, p in prec.items() if "/unet/down_blocks" in n)      # the UNet is bf16
    for name in ("/unet/time_proj/Mul", "/unet/time_proj/Sin", "/unet/time_proj/Cos", "/Mul", "x_out", "m0"):
        assert prec[name] == "f32", (name, prec[name])        # timestep sinusoid, s·x, update: f32
    plain = ovb.core().compile_model(str(engines / "step_cfg.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    plain_prec = {op.get_rt_info()["originalLayersNames"].astype(str): op.get_rt_info()["runtimePrecision"].astype(str)
                  for op in plain.get_runtime_model().get_ordered_ops()}
    assert plain_prec["/unet/time_proj/Mul"] == "bf16"        # what keep_f32_from prevents


@needs_bf16
def test_bf16_stays_close_to_fp32(engines, ort_images):
    with Arc2FacePipeline(engines, backend="openvino", cpu_precision="bf16") as p:
        res = p.generate(random_identity(7), 2, GenerationOptions(steps=25, guidance=3.0, seed=11, batch_size=2))
    assert res.params[1]["precision"] == "bf16"
    assert psnr(ort_images, res.images) >= 30.0


def test_precision_resolution():
    with_bf16 = ovb.CpuIsa("x", ("avx512_bf16",), ("FP32", "BF16", "INT8"))
    without = ovb.CpuIsa("y", ("avx2",), ("FP32", "INT8"))
    assert ovb.resolve_precision("auto", with_bf16) == ovb.Precision("bf16", "bf16", False)
    assert ovb.resolve_precision("auto", without) == ovb.Precision("fp32", "f32", False)
    assert ovb.resolve_precision("int8", with_bf16) == ovb.Precision("int8", "bf16", True)
    assert ovb.resolve_precision("int8", without).heavy == "f32"
    p = ovb.resolve_precision("bf16", with_bf16)
    assert (p.hint("step_cfg"), p.hint("vae_decoder"), p.hint("projector")) == ("bf16", "bf16", "f32")
    with pytest.raises(InvalidInputError, match="no AMX-BF16 or AVX512-BF16.*--cpu-precision auto"):
        ovb.resolve_precision("bf16", without)
    with pytest.raises(InvalidInputError, match="--cpu-precision must be"):
        ovb.resolve_precision("fp16", with_bf16)
    assert "no AMX" in without.summary() and "avx512_bf16" in with_bf16.summary()


def test_auto_picks_openvino_on_a_cpu_machine(engines, monkeypatch):
    m = json.loads((engines / "manifest.json").read_text())
    assert pick_backend(engines, m, "auto", "cpu") == "openvino"
    monkeypatch.setattr(ovb, "openvino_installed", lambda: False)
    assert pick_backend(engines, m, "auto", "cpu") == "ort"
    with pytest.raises(InvalidInputError, match="runs on the CPU"):
        pick_backend(engines, m, "openvino", "cuda")


def test_cli_records_backend_and_precision(engines, tmp_path, capsys):
    out = tmp_path / "out"
    assert rt_main(["generate", "--engines", str(engines), "--random-id", "-n", "1", "--steps", "2",
                    "--backend", "openvino", "--cpu-precision", "fp32", "--out", str(out)]) == 0
    p = read_params(next(out.glob("*.png")))
    assert p["backend"] == "openvino" and p["precision"] == "fp32"
    assert "backend openvino (fp32; CPU " in capsys.readouterr().err


def test_cli_bf16_on_a_cpu_without_it_is_a_one_line_error(engines, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ovb, "cpu_isa", lambda: ovb.CpuIsa("old", ("avx2",), ("FP32",)))
    rc = rt_main(["generate", "--engines", str(engines), "--random-id", "-n", "1", "--steps", "1",
                  "--backend", "openvino", "--cpu-precision", "bf16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("arc2face-rt: error: --cpu-precision bf16") and "auto" in err[-1]


def test_out_of_memory_in_a_step_is_the_one_line_out_of_memory_error(engines, tmp_path, capsys, monkeypatch):
    """OpenVINO reports a failed allocation as its generic RuntimeError ("Exception from
    .../infer_request.cpp:224:" then "Failed to allocate N bytes"): it was a traceback and exit 1."""
    class Failing:
        def infer(self, feeds):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224:\n"
                               "Failed to allocate 134217728 bytes of memory\n")

    real = ovb.OpenVinoSession.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        if self.path.name == "step_cfg.onnx":
            self._request = Failing()
    monkeypatch.setattr(ovb.OpenVinoSession, "__init__", init)
    out = tmp_path / "o"
    rc = rt_main(["generate", "--engines", str(engines), "--random-id", "-n", "1", "--steps", "1",
                  "--backend", "openvino", "--cpu-precision", "fp32", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("arc2face-rt: error: out of memory; lower --batch"), err
    assert "running step_cfg.onnx: Failed to allocate 134217728 bytes" in err[-1] and not out.exists()


def test_cli_cpu_precision_needs_openvino(engines, tmp_path, capsys):
    rc = rt_main(["generate", "--engines", str(engines), "--random-id", "--backend", "ort", "--cpu-precision",
                  "bf16", "--out", str(tmp_path / "o")])
    assert rc == 2 and "needs --backend openvino" in capsys.readouterr().err


def test_missing_openvino_names_the_extra(engines, tmp_path):
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from arc2face_rt.cli import main\n"
            f"sys.exit(main(['generate', '--engines', {str(engines)!r}, '--random-id', '--backend', 'openvino',"
            f" '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("arc2face-rt: error:")
    assert "pip install 'arc2face-rt[openvino]'" in r.stderr and "Traceback" not in r.stderr


def test_openvino_runs_without_the_pytorch_stack(engines):
    code = ("import sys, numpy as np\n"
            "from arc2face_rt.pipeline import Arc2FacePipeline, GenerationOptions, random_identity\n"
            f"p = Arc2FacePipeline({str(engines)!r}, backend='openvino', cpu_precision='fp32')\n"
            "p.generate(random_identity(0), 1, GenerationOptions(steps=1))\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cache_folder_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("ARC2FACE_CACHE_DIR", str(tmp_path / "user"))      # arc2face-rt's per-user cache
    assert choose_cache_dir("abc") == tmp_path / "user" / "openvino" / "abc"
    monkeypatch.setenv("ARC2FACE_OV_CACHE", str(tmp_path / "ov"))
    assert choose_cache_dir("abc") == tmp_path / "ov" / "abc"
    (tmp_path / "file").write_text("a file where the cache folder would go")   # mkdir fails, even as root
    monkeypatch.setenv("ARC2FACE_OV_CACHE", str(tmp_path / "file"))
    assert choose_cache_dir("abc") is None
    monkeypatch.setenv("ARC2FACE_OV_CACHE", "0")
    assert choose_cache_dir("abc") is None


def test_cache_made_elsewhere_is_recompiled_not_imported(tmp_path):
    cpu = {"model": "here", "flags": ["avx512_bf16"], "capabilities": ["BF16"]}
    CompileCache(tmp_path, "2026.4", cpu).prepare("step_cfg", "bf16", "bf16", "abc")
    (tmp_path / "123.blob").write_bytes(b"compiled elsewhere")
    CompileCache(tmp_path, "2026.4", cpu)                           # same version and CPU: kept
    assert (tmp_path / "123.blob").exists()
    CompileCache(tmp_path, "2026.4", {**cpu, "flags": ["amx_bf16"]})  # another ISA: blobs go, record renewed
    assert not (tmp_path / "123.blob").exists()
    rec = json.loads((tmp_path / RECORD).read_text())
    assert rec["cpu"]["flags"] == ["amx_bf16"] and rec["compiled"] == {}
    CompileCache(tmp_path, "2027.0", rec["cpu"])                    # another OpenVINO: same
    assert json.loads((tmp_path / RECORD).read_text())["openvino"] == "2027.0"


def test_face_models_on_openvino_match_onnxruntime(tmp_path):
    from arc2face_ref.face_models import write_face_models
    from arc2face_rt.face.models import load_face_models
    from face_fixtures import astronaut

    models = tmp_path / "models"
    write_face_models(models, seed=0, size="tiny")
    img = astronaut()
    (d1, r1), (d2, r2) = (load_face_models(models, backend=b, device="cpu") for b in ("ort", "openvino"))
    assert type(r2.session).__name__ == "OpenVinoSession"
    f1, f2 = d1.detect(img), d2.detect(img)
    assert len(f1) == len(f2) >= 1
    np.testing.assert_allclose(f1[0].kps, f2[0].kps, atol=1e-2)
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(r1.embed(crops), r2.embed(crops), atol=1e-4)


def test_a_file_that_is_not_onnx_is_one_line_on_openvino(tmp_path):
    """OpenVINO tries its other front ends on a file its ONNX one rejects, and TensorFlow's logs its
    parse errors to stderr; such a file is refused before OpenVINO reads it."""
    from arc2face_ref.face_models import write_face_models
    from face_fixtures import astronaut
    from PIL import Image

    models = tmp_path / "models"
    write_face_models(models, seed=0, size="tiny")
    (tmp_path / "afile").write_text("x\n")
    Image.fromarray(astronaut()).save(tmp_path / "p.png")
    r = subprocess.run([sys.executable, "-c", "import sys; from arc2face_rt.cli import main; sys.exit(main())",
                        "embed", "--backend", "openvino", "--detector", str(tmp_path / "afile"), "--recognizer",
                        str(models / "arcface.onnx"), "--image", str(tmp_path / "p.png"), "--out",
                        str(tmp_path / "id.npy")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not an ONNX model" in r.stderr and not (tmp_path / "id.npy").exists()
