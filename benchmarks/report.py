"""`python -m benchmarks report`: RESULTS.md (and one PNG chart per run when matplotlib is installed).

The headline of every run is its ratio to the diffusers baseline measured in the same run (same
machine, same moment); ratios to the compute floor say how far each row is from the hardware.
"""
from __future__ import annotations

import json
from pathlib import Path

from arc2face_rt.atomic import atomic_write
from arc2face_rt.errors import InvalidInputError

STAGES = ("detect", "embed", "project", "step", "steps", "decode")


def load_results(results: Path) -> list[dict]:
    out = []
    for p in sorted(results.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(d, dict) and d.get("kind") in ("run", "export", "demo", "build", "int8", "quant", "verify",
                                                        "cpu_precision", "control"):
            d["_file"] = p.name
            out.append(d)
    return out


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _machine(d: dict) -> str:
    m = d.get("machine", {})
    gpus = m.get("gpus") or []
    gpu = f"{gpus[0]['name']} (driver {gpus[0]['driver']})" if gpus else "no GPU"
    return f"{m.get('cpu_model', '?')}, {m.get('cpu_cores', '?')} cores, {m.get('host_memory_gb', '?')} GB; {gpu}"


def _commit(d: dict) -> str:
    g = d.get("git", {})
    c = (g.get("commit") or "?")[:10]
    return c + (" (uncommitted changes)" if g.get("dirty") else "")


def _measured(r: dict) -> bool:
    """Complete rows, and rows stopped part-way (status "partial") that have a batch-1 latency."""
    return r.get("status") in ("ok", "partial") and bool(r.get("latency_s"))


def _name(r: dict) -> str:
    return r["backend"] + (" (partial)" if r.get("status") == "partial" else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _batches_and_repeats(d: dict) -> str:
    """'batches [1, 4], median of 2 repeat(s)', or per row where the rows of a merged run differ (their
    batches, repeats or row timeout)."""
    o = d["options"]
    rows = [r for r in d["rows"] if r.get("status") != "skipped"]

    def of(r: dict, key: str):
        return r.get("options", {}).get(key, o.get(key))
    differ = {k for k in ("batches", "repeats", "row_timeout_s") if len({repr(of(r, k)) for r in rows}) > 1}
    if not differ:
        return f"batches {o['batches']}, median of {o['repeats']} repeat(s)"
    return "per row: " + "; ".join(
        f"{r['backend']} batches {of(r, 'batches')}, median of {of(r, 'repeats')}"
        + (f", row timeout {of(r, 'row_timeout_s'):g} s" if "row_timeout_s" in differ and of(r, "row_timeout_s") else "")
        for r in rows)


def run_section(d: dict, chart: str | None) -> list[str]:
    o = d["options"]
    lines = [f"## Run `{d['_file']}`", "",
             f"- size **{o['size']}**, device **{d['device_kind']}** ({_machine(d)}), engines precision "
             f"{o.get('precision_resolved')}, {o['steps']} DPM-Solver++ steps, guidance {o['guidance']}, 512x512, "
             f"{_batches_and_repeats(d)}{' (smoke)' if o.get('smoke') else ''}",
             f"- {d['created']}, commit {_commit(d)}"]
    if d.get("peaks"):
        rates = ", ".join(f"{p} **{v['tflops']:.3g}**" + (f" ({', '.join(f'{m} {r:.3g}' for m, r in v['methods'].items())})"
                                                           if v.get("methods") else "") for p, v in d["peaks"].items())
        how = next(iter(d["peaks"].values()))["how"]
        lines.append(f"- peak rates for the floor, TFLOP/s per precision: {rates} ({how}); each stage's floor uses "
                     f"the rate of the precision it runs in; FLOPs: {d['flops']['source']}")
    elif d.get("peak"):
        lines.append(f"- peak rate for the floor: **{d['peak']['tflops']:.3g} TFLOP/s** ({d['peak']['how']}); "
                     f"FLOPs: {d['flops']['source']}")
    lines.append("")
    rows = d["rows"]
    ok = [r for r in rows if _measured(r)]
    if ok:
        bf16 = any(r.get("vs_diffusers_bf16") for r in ok)
        head = ["backend", "precision", "batch-1 latency (s)", "speed-up vs diffusers"] \
            + (["vs diffusers bf16"] if bf16 else []) + ["x floor", "cold start (s)", "peak RSS (MB)", "peak GPU (MiB)"]
        body = []
        for r in ok:
            vs = r.get("vs_diffusers", {}).get("latency_speedup")
            vb = r.get("vs_diffusers_bf16", {}).get("latency_speedup")
            body.append([f"**{_name(r)}**", r.get("info", {}).get("precision", "–"),
                         _f(r["latency_s"]["median"]), f"{vs:.2f}x" if vs else "–"]
                        + ([f"{vb:.2f}x" if vb else "–"] if bf16 else [])
                        + [_f(r.get("floor", {}).get("latency_ratio")), _f(r["cold_start_s"]), _f(r["peak_rss_mb"]),
                           _f(r.get("peak_gpu_mib"))])
        lines += _table(head, body) + [""]
        batches = [str(b) for b in o["batches"]]
        head = ["backend"] + [f"batch {b}: images/s (vs diffusers)" for b in batches]
        body = []
        for r in ok:
            cells = []
            for b in batches:
                ips = r["throughput_ips"].get(b)
                vs = r.get("vs_diffusers", {}).get("throughput_speedup", {}).get(b)
                cells.append(f"{_f(ips)}" + (f" ({vs:.2f}x)" if vs else ""))
            body.append([r["backend"]] + cells)
        lines += ["Throughput:", ""] + _table(head, body) + [""]
        head = ["backend"] + [f"{s} (s)" for s in STAGES]
        body = []
        for r in ok:
            cells = []
            for s in STAGES:
                v = r["stages_s"].get(s)
                fr = r.get("floor", {}).get("stages", {}).get(s, {}).get("ratio")
                cells.append(_f(v) + (f" ({fr:.3g}x floor)" if fr else ""))
            body.append([r["backend"]] + cells)
        lines += ["Per-stage split at batch 1 (median; `step` = one denoise step with CFG, `steps` = all of them):",
                  ""] + _table(head, body) + [""]
        notes = [f"- {r['backend']}: {n}" for r in ok for n in r.get("notes", [])]
        notes += [f"- {r['backend']}: {r['info']['isa']}; first compile {_f(r['first_compile'].get('load_s'))} s "
                  "(cold start is a later process, compiled blobs from the cache)" for r in ok if r.get("first_compile")]
        notes += [f"- {r['backend']}: {_compiles(r)}" for r in ok if r.get("compile_s") and r["status"] == "ok"]
        if notes:
            lines += ["Notes:", ""] + notes + [""]
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["Not (fully) measured:", ""]
        lines += [f"- **{r['backend']}** {r['status']}: {r.get('reason', '')}"
                  + (f"; {_compiles(r)}" if r.get("compile_s") else "") for r in skipped] + [""]
    if chart:
        lines += [f"![{d['_file']}]({chart})", ""]
    return lines


def _compiles(r: dict) -> str:
    """The compiles a row timed before its first image, e.g. "compiled (max-autotune): UNet 312 s"."""
    mode = r.get("info", {}).get("compile_mode", "?")
    return f"compiled ({mode}): " + ", ".join(f"{k} {_f(v)} s" for k, v in r["compile_s"].items())


def export_section(d: dict) -> list[str]:
    lines = [f"## Export `{d['_file']}`", "",
             f"`export_all` on the **{d['size']}** random-weight checkpoint ({_f(d.get('model_mb'))} MB of model files), "
             f"one child process per precision; {_machine(d)}; {d['created']}, commit {_commit(d)}.", ""]
    body = []
    for r in d["runs"]:
        stages = "; ".join(f"{n} {v.get('export_s')} s" + (f", {v['validation']['metric']} {v['validation']['value']:.3g}"
                                                          if v.get("validation") else "")
                           for n, v in (r.get("stages") or {}).items())
        body.append([r["precision"], "yes" if r.get("validate", True) else "no", r["status"], _f(r["wall_s"]),
                     _f(r["cpu_user_s"] + r["cpu_system_s"]), _f((r.get("peak_rss_mb") or 0) / 1024),
                     stages or "–", (r.get("error") or "")[:300].replace("|", "/").replace("\n", " ")])
    lines += _table(["precision", "validated", "status", "wall (s)", "CPU (s)", "peak RSS (GB)",
                     "per stage (export s, validation)", "error"], body) + [""]
    return lines


def demo_section(d: dict) -> list[str]:
    lines = [f"## Demo `{d['_file']}`", "", f"`{d['command']}` in a fresh folder, twice; {_machine(d)}; "
             f"{d['created']}, commit {_commit(d)}.", ""]
    body = [[r["run"], r["status"], _f(r["wall_s"]), _f(r["cpu_s"]), _f(r.get("peak_rss_mb"))] for r in d["runs"]]
    return lines + _table(["run", "status", "wall (s)", "CPU user+sys (s)", "peak RSS (MB)"], body) + [""]


def build_section(d: dict) -> list[str]:
    r = d["runs"][0]
    plans = r.get("plans") or {}
    lib = next(iter(plans.values()), {}).get("library", {})
    lines = [f"## TensorRT build `{d['_file']}`", "",
             f"`build_engines` ({d['precision']}, optimisation level {d['opt_level']}, every stage forced) on the "
             f"**{d['size']}** export with {lib.get('name', '?')} {lib.get('version', '')}; {_machine(d)}; "
             f"{d['created']}, commit {_commit(d)}. Status **{r['status']}**, wall {_f(r['wall_s'])} s, "
             f"CPU {_f(r['cpu_user_s'] + r['cpu_system_s'])} s, peak RSS {_f((r.get('peak_rss_mb') or 0) / 1024)} GB.", ""]
    if r.get("error"):
        lines += [f"Error: {r['error'][:500]}", ""]
    body = [[n, _f(p["build_s"]), _f(p["plan_mb"]), ",".join(p["compute_capabilities"]),
             "{min}/{opt}/{max}".format(**p["profile"])] for n, p in plans.items()]
    return lines + _table(["plan", "build (s)", "size (MiB)", "targets (compute capability)", "batch min/opt/max"],
                          body) + [""]


def verify_section(d: dict) -> list[str]:
    f, later = d["first"], d["later_pipeline_open"]
    lines = [f"## Engine verification `{d['_file']}`", "",
             f"Checking {d['files']} files ({_f(d['bytes'] / 1e9)} GB, {d['precision']}) against the manifest's "
             f"sha256; {_machine(d)}; {d['created']}, commit {_commit(d)}.", ""]
    body = [["first run, files not in the page cache", f"{_f(f['evicted']['seconds'])} s",
             f"{_f(f['evicted']['GB_per_s'])} GB/s hashed"],
            ["first run, files in the page cache", f"{_f(f['cached']['seconds'])} s",
             f"{_f(f['cached']['GB_per_s'])} GB/s hashed"],
            ["later runs: verify_records (stamps)", f"{_f(d['later_verify_records']['median_ms'])} ms",
             f"median of {d['later_verify_records']['repeats']}"],
            ["later runs: open the pipeline, verify on", f"{_f(later['verify']['median_ms'])} ms", ""],
            ["later runs: open the pipeline, --no-verify", f"{_f(later['no_verify']['median_ms'])} ms", ""]]
    return lines + _table(["what", "time", "note"], body) + [""]


def control_section(d: dict) -> list[str]:
    lines = [f"## ControlNet step vs base step `{d['_file']}`", "",
             f"**{d['size']}** model, {d['precision']}, {d['backend']}, guidance {d['guidance']} (the CFG graphs); "
             f"seconds per step call, median of {d['rows'][0]['repeats']} after a warm-up; {_machine(d)}; "
             f"{d['created']}, commit {_commit(d)}.", ""]
    body = [[r["stage"], str(r["batch"]), r["providers"][0], _f(r["step_s"]["median"]), _f(r["vs_step_cfg"])]
            for r in d["rows"]]
    return lines + _table(["stage", "batch", "provider", "s / step", "vs step_cfg"], body) + [""]


def int8_section(d: dict) -> list[str]:
    q, med = d["quantization"], d["median"]
    lines = [f"## int8 vs fp16 `{d['_file']}`", "",
             f"**{d['size']}** model, {d['identities']} random identities, {d['steps']} steps, guidance "
             f"{d['guidance']}, {d['backend']}; only `step_cfg` differs (int8 Q/DQ: {q['weights']} weights, "
             f"{q['activations']} activations, {q['quantize_nodes']} QuantizeLinear nodes, {d['nodes_kept_in_float']} "
             f"sensitive nodes kept in float, {q['calibration_samples']} calibration samples, quantised in "
             f"{_f(d['quantize_s'])} s); {_machine(d)}; {d['created']}, commit {_commit(d)}.", ""]
    keys = [k for k in ("latent_psnr_db", "image_psnr_db", "image_max_abs", "arcface_cosine") if k in med]
    body = [[str(r["identity"])] + [_f(r.get(k), 4) for k in keys] for r in d["rows"]]
    body.append(["**median**"] + [f"**{_f(med[k], 4)}**" for k in keys])
    return lines + _table(["identity"] + keys, body) + [""]


def quant_section(d: dict) -> list[str]:
    lines = [f"## int8 / FP8 vs fp16 (TensorRT Q/DQ recipe) `{d['_file']}`", "",
             f"**{d['size']}** model{' (random weights: these numbers measure computational drift, not face quality)' if d.get('random_weights') else ''}, "
             f"{d['identities']} identities, {d['steps']} steps, guidance {d['guidance']}; {d['backend']}; reference: "
             f"{d['reference']}; quantised in {_f(d['quantize_s'])} s; {_machine(d)}; {d['created']}, commit {_commit(d)}. "
             "Gates on the medians: image PSNR >= 30 dB, ArcFace cosine >= 0.95.", ""]
    keys = ("latent_psnr_db", "image_psnr_db", "image_max_abs", "arcface_cosine")
    body = []
    for prec, r in d["precisions"].items():
        q = r["quantization"]
        for row in r["rows"]:
            body.append([prec, str(row["identity"])] + [_f(row.get(k), 4) for k in keys] + [""])
        body.append([f"**{prec}**", "median"] + [f"**{_f(r['median'].get(k), 4)}**" for k in keys]
                    + [f"{'passed' if r['gates_passed'] else 'FAILED'}; quant level {q['recipe'].get('level', 3.0):g}, "
                       f"{q['quantized_layers']} layers, "
                       f"{r['fp16_layers']} kept fp16, {q['calibration']['samples']} samples, {q['recipe']['method']}, "
                       f"SmoothQuant {q['recipe']['smoothquant_alpha']}, "
                       f"residual-add Q/DQ {q['residual_add_qdq']}"])
    lines += _table(["precision", "identity"] + list(keys) + ["gates / recipe"], body) + [""]
    if d.get("plans"):
        body = [[p, "failed", "", "", v["error"][:120]] if "error" in v else
                [p, _f(v["build_s"]), _f(v["plan_mb"]), ",".join(v["compute_capabilities"]),
                 f"{v['library']['name']} {v['library']['version']}"] for p, v in d["plans"].items()]
        lines += ["step_cfg plans built here:", ""] + _table(["precision", "build s", "plan MiB", "targets", "library"],
                                                            body) + [""]
    return lines


def cpu_precision_section(d: dict) -> list[str]:
    lines = [f"## OpenVINO precision vs fp32 `{d['_file']}`", "",
             f"**{d['size']}** model{' (random weights: these numbers measure computational drift, not face quality)' if d.get('random_weights') else ''}, "
             f"{d['identities']} identities, {d['steps']} steps, guidance {d['guidance']}; reference: {d['reference']}; "
             f"CPU {d['isa']}; {_machine(d)}; {d['created']}, commit {_commit(d)}. Gates on the medians: image PSNR "
             f">= 30 dB, ArcFace cosine >= 0.95.", ""]
    keys = ("latent_psnr_db", "image_psnr_db", "image_max_abs", "arcface_cosine")
    body = []
    for prec, r in d["precisions"].items():
        med = r["median"]
        body.append([f"**{prec}**"] + [_f(med.get(k), 4) for k in keys] + ["passed" if r["gates_passed"] else "**FAILED**"])
    return lines + _table(["precision", "median latent PSNR (dB)", "image PSNR (dB)", "max grey-level diff",
                           "ArcFace cosine", "gates"], body) + [""]


def chart(d: dict, path: Path) -> bool:
    """Batch-1 latency and throughput per backend; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in d["rows"] if _measured(r)]
    if not ok:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [_name(r) for r in ok]
    lat = [r["latency_s"]["median"] for r in ok]
    bars = a.barh(names, lat, color=["tab:orange" if n == "diffusers" else "tab:blue" for n in names])
    for bar, r in zip(bars, ok):
        vs = r.get("vs_diffusers", {}).get("latency_speedup")
        if vs:
            a.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {vs:.2f}x", va="center")
    floors = {r["floor"].get("precisions", {}).get("step", "fp32"): r["floor"]["latency_floor_s"]
              for r in ok if r.get("floor")}
    for (prec, floor_s), ls in zip(sorted(floors.items()), ("--", ":", "-.", (0, (1, 3)))):
        a.axvline(floor_s, color="k", ls=ls, lw=1, label=f"compute floor ({prec} UNet)")
    if floors:
        a.legend(loc="lower right", fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("batch-1 latency (s), lower is better; label: speed-up vs diffusers")
    o = d["options"]
    for r in ok:
        bs = sorted(int(k) for k in r["throughput_ips"])
        b.plot(bs, [r["throughput_ips"][str(k)] for k in bs], marker="o", label=_name(r))
    b.set_xlabel("batch size")
    b.set_ylabel("images / s, higher is better")
    b.legend()
    fig.suptitle(f"arc2face-rt, {o['size']} model, {d['device_kind']}: {d['machine']['device']}, "
                 f"{o['steps']} steps, guidance {o['guidance']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(results: Path, say=lambda m: None) -> tuple[Path, list[Path]]:
    """Write RESULTS.md (and the charts) from the result JSON files in `results`. A file of a known kind
    that lacks what its section reads (a hand-edited file, an older schema) is left out, with one line
    through `say` naming it, instead of stopping the report."""
    if not results.is_dir():
        raise InvalidInputError(f"--results {results}: no such folder; give the folder of the result JSON files "
                                "(default benchmarks/results)")
    docs = load_results(results)

    left_out = set()

    def render(d: dict, section, *args) -> list:
        if d["_file"] in left_out:
            return []
        try:
            return section(d, *args)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            left_out.add(d["_file"])
            what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:80]
            say(f"left out {d['_file']}: not a complete {d['kind']} result ({what})")
            return []

    runs = [d for d in sorted((d for d in docs if d["kind"] == "run"), key=lambda d: str(d.get("created")),
                              reverse=True) if render(d, run_section, None)]       # the incomplete said, left out
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks report` from the JSON files in this folder; do not edit by hand. "
             "Random-weight checkpoints have the real architectures (same FLOPs and timings as the released "
             "weights) but produce noise images. See ../README.md for the columns.", ""]
    if not any(d.get("device_kind") == "cuda" for d in runs):
        lines += ["**GPU figures: pending.** No GPU was available when these results were made; the harness "
                  "runs the GPU rows (CUDA torch, onnxruntime-gpu, TensorRT) wherever they are importable.", ""]
    charts = []
    for d in runs:
        png = Path(d["_file"]).with_suffix(".png").name
        try:
            made = chart(d, results / png)        # False: no matplotlib
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            made = False
            say(f"no chart for {d['_file']} ({' '.join(str(e).split())[:80]})")
        charts += [results / png] if made else []
        lines += run_section(d, png if made else None)
    for kind, section in (("export", export_section), ("demo", demo_section), ("build", build_section),
                          ("int8", int8_section), ("quant", quant_section), ("verify", verify_section),
                          ("cpu_precision", cpu_precision_section), ("control", control_section)):
        for d in sorted((d for d in docs if d["kind"] == kind), key=lambda d: str(d.get("created")), reverse=True):
            lines += render(d, section)
    md = results / "RESULTS.md"
    atomic_write(md, ("\n".join(lines).rstrip() + "\n").encode(), overwrite=True)     # generated: replaced each time
    return md, charts
