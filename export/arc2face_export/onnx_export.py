"""Export the generation stages to ONNX, validate each against torch with onnxruntime, write a manifest.

Fixed template per stage (style: CTranslate2's converter): build the torch module -> export -> validate
against torch fp32 at the spec's tolerance -> save (external data above 1 GiB of weights) -> record.
Files are written into a temporary folder inside the output and moved in only when every stage has passed,
manifest last, replacing the previous export all or nothing (`engines_folder.swap_in`): an interrupted or
failed export never leaves a half-written engines folder.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from arc2face_rt import manifest as mf
from arc2face_rt.atomic import naming_output, remove_stale_temps, temp_dir, undo_new_folders
from arc2face_rt.errors import InvalidInputError, MissingWeightsError, OutputExistsError
from arc2face_rt.outputs import check_output_dir
from arc2face_rt.specs import (ALL_STAGES, CONTROL_STAGES, PRECISIONS, PROJECTOR, SPEC_REVISION, STAGES, STEP,
                               STEP_CFG, STEP_CFG_CONTROL, STEP_CONTROL, VAE_DECODER)
from arc2face_ref.loading import cast, load_models, model_files
from arc2face_ref.modules import DenoiseStep, VaeDecode
from arc2face_ref.projector import Arc2FaceProjector, unconditional_embedding

from .validate import ValidationError, example_inputs, validate_stage as _validate  # noqa: F401 (re-exported)
from .ort_cuda import (ORT_CUDA_RECIPE, ORT_CUDA_STAGES, FusedGraphError, attention_for, check_loads, fuse_for_ort_cuda,
                       ort_cuda_file)
from .engines_folder import KEPT_ALWAYS, foreign_entry, replaced_entries, swap_in
from .tracing import OPSET, export_graph

log = logging.getLogger("arc2face_export")


def library_versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


class _CastIO(torch.nn.Module):
    """fp32 at the graph boundary, the wrapped module's dtype inside."""

    def __init__(self, module, dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x):
        return self.module(x.to(self.dtype)).float()


