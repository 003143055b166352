"""The benchmark harness in smoke mode (tiny model, 2 steps, batch 1, 1 repeat) and its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench(*args, timeout=600, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-m", "benchmarks", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def smoke(tiny_model_dir, tiny_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _bench("run", "--smoke", "--device", "cpu", "--model-dir", tiny_model_dir, "--engines", tiny_engines,
           "--backends", "ort,torch,diffusers,trt,no-such-backend", "--out", out, "--name", "smoke.json")
    return out, json.loads((out / "smoke.json").read_text())


def test_smoke_result_has_the_expected_fields(smoke):
    _, res = smoke
    assert res["kind"] == "run" and res["device_kind"] == "cpu"
    assert {"created", "git", "machine", "libraries", "options", "flops", "peak", "rows"} <= set(res)
    m = res["machine"]
    assert m["cpu_model"] and m["cpu_cores"] >= 1 and "gpus" in m
    assert res["libraries"]["onnxruntime"] and res["libraries"]["torch"]
    o = res["options"]
    assert (o["steps"], o["batches"], o["repeats"], o["size"], o["smoke"]) == (2, [1], 1, "tiny", True)
    assert res["peak"]["tflops"] > 0 and res["flops"]["unet_forward"] > 0


def test_smoke_measures_ort_torch_diffusers(smoke):
    _, res = smoke
    rows = {r["backend"]: r for r in res["rows"]}
    for name in ("ort", "torch", "diffusers"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["latency_s"]["median"] > 0 and r["cold_start_s"] >= r["load_s"] > 0
        assert r["throughput_ips"]["1"] > 0 and r["peak_rss_mb"] > 0
        assert r["image_shape"] == [1, 512, 512, 3]
        assert r["stages_s"]["steps"] > 0 and r["stages_s"]["decode"] > 0 and r["stages_s"]["project"] > 0
        assert r["floor"]["latency_ratio"] > 0 and r["floor"]["latency_floor_s"] > 0
        assert r["vs_diffusers"]["latency_speedup"] > 0
    assert rows["ort"]["stages_s"]["step"] > 0 and rows["torch"]["stages_s"]["step"] > 0
    import onnxruntime                 # the onnxruntime that ran the row, not just one that is installed
    ran = rows["ort"]["info"]["onnxruntime"]
    assert ran["version"] == onnxruntime.__version__ and ran["package"] in ("onnxruntime", "onnxruntime-gpu")
    assert rows["diffusers"]["vs_diffusers"]["latency_speedup"] == pytest.approx(1.0)
    # same identity, same noise: every row makes the same image up to rounding
    means = [rows[n]["image_mean"] for n in ("ort", "torch", "diffusers")]
    assert max(means) - min(means) < 0.5


def test_unknown_backend_and_trt_without_gpu_are_skipped_with_reasons(smoke):
    _, res = smoke
    rows = {r["backend"]: r for r in res["rows"]}
    assert rows["no-such-backend"]["status"] == "skipped"
    assert "unknown backend" in rows["no-such-backend"]["reason"]
    if not res["machine"]["gpus"]:
        assert rows["trt"]["status"] == "skipped"
        assert "GPU" in rows["trt"]["reason"] or "TensorRT" in rows["trt"]["reason"]


def test_report_writes_markdown(smoke):
    out, _ = smoke
    _bench("report", "--results", out)
    md = (out / "RESULTS.md").read_text()
    assert "smoke.json" in md and "speed-up vs diffusers" in md
    for name in ("ort", "torch", "diffusers", "no-such-backend", "trt"):
        assert name in md


def test_report_leaves_out_an_incomplete_result_naming_it(tmp_path):
    """A known kind lacking what its section reads (hand-edited, older schema) was a KeyError traceback."""
    from benchmarks.report import write_report

    (tmp_path / "a.json").write_text('{"kind": "verify"}')
    (tmp_path / "b.json").write_text('{"kind": "run", "created": "x", "rows": 3}')
    said = []
    md, charts = write_report(tmp_path, say=said.append)
    assert charts == [] and "Benchmark results" in md.read_text() and "a.json" not in md.read_text()
    assert len(said) == 2 and said[0].startswith("left out b.json: not a complete run result ("), said
    assert said[1] == "left out a.json: not a complete verify result (no 'first')", said


def test_missing_checkpoint_is_a_skipped_row(tmp_path):
    _bench("run", "--smoke", "--device", "cpu", "--model-dir", tmp_path / "nowhere", "--backends", "torch",
           "--out", tmp_path, "--name", "r.json", "--peak-tflops", "1")
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["status"] == "skipped" and "missing checkpoint" in row["reason"]


def test_torch_compile_rows_compile_each_model_at_the_first_images_shapes(tiny_model_dir, monkeypatch):
    """The timed compiles before the first image must leave that image nothing new to compile: Dynamo
    (with a backend that records each graph instead of Inductor's minutes on a CPU) traces no new graph."""
    import torch
    import torch._dynamo

    from benchmarks.runners import TorchCompileRunner

    graphs, compile_ = [], torch.compile

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend=record))
    torch._dynamo.reset()
    runner = TorchCompileRunner({"model_dir": str(tiny_model_dir), "device": "cpu", "steps": 2, "guidance": 3.0,
                                 "compile_mode": "max-autotune"})
    runner.load()
    parts = runner.compile_parts()
    assert list(parts) == ["UNet", "VAE decoder"]
    for label, compile_once in parts.items():
        before = len(graphs)
        compile_once()
        assert len(graphs) > before, f"{label}: nothing was compiled"
    traced = len(graphs)
    assert runner.generate(1).shape[0] == 1
    assert len(graphs) == traced, "the first image traced new graphs: the compile parts used other shapes"
    assert runner.info()["compile_mode"] == "max-autotune"
    torch._dynamo.reset()


