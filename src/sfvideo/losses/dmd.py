"""Distribution Matching Distillation generator loss (Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", eq. 7-8), as Self Forcing uses it (notes §4.1).

Roles: the frozen **teacher** is the real score ``mu_real`` (the data distribution's denoiser, with CFG); the
trainable **critic** is the fake score ``mu_fake`` (a denoiser fitted to the generator's own samples by
``sfvideo.losses.critic``). The DMD gradient of the reverse KL with respect to a generator sample ``x`` is
approximately ``x0_fake - x0_real`` at a random noise level (eq. 7), normalised per sample by
``mean |x - x0_real|`` (eq. 8).

The loss is written as ``0.5 MSE(x, stopgrad(x - grad))`` so that ``d loss / d x = grad / numel`` and the
gradient reaches the generator only through ``x``: both score networks run under ``no_grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser, guided_x0
from sfvideo.diffusion.schedule import add_noise


def select_frames(x: Tensor, mask: Tensor | None) -> Tensor:
    """Restrict ``(B, F, ...)`` to the masked frames: ``mask`` is ``(F,)`` or ``(B, F)`` bool."""
    if mask is None:
        return x
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if mask.ndim == 1 and mask.shape[0] == x.shape[1]:
        return x[:, mask.to(x.device)]
    if mask.ndim == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(x.device)]
    raise ValueError(f"mask of shape {tuple(mask.shape)} matches neither (F,) nor (B, F) of x {tuple(x.shape)}")


def dmd_loss(
    x: Tensor,
    *,
    teacher: Denoiser,
    critic: Denoiser,
    cond: Tensor,
    uncond: Tensor,
    sigma: Tensor,
    noise: Tensor,
    guidance_scale: float = 3.0,
    critic_guidance_scale: float = 0.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD generator loss on generator samples.

    Args:
        x: Generator output ``(B, F, C, H, W)``, with gradient to the generator.
        teacher: Real-score denoiser (frozen).
        critic: Fake-score denoiser.
        cond: Prompt embeddings ``(B, L, D)``.
        uncond: Negative-prompt embeddings ``(B or 1, L, D)``.
        sigma: Noise level per sample ``(B,)`` (shared by all frames; ``FlowMatchSchedule.sample_dmd_sigma``).
        noise: Gaussian noise like ``x``.
        guidance_scale: Teacher CFG scale, official convention ``cond + s (cond - uncond)`` (3.0 = CFG 4).
        critic_guidance_scale: CFG on the critic (0 in the release: the cond prediction only).
        mask: Frames that enter the MSE, ``(F,)`` or ``(B, F)`` bool (notes §3.5 gradient mask); None = all.

    Returns:
        ``(loss, logs)``: a float64 scalar and detached diagnostics (``dmd_grad_norm`` = mean |grad|).
    """
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be (B,) = ({x.shape[0]},), one level per sample; got {tuple(sigma.shape)}")
    with torch.no_grad():
        x_sg = x.detach()
        xt = add_noise(x_sg, noise, sigma)
        if critic_guidance_scale == 0:
            x0_fake = critic(xt, sigma, cond)
        else:
            x0_fake = guided_x0(critic, xt, sigma, cond, uncond, critic_guidance_scale)
        x0_real = guided_x0(teacher, xt, sigma, cond, uncond, guidance_scale)
        # Eq. 7: the score difference s_fake - s_real is proportional to x0_real - x0_fake, so descending along
        # grad = x0_fake - x0_real moves x towards the teacher's denoised estimate.
        # At least fp32 (the official code stays in bf16 here); float64 inputs stay float64.
        dtype = torch.promote_types(x.dtype, torch.float32)
        grad = x0_fake.to(dtype) - x0_real.to(dtype)
        # Eq. 8: per-sample normaliser mean |x - x0_real| over (F, C, H, W) makes the step scale-free.
        normaliser = (x_sg.to(dtype) - x0_real.to(dtype)).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        grad = torch.nan_to_num(grad / normaliser)
        target = (x_sg.double() - grad.double()).detach()

    # 0.5 MSE in float64 (official): d loss / d x = grad / numel over the selected elements.
    loss = 0.5 * F.mse_loss(select_frames(x.double(), mask), select_frames(target, mask), reduction="mean")
    logs = {
        "dmd_grad_norm": grad.abs().mean().float().detach(),
        "dmd_normaliser": normaliser.mean().float().detach(),
        "dmd_sigma": sigma.float().mean().detach(),
    }
    return loss, logs
