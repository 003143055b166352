"""`python -m benchmarks`: run | report | export | demo | build | quant | verify | gpu-check | wheels | digest |
cpu-precision | control | dataset (and the internal `_row` child, not listed)."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

from arc2face_rt import argtypes
from arc2face_rt.exits import run_cli
from arc2face_rt.pipeline import MAX_GUIDANCE

from . import env
from .result_file import add_result_flags, check_result_path, write_from_args

RESULTS = env.REPO / "benchmarks" / "results"
CACHE = env.REPO / "benchmarks" / ".cache"
PROG = "python -m benchmarks"     # as a user types it: the prefix of every error line
ALL_BACKENDS = ("ort", "torch", "torch-compile", "diffusers", "diffusers-bf16", "trt", "openvino-fp32", "openvino-bf16",
                "openvino-int8")


def _say(msg: str) -> None:
    print(f"benchmarks: {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


# flag types: a value out of range is refused while parsing, in one line, before any work
STEPS = argtypes.count(1, 1000, "a number of steps")
GUIDANCE = argtypes.number(0, MAX_GUIDANCE, "a CFG scale")
REPEATS = argtypes.count(1, 10_000, "a number of repeats")
WARMUP = argtypes.count(0, 1000, "a number of runs")
IDENTITIES = argtypes.count(1, 4096, "a number of identities")
SECONDS = argtypes.number(1, 1e6, "a number of seconds")


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def cmd_run(args) -> int:
    from .harness import RunOptions, run

    if args.smoke:
        args.size, args.steps, args.batches, args.repeats, args.warmup = "tiny", 2, (1,), 1, 0
    opts = RunOptions(size=args.size, backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                      batches=args.batches, steps=args.steps, guidance=args.guidance, repeats=args.repeats,
                      warmup=args.warmup, device=args.device, precision=args.precision,
                      model_dir=str(args.model_dir) if args.model_dir else None,
                      engines_dir=str(args.engines) if args.engines else None,
                      cache_dir=str(args.cache), compile_on_cpu=args.compile_on_cpu,
                      compile_mode=args.compile_mode, peak_tflops=args.peak_tflops,
                      row_timeout_s=args.row_timeout, smoke=args.smoke)
    result = run(opts, say=_say)
    path = write_from_args(args, result, f"run-{opts.size}-{result['device_kind']}-{_stamp()}.json")
    _say(f"wrote {path}")
    for row in result["rows"]:
        lat = row.get("latency_s", {}).get("median") if row["status"] == "ok" else None
        _say(f"  {row['backend']:14s} {row['status']:8s} "
             + (f"batch-1 latency {lat:.3f} s" if lat is not None else row.get("reason", "")[:150]))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    md, charts = write_report(Path(args.results), say=_say)
    import importlib.util

    why = "matplotlib not installed" if importlib.util.find_spec("matplotlib") is None else "no complete run result"
    _say(f"wrote {md}" + (f" and {len(charts)} chart(s)" if charts else f" (no chart: {why})"))
    return 0


def cmd_export(args) -> int:
    from .export_bench import bench_export, header

    res = bench_export(args.size, tuple(args.precisions.split(",")), args.model_dir, Path(args.cache),
                       timeout=args.timeout, say=_say)
    path = write_from_args(args, {**header(), **res}, f"export-{args.size}-{_stamp()}.json")
    _say(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


def cmd_demo(args) -> int:
    from .export_bench import bench_demo, header

    res = bench_demo(args.size, args.num_images, args.steps, say=_say)
    path = write_from_args(args, {**header(), **res}, f"demo-{args.size}-{_stamp()}.json")
    _say(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


def cmd_control(args) -> int:
    from .control_bench import bench_control
    from .export_bench import header

    res = bench_control(args.size, args.batches, args.repeats, args.device, args.cache, say=_say)
    path = write_from_args(args, {**header(), **res}, f"control-{args.size}-{_stamp()}.json")
    _say(f"wrote {path}")
    return 0


def cmd_build(args) -> int:
    from .export_bench import bench_build, header

    res = bench_build(args.size, args.precision, args.engines, args.opt_level, timeout=args.timeout, say=_say)
    path = write_from_args(args, {**header(), **res}, f"build-{args.size}-{args.precision}-{_stamp()}.json")
    _say(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


def cmd_quant(args) -> int:
    from .export_bench import header
    from .quant_quality import bench_quant

    precisions = tuple(p for p in args.precisions.split(",") if p)
    res = bench_quant(args.size, precisions, args.identities, args.steps, args.guidance, args.calib_identities,
                      args.model_dir, args.engines, args.fp32_engines, build=not args.no_build,
                      residual_qdq=args.residual_qdq, level=args.quant_level, say=_say)
    path = write_from_args(args, {**header(), **res}, f"quant-{args.size}-{_stamp()}.json")
    for p, r in res["precisions"].items():
        _say(f"{p}: medians " + ", ".join(f"{k} {v:.4g}" for k, v in r["median"].items())
             + f"; gates {'passed' if r['gates_passed'] else 'FAILED'}")
    _say(f"wrote {path}")
    return 0


def cmd_verify(args) -> int:
    from .export_bench import header
    from .verify_bench import bench_verify

    res = bench_verify(args.engines, repeats=args.repeats, say=_say)
    path = write_from_args(args, {**header(), **res}, f"verify-{res['precision']}-{_stamp()}.json")
    _say(f"wrote {path}")
    return 0


def cmd_gpu_check(args) -> int:
    from .gpu_check import GpuCheckOptions, gpu_check, parse_phases

    try:
        phases = parse_phases(args.phase)
    except ValueError as e:
        _say(str(e))
        return 2
    opts = GpuCheckOptions(out=args.out, phases=phases, wheels=args.wheels, copy_to=args.copy_to, size=args.size,
                           device=args.device, batches=args.batches, steps=args.steps, guidance=args.guidance,
                           repeats=args.repeats, warmup=args.warmup, row_timeout_s=args.row_timeout,
                           compile_mode=args.compile_mode, compile_batches=args.compile_batches)
    written = gpu_check(opts)
    statuses = {}
    for p in written:
        if p.suffix == ".json":
            statuses[p.name] = json.loads(p.read_text()).get("status", "ok")
    _say("wrote " + ", ".join(f"{n} ({s})" for n, s in statuses.items()))
    return 0 if all(s == "ok" for s in statuses.values()) else 1


def cmd_wheels(args) -> int:
    from .wheels import DEFAULT_PACKAGES, download, pack

    wheels = download(args.packages or DEFAULT_PACKAGES, args.out / "download", python=args.python)
    for d in pack(wheels, args.out, args.max_mib):
        size = sum(f.stat().st_size for f in d.iterdir()) / 2**20
        _say(f"{d}: {size:.1f} MiB: {', '.join(sorted(f.name for f in d.iterdir()))}")
    return 0


def cmd_cpu_precision(args) -> int:
    from .cpu_precision import bench_cpu_precision
    from .export_bench import header

    res = bench_cpu_precision(args.size, tuple(args.precisions.split(",")), args.identities, args.steps,
                              args.guidance, args.model_dir, args.engines, say=_say)
    path = write_from_args(args, {**header(), **res}, f"cpu-precision-{args.size}-{_stamp()}.json")
    _say(f"wrote {path}; " + "; ".join(f"{p}: " + ", ".join(f"{k} {v:.4g}" for k, v in r["median"].items())
                                       + (" (gates passed)" if r["gates_passed"] else " (GATES FAILED)")
                                       for p, r in res["precisions"].items()))
    return 0 if all(r["gates_passed"] for r in res["precisions"].values()) else 1


def cmd_dataset(args) -> int:
    from .dataset_bench import bench_dataset
    from .export_bench import header

    res = bench_dataset(args.size, args.identities, args.per_identity, args.steps, args.batch, args.repeats, say=_say)
    path = write_from_args(args, {**header(), **res}, f"dataset-{args.size}-{_stamp()}.json")
    _say(f"wrote {path}; " + ", ".join(f"{m} {r['images_per_s']:.3f} images/s ({r['images_per_s_vs_pipeline']:.2f}x "
                                       f"pipeline; vs generate: wall {o['wall']:+.1f}%, CPU {o['cpu']:+.1f}%)"
                                       for m, r in res["modes"].items() for o in [r["overhead_vs_generate_pct"]]))
    return 0


def cmd_row(args) -> int:
    from .harness import row_main

    return row_main(Path(args.config), Path(args.result))


def build_parser() -> argparse.ArgumentParser:
    p = argtypes.Parser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="measure backend rows; write one JSON under --out")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="random-weight model size (full: exact SD1.5/CLIP-L architectures, real FLOPs)")
    r.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help=f"comma-separated rows (default all: {','.join(ALL_BACKENDS)})")
    r.add_argument("--batches", type=_ints, default=(1, 4, 8, 16), help="throughput batch sizes (default 1,4,8,16)")
    r.add_argument("--steps", type=STEPS, default=25, help="DPM-Solver++ steps (default 25)")
    r.add_argument("--guidance", type=GUIDANCE, default=3.0, help="CFG scale (default 3.0)")
    r.add_argument("--repeats", type=REPEATS, default=5, help="timed repeats per measurement; medians are reported")
    r.add_argument("--warmup", type=WARMUP, default=1, help="untimed runs before each new batch size / stage")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    r.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                   help="ONNX/TensorRT engines precision (auto: fp16 on a GPU, fp32 on a CPU)")
    r.add_argument("--model-dir", type=argtypes.path, default=None,
                   help="model folder (default: a random-weight one written into --cache)")
    r.add_argument("--engines", type=argtypes.path, default=None,
                   help="engines folder for ort/trt (default: exported into --cache, reused when current)")
    r.add_argument("--cache", type=argtypes.path, default=CACHE, help="where random checkpoints and engines go")
    r.add_argument("--compile-on-cpu", action="store_true",
                   help="run the torch-compile row on a CPU too (skipped by default: minutes of compiling)")
    r.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    r.add_argument("--peak-tflops", type=argtypes.number(1e-3, 1e6, "a rate in TFLOP/s"), default=None,
                   help="peak rate for the compute floor instead of measuring one")
    r.add_argument("--row-timeout", type=SECONDS, default=None, help="seconds before a row is stopped")
    r.add_argument("--smoke", action="store_true", help="tiny, 2 steps, batch 1, 1 repeat (CI)")
    add_result_flags(r, RESULTS, "run-<size>-<device>-<UTC>.json")
    r.set_defaults(func=cmd_run)

    r = sub.add_parser("report", help="RESULTS.md (+ PNG charts when matplotlib is installed) from the JSONs")
    r.add_argument("--results", type=argtypes.path, default=RESULTS)
    r.set_defaults(func=cmd_report)

    r = sub.add_parser("export", help="time and peak memory of export_all per precision")
    r.add_argument("--size", choices=("tiny", "full"), default="full")
    r.add_argument("--precisions", default="fp32,fp16")
    r.add_argument("--model-dir", type=argtypes.path, default=None)
    r.add_argument("--cache", type=argtypes.path, default=CACHE, help="engines are written to <cache>/engines-<size>-<precision>")
    r.add_argument("--timeout", type=SECONDS, default=None, help="seconds per precision")
    add_result_flags(r, RESULTS, "export-<size>-<UTC>.json")
    r.set_defaults(func=cmd_export)

    r = sub.add_parser("demo", help="CPU time of `arc2face-export demo` (from nothing, then reusing the export)")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny")
    r.add_argument("-n", "--num-images", type=argtypes.count(1, 10_000, "a number of images"), default=4)
    r.add_argument("--steps", type=STEPS, default=25)
    add_result_flags(r, RESULTS, "demo-<size>-<UTC>.json")
    r.set_defaults(func=cmd_demo)

    r = sub.add_parser("build", help="TensorRT build time and plan sizes of an exported engines folder")
    r.add_argument("--size", choices=("tiny", "full"), default="full")
    r.add_argument("--precision", choices=("fp32", "fp16", "int8", "fp8"), default="fp16")
    r.add_argument("--engines", type=argtypes.path, default=None,
                   help="engines folder (default <cache>/engines-<size>-<precision>, written by `export`)")
    r.add_argument("--opt-level", type=argtypes.count(0, 5, "an optimisation level"), default=3,
                   help="builder optimisation level 0..5 (default 3)")
    r.add_argument("--timeout", type=SECONDS, default=None, help="seconds before the build is stopped")
    add_result_flags(r, RESULTS, "build-<size>-<precision>-<UTC>.json")
    r.set_defaults(func=cmd_build)

    r = sub.add_parser("quant", help="int8/FP8 vs fp16 step graph end to end (latent/image PSNR, ArcFace cosine, "
                                     "gates), plus TensorRT build time and plan sizes")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny")
    r.add_argument("--precisions", default="int8,fp8", help="comma-separated: int8, fp8 (default both)")
    r.add_argument("--identities", type=IDENTITIES, default=2, help="identities compared (default 2)")
    r.add_argument("--calib-identities", type=IDENTITIES, default=2,
                   help="K: calibration identities x all steps (default 2)")
    r.add_argument("--steps", type=STEPS, default=25)
    r.add_argument("--guidance", type=GUIDANCE, default=3.0)
    r.add_argument("--model-dir", type=argtypes.path, default=None)
    r.add_argument("--engines", type=argtypes.path, default=None,
                   help="fp16 engines folder (default <cache>/engines-<size>-fp16, exported when missing)")
    r.add_argument("--fp32-engines", type=argtypes.path, default=None,
                   help="full size: convert this fp32 folder's step_cfg to fp16 with onnx tooling instead of "
                        "exporting fp16 from torch (slow on a CPU)")
    r.add_argument("--no-build", action="store_true", help="skip the TensorRT plan builds")
    r.add_argument("--residual-qdq", action="store_true",
                   help="quantise with build-engines --residual-qdq (Q/DQ on the residual adds; off by default)")
    r.add_argument("--quant-level", type=float, choices=(1.0, 2.0, 2.5, 3.0), default=3.0,
                   help="quantise with build-engines --quant-level (1 convs, 2 +FFN, 2.5 +q/k/v, 3 +all Linear; default 3)")
    add_result_flags(r, RESULTS, "quant-<size>-<UTC>.json")
    r.set_defaults(func=cmd_quant)

    r = sub.add_parser("verify", help="cost of checking an engines folder's files against its manifest")
    r.add_argument("--engines", type=argtypes.path, required=True, help="engines folder (e.g. a full-size fp16 export)")
    r.add_argument("--repeats", type=REPEATS, default=20)
    add_result_flags(r, RESULTS, "verify-<precision>-<UTC>.json")
    r.set_defaults(func=cmd_verify)

    r = sub.add_parser("gpu-check", help="the whole first GPU session, in phases (see benchmarks/gpu_check.py)")
    r.add_argument("--out", type=argtypes.path, required=True, help="results and a work folder (kept between calls)")
    r.add_argument("--phase", default="all", help="comma-separated: probe,tests,export,ort,write,quant,"
                   "row:diffusers,row:torch-compile,row:ort,row:trt,report; or all, rows; install: only the "
                   "--wheels install (default all)")
    r.add_argument("--wheels", type=argtypes.path, default=None, help="a folder from `benchmarks wheels` to install from first")
    r.add_argument("--copy-to", type=argtypes.path, default=None, help="also copy this call's result files here")
    r.add_argument("--size", choices=("tiny", "full"), default="full")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--batches", type=_ints, default=(1, 4, 16))
    r.add_argument("--steps", type=STEPS, default=25)
    r.add_argument("--guidance", type=GUIDANCE, default=3.0)
    r.add_argument("--repeats", type=REPEATS, default=3)
    r.add_argument("--warmup", type=WARMUP, default=1)
    r.add_argument("--row-timeout", type=SECONDS, default=540.0, help="seconds per row (partial results are kept)")
    r.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the torch-compile row (default reduce-overhead; max-autotune "
                        "has not compiled the UNet within 400 s on an H200)")
    r.add_argument("--compile-batches", type=_ints, default=None,
                   help="batches of the torch-compile row (default: --batches; each batch is another compile, "
                        "so pass 1 with max-autotune)")
    r.set_defaults(func=cmd_gpu_check)

    r = sub.add_parser("wheels", help="download wheels for a Python 3.12 x86-64 GPU machine and pack them "
                                      "into folders that each fit one transfer")
    r.add_argument("--out", type=argtypes.path, default=env.REPO / ".whl")
    r.add_argument("--max-mib", type=argtypes.number(1, 1e6, "a size in MiB"), default=60.0, help="size of each folder (default 60 MiB)")
    r.add_argument("--python", default="3.12")
    r.add_argument("packages", nargs="*", help="requirements (default: diffusers and onnxruntime-gpu, pinned)")
    r.set_defaults(func=cmd_wheels)

    r = sub.add_parser("digest", help="the source digest a result records as git.source_sha256, of the working "
                                      "tree or of a commit (to match a device machine's result to its commit)")
    r.add_argument("rev", nargs="?", help="a commit (default: the working tree)")
    r.set_defaults(func=cmd_digest)

    r = sub.add_parser("cpu-precision", help="OpenVINO bf16/int8 vs fp32 end to end: PSNR, ArcFace cosine, gates")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny")
    r.add_argument("--precisions", default="bf16,int8", help="comma-separated OpenVINO precisions (default bf16,int8)")
    r.add_argument("--identities", type=IDENTITIES, default=4)
    r.add_argument("--steps", type=STEPS, default=25)
    r.add_argument("--guidance", type=GUIDANCE, default=3.0)
    r.add_argument("--model-dir", type=argtypes.path, default=None)
    r.add_argument("--engines", type=argtypes.path, default=None,
                   help="fp32 engines folder (default <cache>/engines-<size>-fp32, exported when missing)")
    add_result_flags(r, RESULTS, "cpu-precision-<size>-<UTC>.json")
    r.set_defaults(func=cmd_cpu_precision)

    r = sub.add_parser("control", help="seconds per step of the ControlNet step graph next to the base step (ORT)")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny")
    r.add_argument("--batches", type=_ints, default=(1,))
    r.add_argument("--repeats", type=REPEATS, default=3)
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--cache", type=argtypes.path, default=CACHE)
    add_result_flags(r, RESULTS, "control-<size>-<UTC>.json")
    r.set_defaults(func=cmd_control)

    r = sub.add_parser("dataset", help="images/s of `arc2face-rt dataset` (folders, wds, filter) vs `generate` "
                       "and the pipeline alone")
    r.add_argument("--size", choices=("tiny", "full"), default="tiny")
    r.add_argument("--identities", type=IDENTITIES, default=8)
    r.add_argument("--per-identity", type=argtypes.count(1, 10_000, "a number of images"), default=4)
    r.add_argument("--steps", type=STEPS, default=25)
    r.add_argument("--batch", type=argtypes.count(1, 256, "a batch size"), default=4)
    r.add_argument("--repeats", type=REPEATS, default=2, help="runs per mode, interleaved; the fastest is compared")
    add_result_flags(r, RESULTS, "dataset-<size>-<UTC>.json")
    r.set_defaults(func=cmd_dataset)

    r = sub.add_parser("_row")              # internal: no help, so not listed (argparse.SUPPRESS prints as is)
    r.add_argument("config")
    r.add_argument("result")
    r.set_defaults(func=cmd_row)
    return p


def cmd_digest(args) -> int:
    d = env.source_digest(args.rev)
    if d is None:
        print(f"{PROG}: error: cannot read commit {args.rev!r}", file=sys.stderr)
        return 2
    print(d)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the exporter's progress (calibration, quantisation, plan builds) on stderr: these runs take minutes
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("arc2face_export").setLevel(logging.INFO)
    return run_cli(lambda: _run(args), PROG)


def _run(args) -> int:
    if hasattr(args, "name"):           # a subcommand that writes one result JSON
        check_result_path(args.out, args.name, args.force)
    return args.func(args)