def test_build_records_each_plan(tiny_engines, tmp_path):
    """`build` times a TensorRT(-RTX) build of every stage and records each plan's size. --engines is
    relative to the working folder (the build's child process runs in the repository: it was not found)."""
    pytest.importorskip("tensorrt_rtx")
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines, ignore=shutil.ignore_patterns("*.plan"))
    _bench("build", "--size", "tiny", "--precision", "fp32", "--engines", "engines", "--out", ".",
           "--name", "b.json", "--opt-level", "0", cwd=tmp_path)
    res = json.loads((tmp_path / "b.json").read_text())
    run = res["runs"][0]
    assert res["kind"] == "build" and run["status"] == "ok", run
    assert set(run["plans"]) == {"projector", "step_cfg", "step", "vae_decoder"}
    for name, p in run["plans"].items():
        assert p["plan_mb"] > 0 and p["build_s"] > 0
        assert (engines / f"{name}.plan").stat().st_size == pytest.approx(p["plan_mb"] * 2**20, rel=0.05, abs=0.06 * 2**20)


@pytest.mark.slow          # a tiny export, calibration, 3 variants x 3 steps and 3 plan builds: minutes on 2 cores
def test_quant_quality_compares_against_fp16_on_the_same_seeds(tiny_model_dir, tmp_path):
    """`quant` quantises the tiny fp16 step graph to int8 and FP8 and reports how far the images move."""
    _bench("quant", "--model-dir", tiny_model_dir, "--engines", tmp_path / "fp16", "--identities", "1",
           "--calib-identities", "1", "--steps", "3", "--out", tmp_path, "--name", "q.json", timeout=1200)
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["kind"] == "quant" and set(res["precisions"]) == {"int8", "fp8"}
    for prec, r in res["precisions"].items():
        assert r["quantization"]["quantized_layers"] > 0 and r["quantization"]["calibration"]["samples"] == 3
        assert len(r["rows"]) == 1 and r["fp16_layers"] > 0
        row = r["rows"][0]
        assert 0 < row["latent_psnr_db"] < float("inf") and row["image_psnr_db"] > 0
        assert "arcface_cosine" not in row        # this model folder has no face models
    if "plans" in res:                            # TensorRT(-RTX) installed: build time and size per precision
        assert set(res["plans"]) <= {"fp16", "int8", "fp8"} and all(p["plan_mb"] > 0 for p in res["plans"].values())


