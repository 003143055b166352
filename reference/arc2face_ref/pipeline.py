"""Reference pipeline in PyTorch: the official Arc2Face recipe with diffusers' own scheduler.

It deliberately does not use the runtime's coefficient tables: it is the oracle they are tested
against. id -> projector -> N x (UNet on [uncond; cond], CFG, diffusers scheduler.step) -> VAE.
"""
from __future__ import annotations

import numpy as np
import torch

from .loading import Arc2FaceModels
from .modules import VaeDecode
from .projector import Arc2FaceProjector, unconditional_embedding

DIFFUSERS_SCHEDULERS = {
    "dpmpp2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}


def diffusers_scheduler(name: str, config: dict):
    import diffusers

    return getattr(diffusers, DIFFUSERS_SCHEDULERS[name]).from_config(config)


class ReferencePipeline:
    def __init__(self, models: Arc2FaceModels):
        self.models = models
        self.projector = Arc2FaceProjector(models.encoder).eval()
        self.uncond = unconditional_embedding(models.encoder)     # [77, 768]
        self.decoder = VaeDecode(models.vae).eval()

    @torch.no_grad()
    def __call__(self, id_emb: np.ndarray, latents: np.ndarray, steps: int = 25, guidance: float = 3.0,
                 scheduler: str = "dpmpp2m", return_trajectory: bool = False):
        """id_emb [B, 512], latents [B, 4, 64, 64] (already times init_noise_sigma) -> uint8 [B, 512, 512, 3].

        With return_trajectory, also returns the latents after every step (list of [B, 4, 64, 64])."""
        sched = diffusers_scheduler(scheduler, self.models.scheduler_config)
        sched.set_timesteps(steps)
        dev = next(self.models.unet.parameters()).device       # a GPU during training's validation
        cond = self.projector(torch.from_numpy(id_emb).float().to(dev))
        x = torch.from_numpy(latents).float().to(dev)
        cfg = guidance > 1
        enc = torch.cat([self.uncond[None].expand_as(cond), cond]) if cfg else cond
        traj = []
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            if cfg:
                eps_u, eps_c = self.models.unet(torch.cat([x_in, x_in]), t, enc).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = self.models.unet(x_in, t, enc).sample
            x = sched.step(eps, t, x).prev_sample
            traj.append(x.cpu().numpy().copy())
        images = self.decoder(x).cpu().numpy()
        return (images, traj) if return_trajectory else images
