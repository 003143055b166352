"""Cost of the export path (issue 2): `export_all` per precision, and the `arc2face-export demo`.

Each measured job runs in a child process of its own, so its peak RSS (ru_maxrss, the kernel's
high-water mark of the process) belongs to that job alone; wall time and CPU time (user + system)
come from the parent's clock and the child's rusage.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arc2face_rt.errors import InvalidInputError
from arc2face_rt.specs import PRECISIONS

from . import env

RESULTS = env.REPO / "benchmarks" / "results"
CACHE = env.REPO / "benchmarks" / ".cache"


def _child(code: str, timeout: float | None = None) -> dict:
    """Run python `code` in a child; return wall/CPU seconds, peak RSS, exit code, output tail and the
    JSON the child printed on its last stdout line (if any)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    envv = dict(os.environ, PYTHONPATH=os.pathsep.join([str(env.REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=env.REPO, capture_output=True, text=True,
                           timeout=timeout, env=envv)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", (e.stderr or "") if isinstance(e.stderr, str) else ""
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"returncode": rc, "wall_s": round(wall, 1),
           "cpu_user_s": round(after.ru_utime - before.ru_utime, 1),
           "cpu_system_s": round(after.ru_stime - before.ru_stime, 1)}
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if lines:
        try:
            res.update(json.loads(lines[-1]))
        except ValueError:
            pass
    if rc != 0:
        res["error_tail"] = (err or out)[-3000:]
    return res


def _why(res: dict) -> str:
    """': CAUSE' for a failed child job (its error, else the last line it printed on stderr), else ''."""
    if res.get("status") == "ok":
        return ""
    lines = str(res.get("error") or res.get("error_tail") or "").strip().splitlines()
    return f": {lines[-1][:300]}" if lines else ""


# A child job: imports, then `def job(out)` filling `out`; _JOB_END runs it and prints `out` as JSON
# with status, error, inner time and the child's peak RSS (the last stdout line, read by _child).
_JOB_END = """
out = {}
t0 = time.perf_counter()
try:
    job(out)
    out["status"] = "ok"
except BaseException as e:
    out["status"] = "failed"
    out["error"] = f"{type(e).__name__}: {e}"[:2000]
out["inner_s"] = round(time.perf_counter() - t0, 1)
out["peak_rss_mb"] = rss_high_water_mb()
print(json.dumps(out))
"""


def _job_code(template: str, **values) -> str:
    return template.format(**values) + _JOB_END


_EXPORT_CODE = """
import json, sys, time
from pathlib import Path
from arc2face_export.onnx_export import export_all
from benchmarks.env import rss_high_water_mb
def job(out):
    log = out["log"] = []
    t0 = time.perf_counter()
    def say(msg):
        log.append([round(time.perf_counter() - t0, 1), msg])
        print(msg, file=sys.stderr, flush=True)
    m = export_all({model!r}, {out!r}, precision={precision!r}, force=True, progress=say, validate={validate!r})
    out["stages"] = {{n: {{k: r[k] for k in ("export_s", "validation") if k in r}} for n, r in m["stages"].items()}}
    out["files_mb"] = {{p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(Path({out!r}).iterdir())
                       if p.is_file()}}
"""


def checkpoint(model_dir: Path | None, size: str, say=print) -> Path:
    """The checkpoint a benchmark starts from, as an absolute path: `--model-dir` when given (it must hold
    arc2face/: a wrong folder is refused, never filled), else a random-weight one in the benchmark cache,
    written on first use."""
    if model_dir is not None:
        if not (model_dir / "arc2face").is_dir():
            raise InvalidInputError(f"--model-dir {model_dir}: no arc2face/ in it (not a checkpoint folder); leave "
                                    "--model-dir out for a random-weight checkpoint in the benchmark cache")
        return model_dir.resolve()
    return random_checkpoint(CACHE, size, say)


def random_checkpoint(cache: Path, size: str, say=print) -> Path:
    """`cache`/model-SIZE: the seed-0 random-weight checkpoint, written on first use (`say` hears it).
    The writer renames the whole folder into place at the end, so its RANDOM_WEIGHTS.txt marks a
    finished one; a folder of anything else there is refused by the writer, never filled."""
    model_dir = cache / f"model-{size}"
    if not (model_dir / "RANDOM_WEIGHTS.txt").is_file():
        from arc2face_ref.random_ckpt import write_random_checkpoint

        write_random_checkpoint(model_dir, size=size, seed=0, force=model_dir.exists(), say=say)
    return model_dir


def bench_export(size: str, precisions: tuple[str, ...], model_dir: Path | None, out_root: Path,
                 timeout: float | None = None, say=print) -> dict:
    for spec in precisions:        # before anything is written: a bad one cost a full-size checkpoint first
        if spec.partition(":")[0] not in PRECISIONS or spec.partition(":")[2] not in ("", "novalidate"):
            raise InvalidInputError(f"--precisions: {spec!r} is not {' or '.join(PRECISIONS)} (optionally with "
                                    ":novalidate)")
    # absolute: the child runs in the repository, not in this process's working folder
    model_dir, out_root = checkpoint(model_dir, size, say), out_root.resolve()
    runs = []
    for spec in precisions:      # "fp16" or "fp16:novalidate" (export only, no onnxruntime check)
        precision, _, flag = spec.partition(":")
        validate = flag != "novalidate"
        out_dir = out_root / f"engines-{size}-{precision}"
        say(f"export_all {size} {precision} (validate={validate}) -> {out_dir}")
        res = _child(_job_code(_EXPORT_CODE, model=str(model_dir), out=str(out_dir), precision=precision,
                                         validate=validate), timeout)
        res.update(precision=precision, validate=validate)
        res.setdefault("status", "failed" if res["returncode"] != 0 else "ok")
        say(f"  {precision}: {res['status']} in {res['wall_s']} s, peak RSS {res.get('peak_rss_mb')} MB"
            + _why(res))
        runs.append(res)
    return {"kind": "export", "size": size, "model_dir": str(model_dir),
            "model_mb": round(sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 2**20, 1),
            "runs": runs}


_DEMO_CODE = """
import json, sys
from arc2face_export.cli import main
from benchmarks.env import rss_high_water_mb
rc = main(["demo", "--out", {out!r}, "--size", {size!r}, "-n", "{n}", "--steps", "{steps}"])
print(json.dumps({{"cli_returncode": rc, "peak_rss_mb": rss_high_water_mb()}}))
"""


def bench_demo(size: str = "tiny", num_images: int = 4, steps: int = 25, say=print) -> dict:
    """`arc2face-export demo` from nothing (checkpoint + export + generate), then again (reusing the
    checkpoint and export: generation alone), each in a fresh process."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="a2f-demo-") as tmp:
        for label in ("first run (random checkpoint + ONNX export + generate)",
                      "second run (reuses checkpoint and export: generate only)"):
            say(f"demo {size}: {label}")
            res = _child(_DEMO_CODE.format(out=tmp, size=size, n=num_images, steps=steps))
            res["run"] = label
            res["status"] = "ok" if res["returncode"] == 0 and res.get("cli_returncode") == 0 else "failed"
            res["cpu_s"] = round(res["cpu_user_s"] + res["cpu_system_s"], 1)
            say(f"  {res['status']}: wall {res['wall_s']} s, CPU {res['cpu_s']} s, peak RSS {res.get('peak_rss_mb')} MB")
            runs.append(res)
    return {"kind": "demo", "size": size, "num_images": num_images, "steps": steps,
            "command": f"arc2face-export demo --size {size} -n {num_images} --steps {steps}", "runs": runs}


def header() -> dict:
    return {"schema": 1, "created": env.now_utc(), "git": env.git_commit(), "machine": env.machine_info(),
            "libraries": env.library_versions()}


_BUILD_CODE = """
import json, logging, sys, time
from arc2face_export.trt_build import BuildOptions, build_engines
from benchmarks.env import rss_high_water_mb
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
def job(out):
    m = build_engines({engines!r}, precision={precision!r}, options=BuildOptions(opt_level={opt_level}), force=True)
    out["plans"] = {{n: {{"build_s": round(r["build_seconds"], 1), "plan_mb": round(r["bytes"] / 2**20, 1),
                         "library": r["library"], "compute_capabilities": r["compute_capabilities"],
                         "profile": r["build"]["profile"]}}
                    for n, r in m["plans"].items()}}
"""


def bench_build(size: str, precision: str, engines_dir: Path | None, opt_level: int = 3,
                timeout: float | None = None, say=print) -> dict:
    """`build_engines` (every stage, forced) on an exported engines folder, in a child process: per-plan
    build seconds and size, total wall/CPU time and peak RSS. The folder comes from `export` (int8: from
    fp16 plus `arc2face-export build-engines --precision int8` having written the Q/DQ graphs)."""
    given = engines_dir
    engines_dir = (engines_dir or CACHE / f"engines-{size}-{'fp16' if precision == 'int8' else precision}").resolve()
    if not (engines_dir / "manifest.json").is_file():
        raise InvalidInputError(f"--engines {given}: no manifest.json (not an exported engines folder)"
                                if given is not None else f"{engines_dir}: no exported engines folder; run `python -m "
                                f"benchmarks export --size {size} --precisions {precision}` first, or pass --engines")
    say(f"build_engines {engines_dir} ({precision}, opt level {opt_level})")
    res = _child(_job_code(_BUILD_CODE, engines=str(engines_dir), precision=precision, opt_level=opt_level), timeout)
    res.setdefault("status", "failed" if res["returncode"] != 0 else "ok")
    say(f"  {res['status']} in {res['wall_s']} s, peak RSS {res.get('peak_rss_mb')} MB" + _why(res))
    for name, p in res.get("plans", {}).items():
        say(f"  {name}: {p['build_s']} s, {p['plan_mb']} MiB")
    return {"kind": "build", "size": size, "precision": precision, "opt_level": opt_level,
            "engines_dir": str(engines_dir), "runs": [res]}