@pytest.fixture(scope="module")
def ov_engines(tiny_engines, tmp_path_factory):
    """A copy of the tiny engines with an OpenVINO int8 step_cfg (calibrated on 2 identities x 2 steps)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import shutil

    from arc2face_export.ov_int8 import ensure_ov_int8

    engines = tmp_path_factory.mktemp("bench-ov") / "engines"
    shutil.copytree(tiny_engines, engines)
    ensure_ov_int8(engines, stages=("step_cfg",), identities=2, per_run=2)
    return engines


@pytest.fixture(scope="module")
def cpu_rows(tiny_model_dir, ov_engines, tmp_path_factory):
    """The CPU comparison rows (issue 14): diffusers fp32/bf16, ORT fp32, OpenVINO fp32/bf16/int8."""
    out = tmp_path_factory.mktemp("bench-cpu")
    engines = ov_engines
    _bench("run", "--smoke", "--device", "cpu", "--model-dir", tiny_model_dir, "--engines", engines, "--backends",
           "ort,diffusers,diffusers-bf16,openvino-fp32,openvino-bf16,openvino-int8", "--out", out, "--name", "cpu.json",
           timeout=1200)
    return out, json.loads((out / "cpu.json").read_text())


def test_cpu_rows_floor_per_precision_and_both_baselines(cpu_rows):
    from arc2face_rt.backends.openvino import cpu_isa

    out, res = cpu_rows
    rows = {r["backend"]: r for r in res["rows"]}
    assert res["libraries"]["openvino"] and res["peaks"]["fp32"]["tflops"] > 0 and res["peaks"]["int8"]["tflops"] > 0
    assert {"numpy", "openvino", "torch"} <= set(res["peaks"]["fp32"]["methods"])
    bf16 = cpu_isa().bf16
    assert ("bf16" in res["peaks"]) == bf16
    want = {"ort": "fp32", "diffusers": "fp32", "openvino-fp32": "fp32", "openvino-int8": "int8"}
    if bf16:
        want.update({"diffusers-bf16": "bf16", "openvino-bf16": "bf16"})
    else:
        assert rows["openvino-bf16"]["status"] == "skipped" and "AVX512-BF16" in rows["openvino-bf16"]["reason"]
    for name, prec in want.items():
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["info"]["precision"] == prec and r["floor"]["precisions"]["step"] == prec
        assert r["vs_diffusers"]["latency_speedup"] > 0
        if bf16:
            assert r["vs_diffusers_bf16"]["latency_speedup"] > 0
    for name in ("openvino-fp32", "openvino-int8") + (("openvino-bf16",) if bf16 else ()):
        r = rows[name]
        assert r["first_compile"]["status"] == "ok" and r["info"]["compile_cache"]
        assert r["stages_s"]["step"] > 0 and "no AMX" in r["info"]["isa"] or "amx" in r["info"]["isa"]
    # the int8 row's floor: int8 UNet, bf16 or fp32 decode, fp32 projector
    f = rows["openvino-int8"]["floor"]["precisions"]
    assert f["project"] == "fp32" and f["decode"] == ("bf16" if bf16 else "fp32")
    # same identity, same noise: every fp32 row makes the same image up to rounding
    means = [rows[n]["image_mean"] for n in ("ort", "diffusers", "openvino-fp32")]
    assert max(means) - min(means) < 0.5
    _bench("report", "--results", out)
    md = (out / "RESULTS.md").read_text()
    assert "peak rates for the floor, TFLOP/s per precision" in md and "openvino-int8" in md
    assert ("vs diffusers bf16" in md) == bf16


def test_cpu_precision_fidelity_report(tiny_model_dir, ov_engines, tmp_path):
    """`cpu-precision`: OpenVINO bf16/int8 against the fp32 ONNX Runtime pipeline, with the issue's gates."""
    from arc2face_rt.backends.openvino import cpu_isa

    engines = ov_engines
    precs = "bf16,int8" if cpu_isa().bf16 else "int8"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-m", "benchmarks", "cpu-precision", "--model-dir", str(tiny_model_dir),
                        "--engines", str(engines), "--precisions", precs, "--identities", "2", "--steps", "25",
                        "--out", str(tmp_path), "--name", "f.json"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["kind"] == "cpu_precision" and set(res["precisions"]) == set(precs.split(","))
    for prec, r in res["precisions"].items():
        assert len(r["rows"]) == 2 and "arcface_cosine" not in r["median"]   # no face models in this folder
        g = r["gates"]["image_psnr_db"]
        assert g["passed"] == (r["median"]["image_psnr_db"] >= 30.0) and r["gates_passed"] == g["passed"]
        assert g["passed"], (prec, r["median"])        # tiny model: bf16 and int8 both within the gate
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("argv, where", [(["run", "--steps", "x"], "run: "), (["nope"], "")])
def test_bad_flag_is_one_line_naming_the_whole_tool(argv, where, capsys):
    from benchmarks.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"python -m benchmarks: error: {where}"), err


@pytest.mark.parametrize("argv", [
    ["run", "--steps", "0"], ["run", "--repeats", "0"], ["run", "--warmup", "-1"], ["run", "--batches", "0"],
    ["run", "--guidance", "nan"], ["run", "--row-timeout", "0"], ["run", "--peak-tflops", "-1"], ["run", "--out", ""],
    ["verify", "--engines", "e", "--repeats", "0"], ["demo", "-n", "0"], ["dataset", "--batch", "0"],
    ["quant", "--identities", "0"], ["build", "--opt-level", "6"], ["gpu-check", "--out", "o", "--warmup", "-1"],
    ["cpu-precision", "--steps", "0"], ["wheels", "--max-mib", "0"], ["run", "--name", "a/b.json"]])
