"""One runner per backend row: load, generate a batch, and the stages it has, all behind one surface.

    r = RUNNERS[name](cfg); r.load(); images = r.generate(batch); r.stages() -> {stage: callable}

Every runner starts from the same identity (random_identity(0)) and the same initial latents
(pipeline.image_noise(seed 0, image i)), so all rows make the same images up to rounding; a row's
`image_mean` lets the harness check that. `generate` returns host uint8 images, so GPU work is
finished when it returns (torch rows also synchronise explicitly before a timer is read).

The ONNX Runtime, TensorRT and OpenVINO runners import no torch: their child process's memory is the runtime's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from arc2face_rt.pipeline import image_noise, random_identity
from arc2face_rt.schedulers import make_schedule

SEED = 0
DETECTOR_FILE, RECOGNIZER_FILE = "scrfd_10g_bnkps.onnx", "arcface.onnx"


def _latents(batch: int, steps: int, scheduler_config: dict | None) -> np.ndarray:
    sched = make_schedule("dpmpp2m", steps, scheduler_config)
    return np.stack([image_noise(SEED, i, sched)[0] for i in range(batch)])   # [B, 4, 64, 64]


class Runner:
    name = "?"
    has_face_stages = False

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.steps, self.guidance = cfg["steps"], cfg["guidance"]
        self.identity = random_identity(SEED)
        self.notes: list[str] = []

    def sync(self) -> None:
        """Wait for queued device work (nothing to wait for on host-synchronous backends)."""

    def load(self) -> None:
        raise NotImplementedError

    def generate(self, batch: int) -> np.ndarray:
        raise NotImplementedError

    def stages(self) -> dict:
        return {}

    def compile_parts(self) -> dict:
        """{label: call} that each compile one model at the shapes of the first image; the harness times
        them one by one before that image, so a compile that outlasts --row-timeout is named."""
        return {}

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    # ---- the face front end (detect, embed): ONNX Runtime (OpenVINO f32 for the OpenVINO rows) ------
    def face_stages(self, device: str, backend: str = "ort") -> dict:
        face_dir = Path(self.cfg.get("face_dir") or self.cfg["model_dir"])
        det_path, rec_path = face_dir / DETECTOR_FILE, face_dir / RECOGNIZER_FILE
        if not (det_path.is_file() and rec_path.is_file()):
            self.notes.append(f"detect/embed not timed: {det_path.name} / {rec_path.name} not in {face_dir}")
            return {}
        from arc2face_rt.face import ArcFaceRecognizer, ScrfdDetector, align_face

        det = ScrfdDetector.from_file(det_path, device=device, backend=backend)
        rec = ArcFaceRecognizer.from_file(rec_path, device=device, backend=backend)
        # A fixed 512x512 photo-sized input. The random-weight detector "finds" one face on any image;
        # real SCRFD finds none in noise, which does not change its cost (NMS over no boxes is free).
        image = np.random.default_rng(SEED).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        faces = det.detect(image)
        crop = align_face(image, faces[0].kps) if faces else image[200:312, 200:312].copy()
        if self.cfg.get("random_weights"):
            self.notes.append("detector/recognizer are random-weight stand-ins (full: real IResNet-100 "
                              "recognizer; the detector's compute is not SCRFD-10G's)")
        return {"detect": lambda: det.detect(image), "embed": lambda: rec.embed(crop)}


class RuntimeRunner(Runner):
    """arc2face_rt.pipeline.Arc2FacePipeline on an engines folder (backend ort, trt or openvino)."""
    backend = "ort"
    has_face_stages = True

    def load(self) -> None:
        from arc2face_rt.pipeline import Arc2FacePipeline

        self.pipe = Arc2FacePipeline(self.cfg["engines_dir"], backend=self.backend, device=self.cfg["ort_device"],
                                     cpu_precision=self.cfg.get("cpu_precision") or "auto")
        # open every stage now: loading is part of the cold start, not of the first timed stage
        from arc2face_rt.specs import PROJECTOR, STEP_CFG, VAE_DECODER
        for s in (PROJECTOR, STEP_CFG, VAE_DECODER):
            self.pipe.session(s.name)

    def generate(self, batch: int) -> np.ndarray:
        from arc2face_rt.pipeline import GenerationOptions

        opts = GenerationOptions(steps=self.steps, guidance=self.guidance, seed=SEED, batch_size=batch)
        return self.pipe.generate(self.identity, batch, opts).images

    def stages(self) -> dict:
        p = self.pipe
        sched = p.schedule("dpmpp2m", self.steps)
        ids = self.identity[None]
        cond = p.project(ids)
        x = _latents(1, self.steps, p.manifest.get("scheduler_config"))
        lat = p.denoise(cond, x, sched, self.guidance)
        step_sess = p.session("step_cfg" if self.guidance > 1 else "step")
        feeds = {"x": x, "m_prev": np.zeros_like(x), "noise": np.zeros_like(x), "cond": cond,
                 "coeffs": sched.table(np.float32)[0]}
        if self.guidance > 1:
            feeds["guidance"] = np.array([self.guidance], np.float32)
        out = {"project": lambda: p.project(ids), "step": lambda: step_sess.run(feeds),
               "steps": lambda: p.denoise(cond, x, sched, self.guidance), "decode": lambda: p.decode(lat)}
        face_device = "cpu" if self.cfg["device"] == "cpu" else "auto"
        return {**self.face_stages(face_device, "openvino" if self.backend == "openvino" else "ort"), **out}

    def info(self) -> dict:
        sess = self.pipe._sessions.get("step_cfg")
        info = {"engines_dir": str(self.cfg["engines_dir"]), "precision": self.pipe.precision}
        if sess is not None and hasattr(sess, "providers"):
            info["providers"] = list(sess.providers)
            info["cuda_graph"] = bool(getattr(sess, "cuda_graph", False))
        info["graphs"] = {k: Path(s.path).name for k, s in self.pipe._sessions.items() if getattr(s, "path", None)}
        if sess is not None and hasattr(sess, "providers"):      # an ONNX Runtime session: which onnxruntime ran it
            from .env import onnxruntime_in_use
            info["onnxruntime"] = onnxruntime_in_use()
            info["cuda_graph_refused"] = getattr(sess, "cuda_graph_refused", None)
        ov = self.pipe.openvino
        if ov is not None:
            import openvino

            heavy = "bf16" if ov.precision.heavy == "bf16" else "fp32"
            # `precision`: the --cpu-precision that ran (int8's float part is in stage_precisions; the PNGs'
            # full label in `run`)
            info.update(precision=ov.precision.name, run=self.pipe.run_params(),
                        openvino=openvino.get_version(), cpu=ov.isa.as_dict(), isa=ov.isa.summary(),
                        compile_cache=str(ov.cache.folder) if ov.cache else None,
                        stage_precisions={"project": "fp32", "decode": heavy,
                                          "step": "int8" if ov.precision.int8_steps else heavy})
        return info

    def close(self) -> None:
        self.pipe.close()


class OrtRunner(RuntimeRunner):
    name, backend = "ort", "ort"


class TrtRunner(RuntimeRunner):
    name, backend = "trt", "trt"


class OpenVinoRunner(RuntimeRunner):
    """The pipeline with backend="openvino" at cfg["cpu_precision"] (fp32 | bf16 | int8)."""
    name, backend = "openvino", "openvino"


class TorchRunner(Runner):
    """Our PyTorch reference pipeline (reference/arc2face_ref/pipeline.py), eager or torch.compile'd UNet.

    ReferencePipeline.__call__ works on host tensors only, so this is the same recipe with a device:
    projector -> N x (UNet on [uncond; cond], CFG, diffusers DPM-Solver++ step) -> VaeDecode.
    Latents and the scheduler stay fp32; on a GPU the models run in fp16 (as the diffusers row)."""
    name = "torch"
    compile = False

    def load(self) -> None:
        import torch

        from arc2face_ref.loading import load_models
        from arc2face_ref.modules import VaeDecode
        from arc2face_ref.pipeline import diffusers_scheduler
        from arc2face_ref.projector import Arc2FaceProjector, unconditional_embedding

        self.torch = torch
        self.dev = torch.device(self.cfg["device"])
        self.dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        if self.cfg.get("torch_dtype") == "bf16":      # diffusers-bf16: the whole pipeline in bfloat16
            self.dtype = torch.bfloat16
        m = load_models(self.cfg["model_dir"])
        for mod in (m.unet, m.vae, m.encoder):
            mod.to(self.dev, self.dtype)
        self.models = m
        # The reference creates its token ids and causal mask with factory calls that take the default
        # device: make that the row's device while the projector runs.
        with self.dev:
            self.projector = Arc2FaceProjector(m.encoder).eval()
            self.uncond = unconditional_embedding(m.encoder)             # [77, 768]
        self.decoder = VaeDecode(m.vae).eval()
        self.unet = m.unet
        if self.compile:                    # UNet and VAE decoder (the two stages that carry the FLOPs)
            mode = self.cfg.get("compile_mode") or None
            self.unet = torch.compile(m.unet, mode=mode)
            self.decoder = torch.compile(self.decoder, mode=mode)
        self.make_scheduler = lambda: diffusers_scheduler("dpmpp2m", m.scheduler_config)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def _project(self, ids: np.ndarray):
        with self.dev:
            return self.projector(self.torch.from_numpy(ids).to(self.dev, self.dtype))

    def _step(self, sched, t, x, enc):
        # x: [B, 4, 64, 64] fp32; enc: [2B, 77, 768] ([uncond; cond])
        x_in = sched.scale_model_input(x, t).to(self.dtype)
        eps_u, eps_c = self.unet(self.torch.cat([x_in, x_in]), t, enc).sample.float().chunk(2)
        eps = eps_u + self.guidance * (eps_c - eps_u)
        return sched.step(eps, t, x).prev_sample

    def compile_parts(self) -> dict:
        if not self.compile:
            return {}
        torch = self.torch
        # the first image's inputs: the same shapes, dtypes and devices, so that image compiles nothing new
        x = torch.from_numpy(_latents(1, self.steps, self.models.scheduler_config)).to(self.dev)

        def first_step():
            with torch.no_grad():
                cond = self._project(self.identity[None])
                sched = self.make_scheduler()
                sched.set_timesteps(self.steps, device=self.dev)
                self._step(sched, sched.timesteps[0], x, torch.cat([self.uncond[None], cond]))

        def decode():
            with torch.no_grad():
                self.decoder(x)
        return {"UNet": first_step, "VAE decoder": decode}

    def _loop(self, cond, x):
        sched = self.make_scheduler()
        sched.set_timesteps(self.steps, device=self.dev)
        enc = self.torch.cat([self.uncond[None].expand_as(cond), cond])
        for t in sched.timesteps:
            x = self._step(sched, t, x, enc)
        return x

    def generate(self, batch: int) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            cond = self._project(np.repeat(self.identity[None], batch, axis=0))
            x = torch.from_numpy(_latents(batch, self.steps, self.models.scheduler_config)).to(self.dev)
            images = self.decoder(self._loop(cond, x)).cpu().numpy()
        self.sync()
        return images

    def stages(self) -> dict:
        torch = self.torch
        ids = self.identity[None]
        with torch.no_grad():
            cond = self._project(ids)
            x = torch.from_numpy(_latents(1, self.steps, self.models.scheduler_config)).to(self.dev)
            lat = self._loop(cond, x)
        enc = torch.cat([self.uncond[None], cond])
        sched = self.make_scheduler()

        def step():
            sched.set_timesteps(self.steps, device=self.dev)      # fresh multistep state: first step
            return self._step(sched, sched.timesteps[0], x, enc)

        def nograd(fn):
            def run():
                with torch.no_grad():
                    out = fn()
                self.sync()
                return out
            return run
        return {"project": nograd(lambda: self._project(ids)), "step": nograd(step),
                "steps": nograd(lambda: self._loop(cond, x)), "decode": nograd(lambda: self.decoder(lat))}

    def info(self) -> dict:
        names = {self.torch.float16: "fp16", self.torch.bfloat16: "bf16", self.torch.float32: "fp32"}
        return {"precision": names[self.dtype],
                "torch_threads": self.torch.get_num_threads(),
                **({"compile_mode": self.cfg.get("compile_mode") or "default"} if self.compile else {})}

    def peak_torch_gpu_mib(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return round(self.torch.cuda.max_memory_allocated() / 2**20, 1)


class TorchCompileRunner(TorchRunner):
    name = "torch-compile"
    compile = True


class DiffusersRunner(TorchRunner):
    """The baseline a user would otherwise run: diffusers' StableDiffusionPipeline (fp16 on a GPU, fp32 on
    a CPU; `diffusers-bf16`: every model and the latents in bfloat16, as with torch_dtype=torch.bfloat16),
    given the Arc2Face projector output as prompt_embeds and the constant uncond as
    negative_prompt_embeds (tokenizer=None: the prompt is never tokenised)."""
    name = "diffusers"

    def load(self) -> None:
        super().load()
        from diffusers import StableDiffusionPipeline

        m = self.models
        self.sd = StableDiffusionPipeline(vae=m.vae, text_encoder=m.encoder, tokenizer=None, unet=m.unet,
                                          scheduler=self.make_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
        self.sd.set_progress_bar_config(disable=True)

    def _sd(self, cond, x, output_type: str):
        uncond = self.uncond[None].expand_as(cond)
        return self.sd(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x,
                       num_inference_steps=self.steps, guidance_scale=self.guidance, output_type=output_type).images

    def generate(self, batch: int) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            cond = self._project(np.repeat(self.identity[None], batch, axis=0))
            x = torch.from_numpy(_latents(batch, self.steps, self.models.scheduler_config)).to(self.dev, self.dtype)
            images = np.round(self._sd(cond, x, "np") * 255).astype(np.uint8)
        self.sync()
        return images

    def stages(self) -> dict:
        torch = self.torch
        ids = self.identity[None]
        with torch.no_grad():
            cond = self._project(ids)
            x = torch.from_numpy(_latents(1, self.steps, self.models.scheduler_config)).to(self.dev, self.dtype)
            lat = self._sd(cond, x, "latent")
        vae, proc = self.sd.vae, self.sd.image_processor

        def decode():   # what the pipeline does after its loop with output_type="np"
            img = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
            return proc.postprocess(img, output_type="np")

        def nograd(fn):
            def run():
                with torch.no_grad():
                    out = fn()
                self.sync()
                return out
            return run
        # no single "step": the pipeline's loop is not separable without re-implementing it
        return {"project": nograd(lambda: self._project(ids)), "steps": nograd(lambda: self._sd(cond, x, "latent")),
                "decode": nograd(decode)}

    def info(self) -> dict:
        import diffusers
        return {**super().info(), "pipeline": f"diffusers {diffusers.__version__} StableDiffusionPipeline"}


RUNNERS = {"ort": OrtRunner, "torch": TorchRunner, "torch-compile": TorchCompileRunner,
           "diffusers": DiffusersRunner, "diffusers-bf16": DiffusersRunner, "trt": TrtRunner,
           "openvino-fp32": OpenVinoRunner, "openvino-bf16": OpenVinoRunner, "openvino-int8": OpenVinoRunner}
