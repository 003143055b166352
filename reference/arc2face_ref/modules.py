"""The torch modules that are exported as the runtime's graphs (besides the projector).

DenoiseStep is one whole denoise step, UNet + CFG + scheduler update, with the scheduler reduced
to one row of per-step coefficients (see arc2face_rt.schedulers):
    x_in  = s*x
    eps   = eps_u + g*(eps_c - eps_u)          (CFG variant; UNet once on [uncond; cond])
    m0    = a*x + b*eps
    x_out = c0*x + c1*m0 + c2*m_prev + c3*noise
Latents and the update stay fp32 whatever the UNet's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from arc2face_rt.specs import LATENT_CHANNELS


class DenoiseStep(nn.Module):
    def __init__(self, unet: nn.Module, uncond: torch.Tensor | None):
        """`uncond` [77, 768]: the constant negative embedding (CFG variant), or None (no CFG)."""
        super().__init__()
        self.unet = unet
        self.cfg = uncond is not None
        if self.cfg:
            self.register_buffer("uncond", uncond.detach().clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, x, m_prev, noise, cond, coeffs, guidance=None):
        # x, m_prev, noise: [B, 4, 64, 64] fp32; cond: [B, 77, 768]; coeffs: [8]; guidance: [1]
        t, s, a, b, c0, c1, c2, c3 = (coeffs[i] for i in range(8))
        dt = self.dtype
        x_in = (s * x).to(dt)
        cond = cond.to(dt)
        if self.cfg:
            n = x.shape[0]
            uncond = self.uncond.to(dt)[None].expand(n, -1, -1)
            eps2 = self.unet(torch.cat([x_in, x_in]), t.reshape(1), torch.cat([uncond, cond])).sample
            eps_u, eps_c = eps2.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = self.unet(x_in, t.reshape(1), cond).sample.float()
        m0 = a * x + b * eps
        x_out = c0 * x + c1 * m0 + c2 * m_prev + c3 * noise
        return x_out, m0


class VaeDecode(nn.Module):
    """latents [B, 4, 64, 64] fp32 -> image [B, 512, 512, 3] uint8, finished pixels:
    decode(latents / scaling_factor) then round(clamp(x/2 + 0.5, 0, 1) * 255), as diffusers does."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)   # 0.18215 for SD1.5
        assert vae.config.latent_channels == LATENT_CHANNELS

    def forward(self, latents):
        dt = next(self.vae.parameters()).dtype
        img = self.vae.decode((latents / self.scale).to(dt)).sample.float()  # [B, 3, 512, 512]
        img = torch.round((img / 2 + 0.5).clamp(0, 1) * 255)
        # permute before the cast: TensorRT's parser takes uint8 only at the graph boundary
        return img.permute(0, 2, 3, 1).to(torch.uint8)