def test_out_of_range_values_are_refused_while_parsing(argv, capsys):
    """Refused before any work (huntF #5: `run --steps 0` exported, ran every row, then exited 0)."""
    from benchmarks.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    flag = [a for a in argv if a.startswith("-") and not a[1:2].isdigit()][-1]
    assert e.value.code == 2 and len(err) == 1 and f"argument {flag}" in err[0], err


@pytest.fixture
def cli_main():
    """benchmarks.cli.main in this process, with the exporter's log level (which main raises) restored."""
    import logging

    from benchmarks.cli import main

    log = logging.getLogger("arc2face_export")
    level = log.level
    yield lambda *argv: main([str(a) for a in argv])
    log.setLevel(level)


@pytest.fixture
def bench_main(cli_main, monkeypatch):
    """cli_main with `verify` measuring nothing: its result is {"kind": "verify", "precision": "fp32"}."""
    import benchmarks.export_bench
    import benchmarks.verify_bench

    calls = []
    monkeypatch.setattr(benchmarks.verify_bench, "bench_verify",
                        lambda engines, repeats, say: calls.append(engines) or {"kind": "verify", "precision": "fp32"})
    monkeypatch.setattr(benchmarks.export_bench, "header", lambda: {"schema": 1})
    return cli_main, calls


@pytest.mark.parametrize("argv, says", [
    (["report", "--results", "{t}/nope"], "--results {t}/nope: no such folder"),
    (["verify", "--engines", "{t}/nope", "--out", "{t}/o", "--repeats", "1"], "{t}/nope: no such engines folder"),
    (["verify", "--engines", "{t}", "--out", "{t}/f.txt/o"], "--out {t}/f.txt/o: cannot be made: {t}/f.txt is a file"),
    (["export", "--precisions", "fp99", "--out", "{t}/o"], "--precisions: 'fp99' is not fp32 or fp16"),
    (["export", "--model-dir", "{t}/nope", "--out", "{t}/o"], "--model-dir {t}/nope: no arc2face/ in it"),
    (["build", "--engines", "{t}/nope", "--out", "{t}/o"], "--engines {t}/nope: no manifest.json"),
    (["cpu-precision", "--precisions", "bf16,fp99", "--out", "{t}/o"], "--precisions: 'fp99' is not one of"),
    (["cpu-precision", "--engines", "{t}", "--out", "{t}/o"], "--engines {t}: holds files but no manifest.json")])
def test_user_errors_are_one_line_and_exit_2(argv, says, cli_main, tmp_path, capsys):
    """huntF #6: a missing --results or --engines folder was a traceback (exit 1). `export` with a bad
    precision wrote a full-size random checkpoint into the repository first, then a result of failed runs
    (exit 1); `build` with a missing folder printed its message without the prefix (exit 1)."""
    (tmp_path / "f.txt").write_text("x")
    rc = cli_main(*(a.format(t=tmp_path) for a in argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"python -m benchmarks: error: {says.format(t=tmp_path)}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]       # nothing written, no --out made


def test_existing_name_is_refused_before_any_work_and_replaced_atomically_with_force(bench_main, tmp_path, capsys):
    """huntF #7: `--name FILE` replaced an existing file in --out, in place, without a word."""
    main, calls = bench_main
    mine = tmp_path / "mine.json"
    mine.write_text("precious\n")
    inode = mine.stat().st_ino
    assert main("verify", "--engines", tmp_path, "--out", tmp_path, "--name", "mine.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"python -m benchmarks: error: {mine}: exists; choose another --name or pass --force"
    assert mine.read_text() == "precious\n" and calls == []                # refused before measuring
    assert main("verify", "--engines", tmp_path, "--out", tmp_path, "--name", "mine.json", "--force") == 0
    assert json.loads(mine.read_text())["kind"] == "verify" and len(calls) == 1
    assert mine.stat().st_ino != inode                                     # a new file moved into place
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]           # no temporary file left


def test_default_names_stay_stamped_and_never_replace_each_other(bench_main, tmp_path, monkeypatch):
    """Two runs within the same second: the second gets -2 rather than being refused or replacing the first."""
    import benchmarks.cli

    main, _ = bench_main
    monkeypatch.setattr(benchmarks.cli, "_stamp", lambda: "20261126T000000Z")
    for force in ([], ["--force"]):                 # --force replaces a --name file only, never a stamped one
        assert main("verify", "--engines", tmp_path, "--out", tmp_path / "out", *force) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["verify-fp32-20261126T000000Z-2.json",
                                                                    "verify-fp32-20261126T000000Z.json"]
