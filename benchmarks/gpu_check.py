"""`python -m benchmarks gpu-check --out DIR`: everything a first GPU session should run, in phases.

    install     (with --wheels DIR, always first) add a folder of wheels from `benchmarks wheels` and
                install the wheels it completes; `--phase install` does only that. Pieces an
                earlier folder brought, missing here (a fresh machine), fail it and stop the call
    probe       GPU name, compute capability, driver; library versions; where ONNX Runtime really runs;
                whether TensorRT can run here and why not
    tests       the `gpu`-marked tests (simulated TensorRT engine on CuPy, ONNX Runtime CUDA parity), and
                the simulated engine's capture/replay timing (benchmarks/gpu_sim.py)
    export      random-weight checkpoint of --size and its fp16 ONNX export, with the ONNX Runtime CUDA
                graphs of step_cfg and the VAE (`--ort-cuda`; cached under DIR/work)
    ort         ONNX Runtime CUDA step loop at full size: fused (`--ort-cuda`) or plain graph, CUDA graph
                on/off, convolution search; per-step time; the VAE decode per variant, with a profile
                (needs DIR/export.json from the export phase; so does row:ort)
    write       images/s as `generate` and `dataset` write them against the pipeline alone, on the
                export's engines (benchmarks/dataset_bench.py; needs DIR/export.json)
    quant       int8 / FP8 (cc >= 8.9) step_cfg plans vs fp16: build time, plan size, inspector layer
                precisions, per-step time, latent drift (benchmarks/gpu_quant.py; skipped, pending,
                where TensorRT cannot run, e.g. TensorRT-RTX on an H100)
    row:NAME    one harness row (diffusers, torch-compile, ort, trt) at --batches, --steps, --guidance
    report      merges the rows into one run JSON (harness schema) and its PNG chart, plus a summary

Each phase writes DIR/<phase>.json as soon as it ends, so phases can run as separate calls of at most
a few minutes into the same DIR (a later timeout loses nothing), and `--copy-to` copies the files a
call wrote to where they are collected. `--phase all` runs them in order (under 25 minutes on an
H100 is the design target). Packages come from `--wheels` (installed into DIR/work/site, which is put
on the path of this process and its children); the repository's runtime/export/reference folders
are put on the path too, so nothing needs `pip install -e` there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import env

ROWS = ("diffusers", "torch-compile", "ort", "trt")
PHASES = ("probe", "tests", "export", "ort", "write", "quant") + tuple(f"row:{r}" for r in ROWS) + ("report",)
ALIASES = {"all": PHASES, "rows": tuple(f"row:{r}" for r in ROWS)}


@dataclass(frozen=True)
class GpuCheckOptions:
    """One `gpu-check` call; each field is one flag."""
    out: Path
    phases: tuple[str, ...] = PHASES
    wheels: Path | None = None
    copy_to: Path | None = None
    size: str = "full"
    device: str = "cuda"
    batches: tuple[int, ...] = (1, 4, 16)
    steps: int = 25
    guidance: float = 3.0
    repeats: int = 3
    warmup: int = 1
    row_timeout_s: float = 540.0
    tests_timeout_s: float = 480.0
    # reduce-overhead: Inductor kernels and CUDA graphs without autotuning. On an H200 it compiled the UNet in
    # 59 s and the VAE decoder in 17 s; max-autotune had not compiled the UNet after 480, 200 and 400 s.
    compile_mode: str = "reduce-overhead"
    # row:torch-compile: None = the row's batches (each new batch shape is another compile of the UNet and
    # the VAE decoder; with max-autotune pass (1,), since each is then many minutes)
    compile_batches: tuple[int, ...] | None = None


def parse_phases(text: str) -> tuple[str, ...]:
    out = []
    for p in (t.strip() for t in text.split(",") if t.strip()):
        if p == "install":                 # only the --wheels install, which every call does first anyway
            continue
        for q in ALIASES.get(p, (p,)):
            if q not in PHASES:
                raise ValueError(f"unknown phase {q!r}; phases: {', '.join(PHASES)}, or all, rows, install")
            out.append(q)
    return tuple(dict.fromkeys(out))


def _setup_paths(work: Path) -> None:
    """Installed wheels and the repository's packages first on this process's path and its children's."""
    paths = [str(work / "site"), *(str(env.REPO / d) for d in env.PACKAGE_DIRS), str(env.REPO)]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + old)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))   # compile results survive calls
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _write(opts: GpuCheckOptions, name: str, data: dict, written: list) -> Path:
    path = opts.out / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    _keep(opts, path, written)
    return path


