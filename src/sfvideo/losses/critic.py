"""Critic (fake score) loss: flow matching on the generator's own samples (notes §4.2).

The critic learns the denoiser of the generator's current distribution, which ``sfvideo.losses.dmd`` uses as
the fake score ``mu_fake``. Inputs are detached, so the gradient reaches the critic's parameters only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import add_noise, flow_target


def critic_loss(
    x: Tensor,
    *,
    critic: Denoiser,
    context: Tensor,
    sigma: Tensor,
    noise: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-matching MSE of the critic on generator samples.

    Args:
        x: Generator samples ``(B, F, C, H, W)`` (detached here whatever the caller passes).
        critic: Fake-score denoiser being trained.
        context: Prompt embeddings ``(B, L, D)``.
        sigma: Noise level ``(B,)`` or ``(B, F)`` (``FlowMatchSchedule.sample_dmd_sigma``).
        noise: Gaussian noise like ``x``.

    Returns:
        ``(loss, logs)``: fp32 ``MSE(flow_pred, noise - x)`` and detached diagnostics.
    """
    x = x.detach()
    xt = add_noise(x, noise, sigma)
    flow_pred = critic.flow(xt, sigma, context)
    loss = F.mse_loss(flow_pred.float(), flow_target(x, noise).float())
    return loss, {"critic_loss": loss.detach(), "critic_sigma": sigma.float().mean().detach()}
