"""The torch modules that are exported as the runtime's graphs (besides the projector).

DenoiseStep is one whole denoise step, UNet + CFG + scheduler update, with the scheduler reduced
to one row of per-step coefficients (see arc2face_rt.schedulers):
    x_in  = s*x
    eps   = eps_u + g*(eps_c - eps_u)          (CFG variant; UNet once on [uncond; cond])
    m0    = a*x + b*eps
    x_out = c0*x + c1*m0 + c2*m_prev + c3*noise
Latents and the update stay fp32 whatever the UNet's dtype.

With a ControlNet (pose), the step takes the condition image and its scale too, and does what
diffusers' StableDiffusionControlNetPipeline does (not guess mode): the ControlNet sees the UNet's
input (the CFG batch, latent input and text condition), the image duplicated for the CFG batch, and
its down/mid residuals times the scale are added inside the UNet.
"""
from __future__ import annotations

import torch
from torch import nn

from arc2face_rt.specs import LATENT_CHANNELS


class DenoiseStep(nn.Module):
    def __init__(self, unet: nn.Module, uncond: torch.Tensor | None, controlnet: nn.Module | None = None):
        """`uncond` [77, 768]: the constant negative embedding (CFG variant), or None (no CFG);
        `controlnet`: a diffusers ControlNetModel (control variants), or None."""
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.cfg = uncond is not None
        if self.cfg:
            self.register_buffer("uncond", uncond.detach().clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, x, m_prev, noise, cond, coeffs, *extra):
        # x, m_prev, noise: [B, 4, 64, 64] fp32; cond: [B, 77, 768]; coeffs: [8]; extra: guidance [1]
        # (CFG variants), then control [B, 3, 512, 512] in [0, 1] and control_scale [1] (control variants)
        t, s, a, b, c0, c1, c2, c3 = (coeffs[i] for i in range(8))
        guidance = extra[0] if self.cfg else None
        control, control_scale = extra[-2:] if self.controlnet is not None else (None, None)
        dt = self.dtype
        x_in = (s * x).to(dt)
        cond = cond.to(dt)
        if control is not None:
            control = control.to(dt)
        if self.cfg:
            n = x.shape[0]
            uncond = self.uncond.to(dt)[None].expand(n, -1, -1)
            control2 = None if control is None else torch.cat([control, control])
            eps2 = self._eps(torch.cat([x_in, x_in]), t.reshape(1), torch.cat([uncond, cond]), control2, control_scale)
            eps_u, eps_c = eps2.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = self._eps(x_in, t.reshape(1), cond, control, control_scale).float()
        m0 = a * x + b * eps
        x_out = c0 * x + c1 * m0 + c2 * m_prev + c3 * noise
        return x_out, m0

    def _eps(self, x_in, t, enc, control, control_scale):
        """The UNet's noise prediction, with the ControlNet's residuals (times control_scale) when it has one."""
        if self.controlnet is None:
            return self.unet(x_in, t, enc).sample
        down, mid = self.controlnet(x_in, t, encoder_hidden_states=enc, controlnet_cond=control, conditioning_scale=1.0,
                                    guess_mode=False, return_dict=False)
        scale = control_scale.to(x_in.dtype)
        return self.unet(x_in, t, enc, down_block_additional_residuals=[d * scale for d in down],
                         mid_block_additional_residual=mid * scale).sample


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