def _keep(opts: GpuCheckOptions, path: Path, written: list) -> None:
    """Note a written file and copy it to --copy-to at once: a call stopped later still returns it."""
    written.append(path)
    if opts.copy_to is not None:
        opts.copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, opts.copy_to / path.name)


def _say(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- phases

def phase_probe(opts: GpuCheckOptions, work: Path) -> dict:
    out = {"machine": env.machine_info(), "libraries": env.library_versions(), "python": sys.version}
    from arc2face_rt.backends import cuda
    out["cuda_python_devices"] = cuda.device_count()
    if out["cuda_python_devices"]:
        out["cuda"] = {"name": cuda.device_name(), "compute_capability": cuda.compute_capability()}
    try:
        import onnxruntime as ort
        out["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__,
                              "available_providers": ort.get_available_providers()}
        out["onnxruntime"]["session_providers"] = _ort_session_providers(work)
    except Exception as e:  # noqa: BLE001 - a probe reports, it does not stop
        out["onnxruntime_error"] = f"{type(e).__name__}: {e}"
    from arc2face_rt.backends.trt import unusable_reason
    out["tensorrt_unusable_reason"] = unusable_reason()
    for name in ("torch", "cupy", "diffusers"):
        try:
            mod = __import__(name)
            out[name] = {"version": mod.__version__, "file": mod.__file__}
            if name == "torch":
                out[name].update(cuda=mod.version.cuda, available=mod.cuda.is_available())
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _ort_session_providers(work: Path) -> list[str]:
    """What a CUDA session really runs on (ONNX Runtime drops CUDA silently when its libraries fail)."""
    import onnx
    from onnx import TensorProto, helper

    path = work / "probe-add.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9                     # readable by every onnxruntime the project supports
    onnx.save(model, str(path))
    from arc2face_rt.backends.ort import OrtSession
    return OrtSession(path, device="auto").providers


def phase_tests(opts: GpuCheckOptions, work: Path) -> dict:
    junit = work / "tests-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={junit}", str(env.REPO / "tests")]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=env.REPO, capture_output=True, text=True, timeout=opts.tests_timeout_s)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-6000:]
    out = {"returncode": rc, "wall_s": round(time.perf_counter() - t, 1), "output_tail": tail,
           "junit": _junit_summary(junit)}
    try:
        from .gpu_sim import measure_sim_loop
        out["simulated_engine_loop"] = measure_sim_loop(steps=25)
    except Exception as e:  # noqa: BLE001
        out["simulated_engine_loop"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    import xml.etree.ElementTree as ET

    cases = list(ET.parse(path).getroot().iter("testcase"))
    res = {"passed": [], "failed": [], "skipped": []}
    for c in cases:
        name = f"{c.get('classname')}::{c.get('name')}"
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            res["failed"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif c.find("skipped") is not None:
            res["skipped"].append({"test": name, "reason": (c.find("skipped").get("message") or "")[:200]})
        else:
            res["passed"].append(name)
    return {"counts": {k: len(v) for k, v in res.items()}, **res}


# what each call may set apart and a merged run keeps per row (the run's own options are the first row's;
# the compile mode only on the torch-compile row)
ROW_OPTIONS = ("batches", "repeats", "warmup", "row_timeout_s", "compile_mode")


def _run_options(opts: GpuCheckOptions, work: Path, backends=()):
    from .harness import RunOptions
    batches = opts.compile_batches if tuple(backends) == ("torch-compile",) and opts.compile_batches else opts.batches
    return RunOptions(size=opts.size, backends=tuple(backends), batches=batches, steps=opts.steps,
                      guidance=opts.guidance, repeats=opts.repeats, warmup=opts.warmup, device=opts.device,
                      precision="fp16" if opts.device == "cuda" else "fp32", cache_dir=str(work / "cache"),
                      compile_mode=opts.compile_mode, row_timeout_s=opts.row_timeout_s)


def phase_export(opts: GpuCheckOptions, work: Path) -> dict:
    from .harness import _prepare_engines, _prepare_model
    ro = _run_options(opts, work)
    t = time.perf_counter()
    model_dir, missing = _prepare_model(ro, _say)
    if missing:
        raise RuntimeError(missing)
    t_model = time.perf_counter() - t
    engines = _prepare_engines(ro, model_dir, ro.precision, "onnx", _say, device=opts.device)
    import resource

    from arc2face_rt.manifest import load_manifest
    m = load_manifest(engines)
    return {"model_dir": str(model_dir), "engines_dir": str(engines), "checkpoint_s": round(t_model, 1),
            "export_s": round(time.perf_counter() - t - t_model, 1), "precision": ro.precision,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "stages_export_s": {k: v.get("export_s") for k, v in m["stages"].items()},
            "ort_cuda": {k: {kk: v.get(kk) for kk in ("export_s", "fused", "not_fused", "no_op_casts_removed",
                                                     "source_validation")}
                         for k, v in m.get("ort_cuda", {}).items()},
            "ort_cuda_skipped": m.get("ort_cuda_skipped", {})}


def _need_export(opts: GpuCheckOptions) -> None:
    """The `ort` and `write` phases and `row:ort` measure DIR's export (the `export` phase, this call or an earlier
    one): without a good one, fail at once instead of exporting for minutes inside the row."""
    f = opts.out / "export.json"
    status = json.loads(f.read_text()).get("status") if f.is_file() else None
    if status != "ok":
        why = "no export.json" if status is None else f"export.json says {status}"
        raise RuntimeError(f"{opts.out}: {why}; run the export phase first (in a call sequence on a lent machine "
                           "this means a fresh machine or a failed call 1: start again from call 1)")


def phase_ort(opts: GpuCheckOptions, work: Path) -> dict:
    from .gpu_ort import measure_ort_loop, measure_vae_decode
    _need_export(opts)
    ro = _run_options(opts, work)
    engines = Path(ro.cache_dir) / f"engines-{opts.size}-{ro.precision}"
    res = measure_ort_loop(engines, opts.steps, opts.guidance, batches=(1, 4), repeats=opts.repeats,
                           device=opts.device)
    res["vae_decode"] = measure_vae_decode(engines, batches=(1, 4), repeats=opts.repeats, device=opts.device)
    return res


def phase_write(opts: GpuCheckOptions, work: Path) -> dict:
    """One identity x 4 batches of the largest --batches per mode, once: each run writes three batches
    while the next is generated and the last one in the open, as any run's end. The plain graphs
    (ARC2FACE_ORT_FUSED=0) where this DIR's `ort` phase or `row:ort` went without the fused ones, or
    once more when this phase fails in a fused graph; `fused_graphs` says which and why."""
    from .dataset_bench import bench_dataset
    from .gpu_ort import env_set, fused_note, fused_off_before
    _need_export(opts)
    export = json.loads((opts.out / "export.json").read_text())
    fused_off = fused_off_before(opts.out, rows=True)

    def measure():
        with env_set("ARC2FACE_ORT_FUSED", "0" if fused_off else None):
            return bench_dataset(opts.size, identities=1, per_identity=4 * max(opts.batches), steps=opts.steps,
                                 batch=max(opts.batches), repeats=1, say=_say, engines=Path(export["engines_dir"]),
                                 model_dir=Path(export["model_dir"]), device=opts.device, guidance=opts.guidance)
    try:
        res = measure()
    except Exception as e:  # noqa: BLE001 - a fused graph that fails: measured once more, plainly
        if fused_off or "ARC2FACE_ORT_FUSED=0" not in str(e):
            raise
        fused_off = f"the phase failed in a fused graph: {str(e)[:500]}"
        _say(f"write: {fused_off}; measuring it again with the plain graphs")
        res = measure()
    res["fused_graphs"] = fused_note(fused_off)
    return res


def phase_quant(opts: GpuCheckOptions, work: Path) -> dict:
    from .gpu_quant import measure_quant_steps
    ro = _run_options(opts, work)
    return measure_quant_steps(Path(ro.cache_dir) / f"engines-{opts.size}-{ro.precision}", opts.steps, opts.guidance,
                               batches=(1, 4), repeats=opts.repeats, device=opts.device, say=_say)


def phase_row(opts: GpuCheckOptions, work: Path, backend: str) -> dict:
    """One harness row; the phase's status is the row's ("skipped" with its reason counts as done).

    `row:ort` runs with the plain graphs (ARC2FACE_ORT_FUSED=0) when this DIR's `ort` phase found that
    the fused `--ort-cuda` graphs do not run here, or when the row itself fails in a fused graph (it is
    then measured once more, plainly); `fused_graphs` in the result says which and why."""
    from .gpu_ort import env_set, fused_note, fused_off_before
    from .harness import run
    if backend == "ort":
        _need_export(opts)
    fused_off = fused_off_before(opts.out) if backend == "ort" else None
    with env_set("ARC2FACE_ORT_FUSED", "0" if fused_off else None):
        res = run(_run_options(opts, work, (backend,)), say=_say)
    row = res["rows"][0]
    if backend == "ort" and not fused_off and row["status"] == "failed" and "ARC2FACE_ORT_FUSED=0" in str(row):
        fused_off = f"the row failed in a fused graph: {row.get('reason', '')[:500]}"
        _say(f"row:ort: {fused_off}; measuring it again with the plain graphs")
        with env_set("ARC2FACE_ORT_FUSED", "0"):
            res = run(_run_options(opts, work, (backend,)), say=_say)
        row = res["rows"][0]
    if backend == "ort":
        res["fused_graphs"] = fused_note(fused_off)
    res["status"] = "ok" if row["status"] in ("ok", "skipped") else row["status"]
    return res


def phase_report(opts: GpuCheckOptions, work: Path, written: list) -> dict:
    from .harness import _add_baseline
    from .report import chart

    docs = [json.loads((opts.out / f"row-{b}.json").read_text()) for b in ROWS if (opts.out / f"row-{b}.json").is_file()]
    summary = {"kind": "gpu-check", "created": env.now_utc(), "phases": {}}
    for p in ("install", "probe", "tests", "export", "ort", "write", "quant"):
        f = opts.out / f"{p}.json"
        if f.is_file():
            summary["phases"][p] = json.loads(f.read_text())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if docs:
        run = dict(docs[0])
        for d in docs:                     # each row ran in its own call, maybe with other libraries and options
            for r in d["rows"]:
                r.setdefault("libraries", d.get("libraries"))
                r.setdefault("options", {k: d["options"][k] for k in ROW_OPTIONS if k in d.get("options", {})
                                         and (k != "compile_mode" or r.get("backend") == "torch-compile")})
        run["rows"] = [r for d in docs for r in d["rows"]]
        run["libraries"] = docs[-1].get("libraries")     # the last call's (the earlier ones are in the rows)
        for r in run["rows"]:
            r.pop("vs_diffusers", None)
        _add_baseline(run["rows"])
        run["created"], run["git"] = env.now_utc(), env.git_commit()
        run["options"] = {**run["options"], "backends": [r["backend"] for r in run["rows"]]}
        name = f"run-{opts.size}-{run['device_kind']}-{stamp}.json"
        path = _write(opts, name, run, written)
        png = path.with_suffix(".png")
        run["_file"] = name
        if chart(run, png):
            _keep(opts, png, written)
        summary["run"] = name
    return summary


def gpu_check(opts: GpuCheckOptions) -> list[Path]:
    """Run the phases; return the files written (each also copied to `copy_to` as soon as it is written)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.out / "work"
    work.mkdir(exist_ok=True)
    written: list[Path] = []
    phases = list(opts.phases)
    if opts.wheels is not None:
        from .wheels import install, link_nvidia_libraries
        phases.insert(0, "install")
    _setup_paths(work)
    for phase in phases:
        _say(f"phase {phase}")
        t = time.perf_counter()
        try:
            if phase == "install":
                data = install(opts.wheels, work / "wheels", work / "site")
                data["nvidia_libraries_linked"] = link_nvidia_libraries(work / "site")
                prev = opts.out / "install.json"
                if prev.is_file():
                    data["earlier"] = json.loads(prev.read_text())
                if data.get("lost"):
                    data["status"] = "failed"
                    data["error"] = (f"fresh machine: pieces the earlier calls brought are gone ({', '.join(data['lost'])}); "
                                     "the earlier calls' state (DIR/work) did not survive: start again from call 1")
            elif phase == "report":
                data = phase_report(opts, work, written)
            elif phase.startswith("row:"):
                data = phase_row(opts, work, phase[4:])
            else:
                data = globals()[f"phase_{phase}"](opts, work)
            data.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 - a phase that fails is recorded; the next one still runs
            import traceback
            data = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        data["phase_wall_s"] = round(time.perf_counter() - t, 1)
        name = {"report": "gpu-check-summary.json"}.get(phase, f"{phase.replace(':', '-')}.json")
        _write(opts, name, data, written)
        _say(f"phase {phase}: {data['status']} in {data['phase_wall_s']} s -> {opts.out / name}")
        if phase == "install" and data.get("lost"):
            _say(f"stopping: {data['error']}")
            break
    return written