def export_all(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32", force: bool = False,
               stages: tuple[str, ...] | None = None, validate: bool = True, progress=None,
               lora: str | Path | None = None, lora_scale: float | None = None, ort_cuda: bool | tuple[str, ...] = False) -> dict:
    """Export every generation stage of MODEL_DIR into OUT_DIR; returns the manifest written.

    The ControlNet step graphs are among the stages when MODEL_DIR has controlnet/. `lora`: a LoRA
    .safetensors (LCM-LoRA) fused into the UNet at `lora_scale` before export (recorded in
    manifest["lora"]; `arc2face-rt generate` then defaults to LCM sampling; default scale 1.0, and a
    scale without a LoRA is refused). `ort_cuda`: also write the fp16 graphs with ONNX Runtime's CUDA
    fusions for the step and VAE stages (`ort_cuda`, manifest section "ort_cuda"); True for all of them
    among the exported stages, or a tuple of stage names.

    An OUT_DIR that already holds an export of the same model files, precision and spec revision is
    kept as it is (returns its manifest). Other content needs `force`, which replaces only what this
    tool writes into an engines folder (`engines_folder`); a folder holding anything else is refused.
    A failed export leaves OUT_DIR as it was, and removes it when it did not exist before."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    say = progress or (lambda msg: log.info(msg))
    model_dir, out_dir = Path(model_dir), check_output_dir(out_dir)
    names = _stage_names(model_dir, stages)
    fused = _ort_cuda_stages(ort_cuda, names, precision)
    lora_rec = _lora_record(lora, lora_scale, model_dir)
    source = {str(p.relative_to(model_dir)): mf.file_record(p) for p in model_files(model_dir)}
    if out_dir.is_dir():
        remove_stale_temps(out_dir)          # what a killed export left behind, also before a no-op
    if (out_dir / mf.MANIFEST).is_file() and not force:
        try:
            old = mf.load_manifest(out_dir)
        except Exception:
            old = None
        if old and old.get("precision") == precision and old.get("source", {}).get("files") == source \
                and old.get("lora") == lora_rec and all(n in old["stages"] for n in names) \
                and all(ORT_CUDA_RECIPE in (old.get("ort_cuda", {}).get(n, {}).get("recipe"),
                                            old.get("ort_cuda_skipped", {}).get(n, {}).get("recipe")) for n in fused):
            _check_up_to_date_files(out_dir, old, names)
            say(f"{out_dir}: up to date ({precision}), nothing to export")
            return old
    replaced = _replaced_entries(out_dir, force)

    t0 = time.perf_counter()
    say(f"loading {model_dir}")
    models = load_models(model_dir)
    if lora_rec:
        from arc2face_ref.lora import fuse_lora_into
        say(f"fusing LoRA {lora} (scale {lora_rec['scale']:g}) into the UNet")
        n = fuse_lora_into(models.unet, lora, lora_rec["scale"])
        say(f"LoRA fused: {n} UNet weight tensors changed")
    with undo_new_folders(out_dir):
        tmp = temp_dir(out_dir, "export")
        try:
            records = {name: _export_stage(models, name, precision, validate, tmp, out_dir, say) for name in names}
            manifest = {
                "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "spec_revision": SPEC_REVISION,
                "precision": precision, "opset": OPSET,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model_dir": str(model_dir.resolve()), "files": source,
                           "random_weights": (model_dir / "RANDOM_WEIGHTS.txt").is_file()},
                "scheduler_config": models.scheduler_config,
                "libraries": library_versions(),
                "export_s": round(time.perf_counter() - t0, 1),
                "stages": records,
            }
            if lora_rec:
                manifest["lora"] = lora_rec
            if fused:
                sources = {name: _export_ort_cuda_source(models, name, validate, tmp, say) for name in fused}
                del models                     # the optimizer holds the whole graph, more than once
                gc.collect()
                manifest["ort_cuda"], skipped = _fuse_ort_cuda_stages(sources, tmp, out_dir, say)
                if skipped:
                    manifest["ort_cuda_skipped"] = skipped
            mf.write_json_atomic(tmp / mf.MANIFEST, manifest)
            swap_in(out_dir, tmp, replaced)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _stage_names(model_dir: Path, stages) -> tuple[str, ...]:
    """The stages to export: `stages`, or every stage the model folder can give (the ControlNet step
    graphs when it has controlnet/)."""
    has_control = (model_dir / "controlnet").is_dir()
    if not stages:
        return tuple(STAGES) + (tuple(CONTROL_STAGES) if has_control else ())
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown:
        raise InvalidInputError(f"unknown stage(s) {', '.join(unknown)}; choose among {', '.join(ALL_STAGES)}")
    if not has_control and any(s in CONTROL_STAGES for s in stages):
        raise MissingWeightsError(f"{model_dir}: has no controlnet/ (config.json + diffusion_pytorch_model.safetensors "
                                  "from the Arc2Face release), which the control step graphs need")
    return tuple(stages)


def _lora_record(lora, scale: float | None, model_dir: Path) -> dict | None:
    """What the manifest records of a fused LoRA (file name, sha256, size, scale); None without one.
    The file is checked against MODEL_DIR's UNet here, before any model is loaded."""
    if lora is None:
        if scale is not None:
            raise InvalidInputError(f"--lora-scale {scale} needs --lora FILE.safetensors (the scale of which LoRA?); "
                                    "drop it, or pass the adapter")
        return None
    scale = 1.0 if scale is None else scale
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and 0 < scale <= 10):
        raise InvalidInputError(f"--lora-scale must be a number in (0, 10] (got {scale}; the official usage fuses "
                                "LCM-LoRA at 1.0)")
    from arc2face_ref.lora import check_lora_fits, read_lora

    path = Path(lora)
    check_lora_fits(read_lora(path), model_dir, path)    # refuse a missing, foreign or unfitting file before any work
    return {"file": path.name, **mf.file_record(path), "scale": float(scale)}


def _check_up_to_date_files(out_dir: Path, old: dict, names) -> None:
    """An export that would be a no-op checks its files' content (sha256, through the user cache's stamps:
    after the first check a stat() per file): a file changed behind the manifest, even with its size
    kept, is named with the fix (`--force`)."""
    from arc2face_rt.integrity import verify_records

    for n in names:
        verify_records(out_dir, old["stages"][n]["files"], mode="stamp")
        if n in old.get("ort_cuda", {}):
            verify_records(out_dir, old["ort_cuda"][n]["files"], mode="stamp")


class ExportExistsError(OutputExistsError):
    """OUT_DIR holds only what the tools write, but not this export: `--force` would replace it."""


