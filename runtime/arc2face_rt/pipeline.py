"""The generation pipeline: identity -> projector -> N denoise steps -> VAE decoder -> uint8 images.

Backends only run graphs; all host arithmetic (scheduler tables, noise) is numpy and happens before
the loop. With TensorRT a whole batch (projector, the loop as one CUDA graph, decoder) runs on one
stream with one host sync, two on a signature's first batch (`backends.trt.TrtGenerator`); otherwise
a step session that offers `denoise_loop` (ONNX Runtime on CUDA: device-resident loop) runs the loop
itself, and on a CPU the loop below calls the step graph N times.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import __version__, checks, folder_setup, provenance
from .backends.openvino import CPU_PRECISIONS
from .control import Control
from .errors import EngineMismatchError, InvalidInputError, MissingWeightsError
from .exits import check_interrupt
# re-exported: what a folder and this machine decide before a run (defaults, backend) lives there
from .folder_setup import BACKENDS, DEVICES, check_folder_scheduler, folder_defaults, pick_backend  # noqa: F401
# re-exported: the identity helpers are part of the pipeline's public API
from .inputs import (IDENTITY_MAX_BYTES, identity_fingerprint, image_noise, load_identity,  # noqa: F401
                     normalize_identity, random_identity)
from .inputs import (IMAGE_BYTES, MAX_INDEX, index_bounds, index_count, max_images_in_memory,  # noqa: F401
                     run_batches, run_items)
from .integrity import check_unchanged, verify_records
from .manifest import load_manifest, record_files, reexport_advice, refused, resolve_inside, stage_file
# re-exported: the options are part of the pipeline's public API (`options`)
from .options import MAX_GUIDANCE, GenerationOptions, checked_options  # noqa: F401
from .schedulers import SCHEDULERS, Schedule, make_schedule
from .specs import ALL_STAGES, CONTROL_STAGES, IMAGE_SIZE, PROJECTOR, STEP_STAGES, VAE_DECODER, step_stage

log = logging.getLogger("arc2face_rt")


@dataclass
class GenerationResult:
    images: np.ndarray                    # [N, 512, 512, 3] uint8 RGB
    params: list[dict]                    # per image: what to write into its PNG (never the embedding)
    timings: dict = field(default_factory=dict)   # seconds: project, denoise, decode, total


class Arc2FacePipeline:
    """Opens an engines folder written by `arc2face-export`; stages are loaded on first use."""

    def __init__(self, engines_dir: str | Path, backend: str = "auto", device: str = "auto", verify: bool = True,
                 cpu_precision: str = "auto"):
        """`verify`: check every file's content against the manifest's sha256 before use (hashing a
        file only when it changed since its last check, see `integrity`); False checks sizes only.
        `cpu_precision`: OpenVINO's auto | fp32 | bf16 | int8 (`backends.openvino`)."""
        self.engines_dir = checks.path(engines_dir, "engines folder")
        checks.choice(device, "device (--device)", DEVICES)
        verify = checks.flag(verify, "verify")
        checks.choice(cpu_precision, "cpu_precision (--cpu-precision)", CPU_PRECISIONS)
        self.manifest = load_manifest(self.engines_dir)
        self.backend = pick_backend(self.engines_dir, self.manifest, backend, device)
        self.device = device
        section = "plans" if self.backend == "trt" else "stages"
        if not self.manifest.get(section):
            how = "build-engines --out" if section == "plans" else "onnx --model-dir MODEL --out"
            raise EngineMismatchError(f"{self.engines_dir}: has no {section}; write them with "
                                      f"`arc2face-export {how} {self.engines_dir}`")
        files = {rel: r for rec in self.manifest[section].values() for rel, r in record_files(rec).items()}
        self._verify_mode = "stamp" if verify else "size"
        self.verify_report = verify_records(self.engines_dir, files, mode=self._verify_mode)
        self._sessions: dict = {}
        self._trt_memory = None        # one activation buffer shared by the TensorRT engines
        self._trt_generators: dict = {}  # step stage -> TrtGenerator (TensorRT: one host sync per batch)
        self.openvino = None           # OpenVINO: the resolved --cpu-precision and compile cache
        if self.backend == "openvino":
            from .backends.openvino import OpenVinoStages
            self.openvino = OpenVinoStages(self.engines_dir, self.manifest, cpu_precision, verify=verify,
                                           cache_key=provenance.engine_id(self.manifest, ("stages",)))
        elif cpu_precision != "auto" and not (cpu_precision == "fp32" and self.manifest.get("precision") == "fp32"):
            raise InvalidInputError(f"--cpu-precision {cpu_precision} needs --backend openvino "
                                    f"(the {self.backend} backend runs the folder's {self.manifest.get('precision')} "
                                    "graphs): drop --cpu-precision, or run OpenVINO (`pip install "
                                    "'arc2face-rt[openvino]'`, on an fp32 export)")
        # predicted: CUDA wanted (an explicit --device cuda is taken at its word, as Ray actors elsewhere need)
        self._ort_gpu = self.backend == "ort" and (device == "cuda" or folder_setup.ort_gpu_usable(device))
        self.precision = self.run_params()["precision"]     # the denoiser's compute precision (PNGs record it)

    def run_params(self) -> dict:
        """How this pipeline's pixels are made beyond the options (`provenance`: backend, precision, engine
        id; ONNX Runtime on the GPU: device, fused graphs, TF32), recorded in every PNG. Known before any
        graph is opened; with sessions open, where ONNX Runtime actually runs them."""
        if self.backend != "ort":
            return provenance.run_record(self.manifest, self.backend, self.openvino and self.openvino.precision)
        fused_files = {str(resolve_inside(self.engines_dir, stage_file(r)))
                       for r in self.manifest.get(provenance.ORT_CUDA, {}).values()}
        on_gpu, fused = provenance.from_sessions(self._sessions, fused_files) if self._sessions else \
            (self._ort_gpu, provenance.ort_fused_wanted(self.manifest))
        return provenance.run_record(self.manifest, "ort", on_gpu=on_gpu, fused=fused)

    def legacy_engine_id(self) -> str | None:
        """The engine id older PNGs of this setup recorded (`provenance.legacy_engine_id`), or None."""
        return provenance.legacy_engine_id(self.manifest, self.run_params())

    @property
    def engine_id(self) -> str:
        """Short hash naming the exact graphs this pipeline runs (recorded in every PNG; `provenance`)."""
        return self.run_params()["engines"]

    @property
    def has_control(self) -> bool:
        """Whether this folder has the ControlNet step graphs (for the backend's section)."""
        section = "plans" if self.backend == "trt" else "stages"
        return any(n in self.manifest.get(section, {}) for n in CONTROL_STAGES)

    def session(self, name: str):
        if name not in self._sessions:
            if self.openvino is not None:
                self.openvino.check_stage(name)          # what this precision cannot run, before what is missing
            section = "plans" if self.backend == "trt" else "stages"
            if name in CONTROL_STAGES and name not in self.manifest[section]:
                how = (f"`arc2face-export build-engines --out {self.engines_dir}`" if section == "plans" and
                       name in self.manifest.get("stages", {}) else
                       "an export of a model folder with controlnet/: " + reexport_advice(self.engines_dir, True))
                raise EngineMismatchError(f"{self.engines_dir}: has no ControlNet step graph '{name}' for "
                                          f"--control-image; write it with {how}")
            if name not in self.manifest[section]:
                raise refused(self.engines_dir, f"{self.engines_dir}: no '{name}' stage")
            if self.backend == "trt":
                from .backends.trt import SharedDeviceMemory, open_session   # TensorRT, cuda-python: lazily
                if self._trt_memory is None:
                    self._trt_memory = SharedDeviceMemory()
                sess = open_session(self._stage_path(section, name), memory=self._trt_memory)
            elif self.openvino is not None:
                sess = self.openvino.open(name)
            else:
                from .backends.ort import open_session as open_ort   # "on GPU": what ORT reports
                sess = open_ort(self._stage_path(section, name), device=self.device, step=name in STEP_STAGES,
                                cuda_path=self._ort_cuda_path(name))
            self._check_io(name, sess)
            try:                                # what it read is what was verified: no other export's file
                fused = self.manifest.get(provenance.ORT_CUDA, {}).get(name) if self.backend == "ort" else None
                check_unchanged(self.engines_dir, self.verify_report.stats,
                                {**record_files(self.manifest[section][name]), **(record_files(fused) if fused else {})})
            except EngineMismatchError:
                sess.close()
                raise
            self._sessions[name] = sess
        return self._sessions[name]

    def _check_io(self, name: str, sess) -> None:
        """The graph loaded for a stage must have that stage's inputs and outputs (a manifest whose
        records were swapped would otherwise feed latents to the projector)."""
        spec = ALL_STAGES[name]
        want = (sorted(t.name for t in spec.inputs), sorted(t.name for t in spec.outputs))
        got = (sorted(sess.input_names), sorted(sess.output_names))
        if got != want:
            sess.close()
            path = self._stage_path("plans" if self.backend == "trt" else "stages", name)
            raise refused(self.engines_dir, f"{path}: is not a '{name}' graph (inputs {got[0]}, outputs {got[1]}; "
                                            f"expected {want[0]}, {want[1]})")

    def _stage_path(self, section: str, name: str) -> Path:
        """The file the manifest records for a stage (the one that was verified), inside the folder."""
        return resolve_inside(self.engines_dir, stage_file(self.manifest[section][name]))

    def _ort_cuda_path(self, name: str) -> Path | None:
        """The stage's graph with ONNX Runtime's CUDA fusions (`onnx --ort-cuda`), verified, or None
        (none in the folder, or ARC2FACE_ORT_FUSED=0); ONNX Runtime uses it only on a GPU."""
        rec = self.manifest.get(provenance.ORT_CUDA, {}).get(name)
        if rec is None or not provenance.ort_fused_wanted(self.manifest) or not self._ort_gpu:
            return None
        self.verify_report.stats.update(verify_records(self.engines_dir, record_files(rec), mode=self._verify_mode).stats)
        return resolve_inside(self.engines_dir, stage_file(rec))

    def _trt_generator(self, cfg: bool, control: bool = False):
        """TensorRT: projector, loop and decoder of a batch on one stream with one host sync; else None."""
        if self.backend != "trt":
            return None
        name = step_stage(cfg, control)
        if name not in self._trt_generators:
            from .backends.trt import TrtGenerator
            self._trt_generators[name] = TrtGenerator(self.session(PROJECTOR.name), self.session(name),
                                                      self.session(VAE_DECODER.name))
        return self._trt_generators[name]

    def schedule(self, name: str, steps: int) -> Schedule:
        """The coefficient table of `name` for `steps`, from this folder's scheduler config."""
        checks.choice(name, "scheduler (--scheduler)", SCHEDULERS)
        check_folder_scheduler(self.engines_dir, self.manifest, name)
        return make_schedule(name, steps, self.manifest.get("scheduler_config"))

    def prepare(self, options: GenerationOptions, control: bool = False) -> Schedule:
        """Check `options` against this folder and open every session a run with them needs, so that a
        run fails before it has written anything (steps out of range, a step graph or backend missing).
        `control`: the run has a ControlNet condition image."""
        options = checked_options(options)
        schedule = self.schedule(options.scheduler, options.steps)
        for name in (PROJECTOR.name, step_stage(options.guidance > 1.0, control), VAE_DECODER.name):
            self.session(name)
        return schedule

    # ---- stages -------------------------------------------------------------------------------
    def project(self, ids: np.ndarray) -> np.ndarray:
        # ids: [B, 512] -> cond [B, 77, 768]
        return self.session(PROJECTOR.name).run({"id": np.ascontiguousarray(ids, np.float32)})["cond"]

    def denoise(self, cond: np.ndarray, x: np.ndarray, schedule: Schedule, guidance: float,
                noise: np.ndarray | None = None, on_step: Callable[[int], None] | None = None,
                trajectory: list | None = None, control: np.ndarray | None = None,
                control_scale: float = 1.0) -> np.ndarray:
        """cond [B, 77, 768], x [B, 4, 64, 64], noise [N, B, 4, 64, 64] or None, control [B, 3, 512, 512]
        in [0, 1] or None (ControlNet step graphs) -> final latents."""
        cfg = guidance > 1.0
        sess = self.session(step_stage(cfg, control is not None))
        table = schedule.table(np.float32)
        extra = {}
        if control is not None:
            extra = {"control": np.ascontiguousarray(control, np.float32),
                     "control_scale": np.array([control_scale], np.float32)}
        if hasattr(sess, "denoise_loop") and trajectory is None:
            out = sess.denoise_loop(x, cond, table, guidance if cfg else None, noise, **extra)
            if on_step:
                on_step(schedule.steps)
            return out
        m = np.zeros_like(x)
        zeros = m
        feeds = {"cond": cond, **extra}
        if cfg:
            feeds["guidance"] = np.array([guidance], np.float32)
        for k in range(schedule.steps):
            feeds.update(x=x, m_prev=m, coeffs=table[k], noise=zeros if noise is None else noise[k])
            out = sess.run(feeds)
            x, m = out["x_out"], out["m0"]
            if trajectory is not None:
                trajectory.append(x)
            if on_step:
                on_step(1)
        return x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        # latents [B, 4, 64, 64] -> [B, 512, 512, 3] uint8
        return self.session(VAE_DECODER.name).run({"latents": np.ascontiguousarray(latents, np.float32)})["image"]

    # ---- the whole thing ----------------------------------------------------------------------
    def generate(self, identity: np.ndarray, num_images: int = 1, options: GenerationOptions = GenerationOptions(),
                 on_step: Callable[[int], None] | None = None, first_index: int = 0,
                 indices: Sequence[int] | None = None, control: Control | None = None) -> GenerationResult:
        """Images of one identity ([512] ArcFace features, any norm: it is normalised in float64 from the
        values given, so a copy scaled by a power of two, or a float64 copy of float32 values, is the same
        identity, while another scale, or float64 values rounded to float32, is, bit for bit, another one:
        another fingerprint, pixels a grey level apart):
        indices `first_index` ..
        `first_index + num_images - 1`, or exactly `indices`. Image i's noise depends only on (identity,
        options, i, its control image), never on the batch size or on which other images are made with it;
        another batch size may move its pixels by one grey level (ONNX Runtime's kernels per batch shape).
        `control`: a pose condition (ControlNet step graphs), one image for all or one per index.
        All images are kept in memory: at most `max_images_in_memory()` (`iter_many` streams more)."""
        num_images, first_index = checks.whole(num_images, "num_images"), checks.whole(first_index, "first_index")
        if indices is None:
            if not 1 <= num_images <= MAX_INDEX:
                raise InvalidInputError(f"-n / num_images must be in 1..2**63-1 (got {num_images})")
            if not 0 <= first_index <= MAX_INDEX - num_images + 1:
                raise InvalidInputError(f"first_index must be in 0..2**63-num_images (got {first_index})")
            indices = range(first_index, first_index + num_images)
        elif not isinstance(indices, range):            # a range is never listed (2**63 indices)
            indices = checks.sequence(indices, "indices", "a sequence of image indices, such as [0, 1]")
        return self.generate_many(normalize_identity(identity)[None], options=options, indices=[indices],
                                  on_step=on_step, control=control)

    def generate_many(self, identities: np.ndarray, num_images: int = 1,
                      options: GenerationOptions = GenerationOptions(), **kw) -> GenerationResult:
        """Images of several identities ([M, 512]) in shared batches (the step graph takes a batch of
        different conditions), identity-major; all in memory, at most `max_images_in_memory()` (see
        `iter_many`, which takes the same arguments and streams). Each equals
        `generate(identities[j], indices=[i], options with seed seeds[j])`."""
        options = checked_options(options)
        ids, indices, _ = run_items(identities, num_images, kw.get("indices"), kw.get("seeds"), options.seed)
        total, limit = sum(index_count(idx) for idx in indices), max_images_in_memory()
        if total > limit:
            raise InvalidInputError(
                f"{total} images do not fit in memory: generate keeps them all ({IMAGE_BYTES / 1e6:.2f} MB each), and "
                f"half of this machine's memory holds {limit}; use Arc2FacePipeline.iter_many (one batch at a time) "
                "or `arc2face-rt generate`/`dataset`, which write each batch to disk")
        images = np.empty((total, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)   # filled in place: no second copy
        params, t, n = [], dict.fromkeys(("project", "denoise", "decode", "total"), 0.0), 0
        for part in self.iter_many(ids, num_images, options, **{**kw, "indices": indices}):
            images[n:n + len(part.images)] = part.images
            n += len(part.images)
            params += part.params
            for k in t:
                t[k] += part.timings.get(k, 0.0)
        return GenerationResult(images, params, t)

    def iter_many(self, identities: np.ndarray, num_images: int = 1, options: GenerationOptions = GenerationOptions(),
                  *, indices: Sequence[Sequence[int]] | None = None, seeds: Sequence[int] | None = None,
                  on_step: Callable[[int], None] | None = None,
                  control: Control | None = None) -> Iterator[GenerationResult]:
        """Images of identity j: indices 0 .. num_images - 1, or exactly `indices[j]`, with noise seed
        `seeds[j]` (default options.seed); one GenerationResult per batch of `options.batch_size`
        images, so memory stays bounded (a range of indices is never listed: any count up to 2**63-1).
        Each identity is projected alone (batch 1): its condition has the same bytes as in `generate`.
        TensorRT (one identity per generator call) splits a batch where the identity changes.
        `control`: as in `generate`, by image index. The arguments are checked, and the sessions a control
        run needs opened, when it is called, before the first batch is asked for."""
        options = checked_options(options)
        ids, indices, seeds = run_items(identities, num_images, indices, seeds, options.seed)
        if on_step is not None and not callable(on_step):
            raise InvalidInputError(f"on_step must be a function of the steps done (or None), not {type(on_step).__name__}")
        if control is not None:
            if not isinstance(control, Control):
                raise InvalidInputError(f"control must be a Control (from_files reads images), not "
                                        f"{type(control).__name__}")
            control.check_indices([max(index_bounds(idx)[1] for idx in indices if idx)])
            self.session(step_stage(options.guidance > 1.0, True))     # a folder without them: before any work
        schedule = self.schedule(options.scheduler, options.steps)
        return self._batches(ids, indices, seeds, options, schedule, on_step, control)

    def _batches(self, ids: list, indices: list, seeds: list, options: GenerationOptions, schedule: Schedule,
                 on_step, control: Control | None) -> Iterator[GenerationResult]:
        """iter_many's batches, made as they are asked for (its arguments checked)."""
        gen = self._trt_generator(options.guidance > 1.0, control is not None)
        conds: dict[int, np.ndarray] = {}
        for batch in run_batches(indices, options.batch_size):
            check_interrupt()               # a Ctrl-C a library swallowed while it loaded stops here
            t = {"project": 0.0, "denoise": 0.0, "decode": 0.0}
            t_all = time.perf_counter()
            if gen is None:                 # conditions [1, 77, 768] of this batch's identities, kept for the next
                t0 = time.perf_counter()
                conds = {j: conds[j] if j in conds else self.project(ids[j][None]) for j, _ in batch}
                t["project"] = time.perf_counter() - t0
            draws = [image_noise(seeds[j], i, schedule) for j, i in batch]
            x = np.stack([d[0] for d in draws])
            noise = np.stack([d[1] for d in draws], axis=1) if schedule.uses_noise else None
            runs = [list(range(len(batch)))] if gen is None else \
                [[k for k, (j, _) in enumerate(batch) if j == jj] for jj in dict.fromkeys(j for j, _ in batch)]
            imgs = []
            for run in runs:
                j = batch[run[0]][0]
                cond = None if gen is not None else np.concatenate([conds[batch[k][0]] for k in run])
                ctrl = None if control is None else (control.batch([batch[k][1] for k in run]), control.scale)
                out, seconds = self._batch(gen, ids[j], cond, x[run], None if noise is None else noise[:, run],
                                           schedule, options.guidance, on_step, ctrl)
                imgs.append(out)
                for k, v in seconds.items():
                    t[k] += v
            params = [self.image_params(replace(options, seed=seeds[j]), i, ids[j], control) for j, i in batch]
            t["total"] = time.perf_counter() - t_all
            yield GenerationResult(np.concatenate(imgs), params, t)

    def _batch(self, gen, identity, cond, x, noise, schedule: Schedule, guidance: float, on_step,
               control: tuple | None = None) -> tuple:
        """Images of one batch and the seconds of its stages: TensorRT runs the batch on one stream with
        one host sync (stage times from CUDA events); otherwise denoise and decode with host arrays.
        `control`: (images [B, 3, 512, 512], scale) or None."""
        extra = {} if control is None else {"control": control[0], "control_scale": control[1]}
        def non_finite():                   # NaN/inf latents would decode to black images without a word
            fix = (" in fp16; export from intact weights, or in fp32 (--precision fp32)"
                   if self.manifest.get("precision") == "fp16" else "; export from intact weights (and an intact LoRA)")
            return MissingWeightsError(f"{self.engines_dir}: the denoising loop produced NaN/inf latents: the "
                                       f"engines' weights (or a fused LoRA) give non-finite values{fix}")
        if gen is not None:
            try:
                imgs, seconds = gen.generate(identity, x, schedule.table(np.float32),
                                             guidance if guidance > 1.0 else None, noise, **extra)
            except FloatingPointError:
                raise non_finite() from None
            if on_step:
                on_step(schedule.steps)
            return imgs, seconds
        t0 = time.perf_counter()
        lat = self.denoise(cond, x, schedule, guidance, noise, on_step=on_step, **extra)
        if not np.isfinite(lat).all():
            raise non_finite()
        t1 = time.perf_counter()
        imgs = self.decode(lat)
        return imgs, {"denoise": t1 - t0, "decode": time.perf_counter() - t1}

    def image_params(self, options: GenerationOptions, index: int, identity: np.ndarray,
                     control: Control | None = None) -> dict:
        """What image `index` records in its PNG: everything it is a function of. The identity (and a
        control image) appears only as a 64-bit fingerprint (which cannot be turned back into it)."""
        p = asdict(options)
        if control is not None:
            p.update(control.params(index))
        p.pop("batch_size")
        p.update(index=index, identity=identity_fingerprint(identity), **self.run_params(), arc2face_rt=__version__)
        if self.manifest.get("source", {}).get("random_weights"):
            p["random_weights"] = True
        return p

    def close(self) -> None:
        for g in self._trt_generators.values():
            g.close()
        self._trt_generators.clear()
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()
        if self._trt_memory is not None:
            self._trt_memory.close()
            self._trt_memory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

