"""The GPU-session tooling that can be checked without a GPU: wheels carried in pieces and `gpu-check`
phases writing their JSON (the GPU parts skip or report why)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _wheel(path: Path, payload_bytes: int) -> Path:
    """A minimal pure-Python wheel `tinypkg` whose module carries `payload_bytes` of incompressible data."""
    payload = random.Random(0).randbytes(payload_bytes)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("tinypkg/__init__.py", f"SIZE = {payload_bytes}\n")
        z.writestr("tinypkg/payload.bin", payload)
        z.writestr("tinypkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
        z.writestr("tinypkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr("tinypkg-1.0.dist-info/RECORD", "")
    return path


def test_wheels_travel_in_pieces_and_install_when_complete(tmp_path):
    from benchmarks.wheels import install, pack

    big = _wheel(tmp_path / "tinypkg-1.0-py3-none-any.whl", 600_000)
    folders = pack([big], tmp_path / "whl", max_mib=0.25)              # ~0.6 MB in 0.25 MiB folders
    assert len(folders) == 3 and all(sum(f.stat().st_size for f in d.iterdir()) <= 0.25 * 2**20 + 4096
                                     for d in folders)
    stash, site = tmp_path / "stash", tmp_path / "site"
    first = install(folders[2], stash, site)                           # any order
    assert first["installed"] == [] and len(first["waiting"][big.name]) == 2
    install(folders[0], stash, site)
    last = install(folders[1], stash, site)
    assert last["installed"] == [big.name]
    assert install(folders[1], stash, site)["already"] == [big.name]   # a repeated call installs nothing
    code = "import tinypkg, pathlib; print(tinypkg.SIZE, pathlib.Path(tinypkg.__file__).parent.joinpath('payload.bin').stat().st_size)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["600000", "600000"]


def test_gpu_check_phases_write_their_json_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    out, copies = tmp_path / "gc", tmp_path / "copies"
    p = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--out", str(out), "--copy-to", str(copies),
                        "--size", "tiny", "--phase", "probe,quant,row:trt,report"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    probe = json.loads((out / "probe.json").read_text())
    assert probe["status"] == "ok" and "gpus" in probe["machine"] and probe["onnxruntime"]["session_providers"]
    assert probe["tensorrt_unusable_reason"]                         # no GPU here: says why
    row = json.loads((out / "row-trt.json").read_text())["rows"][0]
    assert row["status"] == "skipped" and row["reason"]
    quant = json.loads((out / "quant.json").read_text())         # int8/FP8 step rows: pending here
    assert quant["status"] == "ok" and quant["skipped"] and quant["reason"].startswith("pending")
    summary = json.loads((out / "gpu-check-summary.json").read_text())
    assert summary["kind"] == "gpu-check" and "probe" in summary["phases"] and summary["run"].startswith("run-tiny-")
    assert sorted(f.name for f in copies.iterdir()) == sorted(
        ["probe.json", "quant.json", "row-trt.json", "gpu-check-summary.json", summary["run"]])
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--out", str(out), "--phase", "nope"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown phase 'nope'" in bad.stderr


def test_nvidia_libraries_are_linked_next_to_an_onnxruntime_installed_apart(tmp_path, monkeypatch):
    """onnxruntime.preload_dlls() searches the folder onnxruntime is installed in for nvidia/cu13, nvidia/cudnn."""
    from benchmarks.wheels import link_nvidia_libraries

    image = tmp_path / "image-site"
    (image / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (image / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(image))
    site = tmp_path / "site"
    linked = link_nvidia_libraries(site)
    assert sorted(Path(p).name for p in linked) == ["cu13", "cudnn"]
    assert (site / "nvidia" / "cu13" / "lib").is_dir() and (site / "nvidia" / "cu13").is_symlink()
    monkeypatch.syspath_prepend(str(site))
    assert link_nvidia_libraries(site) == []                         # idempotent


def test_the_quant_phase_times_fp8_at_quant_level_2_as_well(monkeypatch, tmp_path):
    """gpu-check's `quant` phase (a GPU with TensorRT; faked here down to the plan and the loop): fp16,
    int8, FP8 at level 3, then FP8 re-quantised at level 2, each compared with the fp16 plan."""
    import arc2face_export.quantize as quantize
    import arc2face_export.trt_build as trt_build
    import arc2face_rt.backends.trt as trt
    from arc2face_rt.backends import cuda

    import benchmarks.gpu_quant as gq

    quantised, built = [], []
    monkeypatch.setattr(trt, "unusable_reason", lambda: None)
    monkeypatch.setattr(trt, "import_trt", lambda: None)
    monkeypatch.setattr(cuda, "compute_capability", lambda: "9.0")
    monkeypatch.setattr(quantize, "ensure_quant_graphs",
                        lambda engines, recipes, cal, stages, device: quantised.append(
                            [(r.precision, r.level) for r in recipes]))

    folders = []

    def build(engines, stages, precision, options, force):
        folders.append(engines)
        built.append((precision, quantised[-1]))
        return {"plans": {"step_cfg": {"build_seconds": 1.0, "bytes": 2**20}}}

    class Session:
        engine = None

        def close(self):
            pass

    ms = {("fp16", None): 10.0, ("int8", 3.0): 6.0, ("fp8", 3.0): 5.0, ("fp8", 2.0): 8.0}

    def loop(sess, sched, cond, batch, guidance, repeats):
        prec, recipes = built[-1]
        level = None if prec == "fp16" else dict(recipes).get(prec)
        return np.full((batch, 4, 8, 8), ms[(prec, level)], np.float32), {"per_step_ms": ms[(prec, level)]}

    monkeypatch.setattr(trt_build, "build_engines", build)
    monkeypatch.setattr(trt, "open_session", lambda path: Session())
    monkeypatch.setattr(gq, "inspector_precisions", lambda engine, trt: {"layers": 1, "int8": 0, "fp8": 0})
    monkeypatch.setattr(gq, "time_denoise_loop", loop)
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "step_cfg.plan").write_bytes(b"the fp16 plan the trt row uses")
    out = gq.measure_quant_steps(engines, steps=2, batches=(1, 4), repeats=1, say=lambda m: None)
    assert (engines / "step_cfg.plan").read_bytes() == b"the fp16 plan the trt row uses"
    assert built and all(folder == tmp_path / "engines-quant" for folder in folders)
    assert quantised == [[("int8", 3.0), ("fp8", 3.0)], [("fp8", 2.0)]]
    assert list(out["precisions"]) == ["fp16", "int8", "fp8", "fp8-level2"]
    assert [out["precisions"][k]["quant_level"] for k in out["precisions"]] == [None, 3.0, 3.0, 2.0]
    for name, want in (("fp16", 1.0), ("int8", 10 / 6), ("fp8", 2.0), ("fp8-level2", 1.25)):
        for b in ("1", "4"):
            row = out["precisions"][name]["batches"][b]
            assert row["speedup_vs_fp16"] == pytest.approx(want)
            assert (row["latent_rel_l2_vs_fp16"] == 0) == (name == "fp16")


def test_source_digest_names_the_commit_whatever_git_says(monkeypatch, tmp_path):
    """A result records `git.source_sha256`; `benchmarks digest REV` gives the same digest for the commit
    whose sources ran, even where the copy's own git metadata is stale."""
    from benchmarks import env

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "runtime" / "pkg").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "runtime" / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "runtime" / "pkg" / "__init__.py").write_text("")
    (tmp_path / "tests" / "test_a.py").write_text("def test(): pass\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    monkeypatch.setattr(env, "REPO", tmp_path)
    first = env.source_digest()
    assert first == env.source_digest("HEAD")
    (tmp_path / "notes.txt").write_text("not a source file")
    (tmp_path / "runtime" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "runtime" / "pkg" / "__pycache__" / "a.py").write_text("cached")
    assert env.source_digest() == first
    (tmp_path / "runtime" / "pkg" / "a.py").write_text("A = 2\n")      # the files move on, git does not
    assert env.source_digest() != first and env.source_digest("HEAD") == first
    git("commit", "-qam", "two")
    assert env.source_digest("HEAD") == env.source_digest() and env.source_digest("HEAD~1") == first
    assert env.git_commit()["source_sha256"] == env.source_digest()
    assert env.source_digest("no-such-commit") is None


@pytest.fixture
def isolated_gpu_check(monkeypatch):
    """gpu_check() in this process: what it puts on the path and in the environment is undone after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("PYTHONPATH", "TORCHINDUCTOR_CACHE_DIR", "PYTHONUNBUFFERED", "ARC2FACE_ORT_FUSED"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if name == "ARC2FACE_ORT_FUSED":
            monkeypatch.delenv(name)


def test_a_fresh_machine_in_a_later_call_stops_at_install(tmp_path, isolated_gpu_check):
    """Call 2 on a machine that did not run call 1: the stash lacks call 1's pieces, which no later
    folder brings, so gpu-check says so and runs nothing else."""
    from benchmarks.gpu_check import GpuCheckOptions, gpu_check
    from benchmarks.wheels import install, pack

    folders = pack([_wheel(tmp_path / "tinypkg-1.0-py3-none-any.whl", 600_000)], tmp_path / "whl", max_mib=0.25)
    assert install(folders[0], tmp_path / "s1", tmp_path / "site1")["lost"] == []        # call 1: waits, nothing lost
    later = install(folders[1], tmp_path / "s2", tmp_path / "site2")
    assert later["lost"] and all(p in json.loads((folders[0] / "wheels.json").read_text())["folders"]
                                 for p in later["lost"])
    out = tmp_path / "gc"
    written = gpu_check(GpuCheckOptions(out=out, phases=("probe", "row:ort"), wheels=folders[1], size="tiny"))
    assert [p.name for p in written] == ["install.json"]
    inst = json.loads((out / "install.json").read_text())
    assert inst["status"] == "failed" and "fresh machine" in inst["error"] and "call 1" in inst["error"]


def test_ort_phases_without_an_export_fail_at_once(tmp_path, isolated_gpu_check):
    from benchmarks.gpu_check import GpuCheckOptions, gpu_check

    out = tmp_path / "gc"
    gpu_check(GpuCheckOptions(out=out, phases=("ort", "row:ort"), size="tiny"))
    for name in ("ort.json", "row-ort.json"):
        doc = json.loads((out / name).read_text())
        assert doc["status"] == "failed" and "no export.json" in doc["error"]
    assert not (out / "work" / "cache").exists()                   # nothing was exported inside the row


def test_row_ort_uses_the_plain_graphs_when_the_fused_ones_failed(tmp_path, monkeypatch, isolated_gpu_check):
    import benchmarks.harness as harness
    from benchmarks.gpu_check import GpuCheckOptions, phase_row

    out = tmp_path / "gc"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"status": "ok"}))
    seen, rows = [], []

    def run(opts, say=print):
        seen.append(os.environ.get("ARC2FACE_ORT_FUSED"))
        return {"rows": [rows.pop(0)], "libraries": {}}
    monkeypatch.setattr(harness, "run", run)
    opts = GpuCheckOptions(out=out, size="tiny")
    # the row fails in a fused graph: measured again with ARC2FACE_ORT_FUSED=0
    rows[:] = [{"status": "failed", "reason": "EngineMismatchError: step_cfg.ort-cuda.onnx: ... set "
                "ARC2FACE_ORT_FUSED=0 to use the plain graphs"}, {"status": "ok"}]
    res = phase_row(opts, out / "work", "ort")
    assert seen == [None, "0"] and res["status"] == "ok" and res["fused_graphs"].startswith("off: the row failed")
    # the ort phase already found them failing: plain from the start
    (out / "ort.json").write_text(json.dumps({"status": "ok", "variants": {
        "fused+graph": {"error": "INVALID_ARGUMENT x"}, "fused": {"error": "INVALID_ARGUMENT y"},
        "plain": {"batches": {"1": {}}}}}))
    seen.clear()
    rows[:] = [{"status": "ok"}]
    res = phase_row(opts, out / "work", "ort")
    assert seen == ["0"] and "INVALID_ARGUMENT y" in res["fused_graphs"]
    assert "ARC2FACE_ORT_FUSED" not in os.environ


def test_the_merged_run_keeps_each_rows_libraries(tmp_path):
    from benchmarks.gpu_check import GpuCheckOptions, phase_report

    out = tmp_path / "gc"
    out.mkdir()
    for backend, ort_version in (("diffusers", "1.30.0 (onnxruntime)"), ("ort", "1.31.1 (onnxruntime-gpu)")):
        (out / f"row-{backend}.json").write_text(json.dumps({
            "schema": 1, "kind": "run", "libraries": {"onnxruntime": ort_version}, "options": {"size": "tiny"},
            "device_kind": "cuda", "machine": {}, "rows": [{"backend": backend, "status": "skipped", "reason": "x"}]}))
    summary = phase_report(GpuCheckOptions(out=out, size="tiny"), out / "work", [])
    run = json.loads((out / summary["run"]).read_text())
    rows = {r["backend"]: r for r in run["rows"]}
    assert rows["ort"]["libraries"]["onnxruntime"] == "1.31.1 (onnxruntime-gpu)"
    assert rows["diffusers"]["libraries"]["onnxruntime"] == "1.30.0 (onnxruntime)"
    assert run["libraries"]["onnxruntime"] == "1.31.1 (onnxruntime-gpu)"


def test_the_merged_run_keeps_each_rows_batches_and_repeats_and_the_report_says_them(tmp_path):
    """Calls 1 and 6 of a session pass other --batches/--repeats/--row-timeout than call 5: the merged run
    took the first row's options for all, and RESULTS.md said 'median of 2' for rows measured 3 times."""
    from benchmarks.gpu_check import GpuCheckOptions, phase_report
    from benchmarks.report import run_section

    out = tmp_path / "gc"
    out.mkdir()
    for backend, batches, repeats in (("diffusers", [1, 4, 16], 2), ("torch-compile", [1, 16], 3)):
        (out / f"row-{backend}.json").write_text(json.dumps({
            "schema": 1, "kind": "run", "libraries": {}, "device_kind": "cuda", "machine": {},
            "options": {"size": "tiny", "steps": 2, "guidance": 3.0, "batches": batches, "repeats": repeats,
                        "row_timeout_s": 540.0 if repeats == 2 else 225.0, "compile_mode": "reduce-overhead"},
            "rows": [{"backend": backend, "status": "ok"}]}))
    summary = phase_report(GpuCheckOptions(out=out, size="tiny"), out / "work", [])
    run = json.loads((out / summary["run"]).read_text())
    rows = {r["backend"]: r["options"] for r in run["rows"]}
    assert rows["torch-compile"] == {"batches": [1, 16], "repeats": 3, "row_timeout_s": 225.0,
                                     "compile_mode": "reduce-overhead"}
    assert rows["diffusers"] == {"batches": [1, 4, 16], "repeats": 2, "row_timeout_s": 540.0}
    run["_file"] = summary["run"]
    header = run_section(run, None)[2]
    assert ("diffusers batches [1, 4, 16], median of 2, row timeout 540 s; torch-compile batches [1, 16], "
            "median of 3, row timeout 225 s") in header


def test_the_torch_compile_row_compiles_without_autotuning_at_every_batch_unless_asked(tmp_path):
    """max-autotune never compiled the UNet within 400 s on an H200, so the default is reduce-overhead, whose
    compiles take about a minute, at the row's batches; a slow mode is asked for with its own batches."""
    from benchmarks.cli import build_parser
    from benchmarks.gpu_check import GpuCheckOptions, _run_options

    args = build_parser().parse_args(["gpu-check", "--out", str(tmp_path), "--batches", "1,16"])
    assert (args.compile_mode, args.compile_batches) == ("reduce-overhead", None)
    opts = GpuCheckOptions(out=tmp_path, batches=args.batches, compile_mode=args.compile_mode,
                           compile_batches=args.compile_batches)
    ro = _run_options(opts, tmp_path, ["torch-compile"])
    assert (ro.batches, ro.compile_mode) == ((1, 16), "reduce-overhead")
    args = build_parser().parse_args(["gpu-check", "--out", str(tmp_path), "--compile-mode", "max-autotune",
                                      "--compile-batches", "1"])
    opts = GpuCheckOptions(out=tmp_path, compile_mode=args.compile_mode, compile_batches=args.compile_batches)
    assert _run_options(opts, tmp_path, ["torch-compile"]).batches == (1,)
    assert _run_options(opts, tmp_path, ["diffusers"]).batches == (1, 4, 16)


# On the device machines the repository is copied, not installed: `python3 -m benchmarks gpu-check`
# from its root must find arc2face_rt, arc2face_export and arc2face_ref by itself (one session's call 1
# failed at import, before gpu-check could put those folders on its path).
_NOT_INSTALLED = """
import importlib.util, runpy, sys
drop = ("runtime", "export", "reference")
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith(drop)]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
for name in [m for m in sys.modules if m.split(".")[0] in ("arc2face_rt", "arc2face_export", "arc2face_ref")]:
    del sys.modules[name]
importlib.invalidate_caches()
assert importlib.util.find_spec("arc2face_rt") is None, "the test could not hide the installed package"
sys.argv = ["benchmarks", "digest", "HEAD"]
runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
"""


def test_python_m_benchmarks_runs_from_a_repository_that_is_not_installed():
    p = subprocess.run([sys.executable, "-c", _NOT_INSTALLED], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.strip()) == 64, p.stdout