def _replaced_entries(out_dir: Path, force: bool) -> list[str]:
    """What an export into `out_dir` replaces, after refusing a folder it may not write into."""
    if not out_dir.is_dir():
        return []
    remove_stale_temps(out_dir)            # what a killed export left behind
    if all(p.name in KEPT_ALWAYS for p in out_dir.iterdir()):
        return []
    foreign = foreign_entry(out_dir)
    if foreign:
        raise OutputExistsError(f"{out_dir}: holds {foreign}, which arc2face-export does not write: it is not an "
                                "engines folder; choose another --out (--force replaces only an export)")
    if not force:
        what = "holds another export" if (out_dir / mf.MANIFEST).exists() else "exists and is not empty"
        raise ExportExistsError(f"{out_dir}: {what}; choose another --out or pass --force")
    return replaced_entries(out_dir)


def _export_stage(models, name: str, precision: str, validate: bool, tmp: Path, out_dir: Path, say) -> dict:
    """Export and validate one stage into `tmp` (for `out_dir`); return its manifest record."""
    spec = ALL_STAGES[name]
    # fp16 stages are validated against the same module in fp32
    ref32 = _reference_fp32(models, name) if precision == "fp16" and validate else None
    module = _modules_for(models, name, precision)
    feeds = example_inputs(spec, batch=2 if name != VAE_DECODER.name else 1)
    ts = time.perf_counter()
    say(f"[{name}] exporting ({precision})")
    stage_dir = tmp / name
    stage_dir.mkdir()
    path = stage_dir / spec.onnx_file
    with naming_output(out_dir / spec.onnx_file):
        export_graph(module, spec, feeds, path)
    rec = {"file": spec.onnx_file, "export_s": round(time.perf_counter() - ts, 2)}
    if validate:
        say(f"[{name}] validating against torch with onnxruntime")
        rec["validation"] = _validate(module, spec, feeds, path, precision, ref32 or module)
        v = rec["validation"]
        judged = (f"; both within rounding of float64 (ONNX Runtime {v['float64']['onnxruntime']:.3g}, torch "
                  f"{v['float64']['torch']:.3g})" if "float64" in v else "")
        say(f"[{name}] {v['metric']} = {v['value']:.3g} (tolerance {v['tolerance']}){judged}")
    for p in stage_dir.iterdir():
        p.rename(tmp / p.name)
    stage_dir.rmdir()
    rec["files"] = {p.name: mf.file_record(tmp / p.name)
                    for p in sorted(tmp.iterdir()) if p.name.startswith(spec.onnx_file)}
    rec["inputs"] = [[t.name, t.dtype, list(t.shape)] for t in spec.inputs]
    rec["outputs"] = [[t.name, t.dtype, list(t.shape)] for t in spec.outputs]
    return rec


def _ort_cuda_stages(ort_cuda, names: tuple[str, ...], precision: str) -> tuple[str, ...]:
    """The stages to get ONNX Runtime CUDA graphs: ORT_CUDA_STAGES among `names` (True), those listed, or none."""
    if not ort_cuda:
        return ()
    if precision != "fp16":
        raise InvalidInputError(f"--ort-cuda writes fp16 graphs; export them into an fp16 folder (--precision fp16), "
                                f"not {precision}")
    if ort_cuda is True:
        fused = tuple(n for n in names if n in ORT_CUDA_STAGES)
        if not fused:
            raise InvalidInputError(f"--ort-cuda writes graphs for {', '.join(ORT_CUDA_STAGES)}, and --stages exports "
                                    f"none of them ({', '.join(names)}): add one, or drop --ort-cuda")
        return fused
    wanted = (ort_cuda,) if isinstance(ort_cuda, str) else tuple(ort_cuda)
    bad = [n for n in wanted if n not in ORT_CUDA_STAGES or n not in names]
    if bad:
        raise InvalidInputError(f"ONNX Runtime CUDA graphs are for {', '.join(ORT_CUDA_STAGES)} among the exported "
                                f"stages, not {', '.join(bad)}")
    return wanted


def _export_ort_cuda_source(models, name: str, validate: bool, tmp: Path, say) -> dict:
    """The fp16 graph an `ort_cuda` graph is fused from (`ort_cuda` module docstring), exported into
    tmp/<stage>.ort-cuda/ and validated against torch fp32; its partial record."""
    spec = ALL_STAGES[name]
    feeds = example_inputs(spec, batch=2 if name != VAE_DECODER.name else 1)
    # validated at batch 1: the classic attention materialises every score matrix
    check = example_inputs(spec, batch=1)
    ts = time.perf_counter()
    work = tmp / f"{name}.ort-cuda"
    work.mkdir()
    module = _modules_for(models, name, "fp16")
    say(f"[{name}] exporting for ONNX Runtime CUDA (fp16, to be fused)")
    rec = {"file": ort_cuda_file(name), "recipe": ORT_CUDA_RECIPE}
    with attention_for(module, name):
        export_graph(module, spec, feeds, work / spec.onnx_file)
    if validate:
        rec["source_validation"] = _validate(module, spec, check, work / spec.onnx_file, "fp16",
                                             _reference_fp32(models, name))
    del module
    rec["export_s"] = round(time.perf_counter() - ts, 2)
    return rec


def _fuse_ort_cuda_stages(sources: dict, tmp: Path, out_dir: Path, say) -> tuple[dict, dict]:
    """Fuse each source graph; returns (the `ort_cuda` records, the `ort_cuda_skipped` ones). A fused
    graph is an extra: one that fails (FusedGraphError) is left out with a warning, the runtime uses the
    plain graph, and the folder counts as up to date for the same recipe (`--force` tries again)."""
    import onnxruntime

    done, skipped = {}, {}
    for name, rec in sources.items():
        try:
            done[name] = _fuse_ort_cuda_stage(name, rec, tmp, out_dir, say)
        except FusedGraphError as e:
            log.warning("[%s] no ONNX Runtime CUDA graph: %s; the plain graph serves CUDA too", name, e)
            skipped[name] = {"recipe": ORT_CUDA_RECIPE, "reason": str(e)[:500],
                             "onnxruntime": onnxruntime.__version__}
            for p in (p for p in tmp.iterdir() if p.name.startswith(f"{name}.ort-cuda")):   # what it left
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return done, skipped


def _fuse_ort_cuda_stage(name: str, rec: dict, tmp: Path, out_dir: Path, say) -> dict:
    """Fuse the source graph `_export_ort_cuda_source` wrote into tmp/<stage>.ort-cuda.onnx; its record."""
    ts = time.perf_counter()
    work = tmp / f"{name}.ort-cuda"
    dst = tmp / rec["file"]
    say(f"[{name}] fusing for ONNX Runtime CUDA")
    with naming_output(out_dir / dst.name):
        rec = {**rec, **fuse_for_ort_cuda(work / ALL_STAGES[name].onnx_file, dst, name)}
    shutil.rmtree(work)
    check_loads(dst)
    rec["export_s"] = round(rec["export_s"] + time.perf_counter() - ts, 2)
    rec["files"] = {p.name: mf.file_record(p) for p in sorted(tmp.iterdir()) if p.name.startswith(dst.name)}
    say(f"[{name}] ONNX Runtime CUDA graph: " + ", ".join(f"{k} {v}" for k, v in rec["fused"].items()))
    return rec


def _modules_for(models, name: str, precision: str) -> torch.nn.Module:
    """The torch module for one stage at `precision` (weights cast on a copy, models stay fp32)."""
    import copy

    dt = torch.float16 if precision == "fp16" else torch.float32
    if name == PROJECTOR.name:
        enc = models.encoder if dt == torch.float32 else copy.deepcopy(models.encoder).to(dt)
        proj = Arc2FaceProjector(enc)
        proj.prompt_tokens = proj.prompt_tokens.to(dt)
        return _CastIO(proj, dt).eval()
    if name in (STEP_CFG.name, STEP.name, STEP_CFG_CONTROL.name, STEP_CONTROL.name):
        unet = models.unet if dt == torch.float32 else cast(copy.deepcopy(models.unet), dt)
        uncond = unconditional_embedding(models.encoder) if name in (STEP_CFG.name, STEP_CFG_CONTROL.name) else None
        net = None
        if name in CONTROL_STAGES:
            net = models.controlnet if dt == torch.float32 else cast(copy.deepcopy(models.controlnet), dt)
        return DenoiseStep(unet, uncond, net).eval()
    if name == VAE_DECODER.name:
        vae = models.vae if dt == torch.float32 else cast(copy.deepcopy(models.vae), dt)
        return VaeDecode(vae).eval()
    raise KeyError(name)


def _reference_fp32(models, name: str) -> torch.nn.Module:
    return _modules_for(models, name, "fp32")
