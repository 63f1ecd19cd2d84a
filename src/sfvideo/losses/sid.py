"""Score identity Distillation generator loss (Zhou et al. 2024, "Score identity Distillation", eq. 23 with the
fused weight alpha), as Self Forcing's SF-SiD uses it (notes §4.3; official ``model/sid.py``,
``SiD.compute_distribution_matching_loss``).

With ``x`` the generator sample, ``xt = (1 - sigma) x + sigma eps`` and the clean estimates of the **teacher** (real
score, with CFG) ``r = mu_real(xt)`` and of the **critic** (fake score) ``f = mu_fake(xt)``:

    L = mean[ (r - f) * ((r - x) - alpha (r - f)) / n ],      n = stopgrad(mean_{F,C,H,W} |x - r|)  per sample

Unlike DMD (``sfvideo.losses.dmd``), nothing but the normaliser ``n`` is stopped: the gradient reaches ``x``
directly and through ``xt`` via *both* score networks (official: no ``no_grad`` around either model call). With
both denoisers held fixed, ``dL/dx = -(r - f) / (n numel) = (f - r) / (n numel)``: the DMD direction; the
network paths add the SiD correction. ``alpha`` (official ``sid_alpha``, default 1) trades the two terms.

Precision as official: the product is formed in float64, the normaliser in (at least) the sample's dtype under
``no_grad``, then ``nan_to_num`` and the mean.

Consequences for the caller (the module layer):

- The critic's (and a trainable teacher's) parameters receive gradient from this loss; discard it before the
  critic step (the official trainer zero-grads the critic optimizer) or freeze them for the generator step.
- The teacher runs with gradient (activations kept): the official SiD turns on gradient checkpointing for the
  real score too, and its config pairs SiD with a 1.3B teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser, guided_x0
from sfvideo.diffusion.schedule import add_noise
from sfvideo.losses.dmd import select_frames


def sid_loss(
    x: Tensor,
    *,
    teacher: Denoiser,
    critic: Denoiser,
    cond: Tensor,
    uncond: Tensor,
    sigma: Tensor,
    noise: Tensor,
    alpha: float = 1.0,
    guidance_scale: float = 3.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SiD generator loss on generator samples.

    Args:
        x: Generator output ``(B, F, C, H, W)``, with gradient to the generator.
        teacher: Real-score denoiser (frozen parameters, but called with gradient).
        critic: Fake-score denoiser (called with gradient; see the module docstring).
        cond: Prompt embeddings ``(B, L, D)``.
        uncond: Negative-prompt embeddings ``(B or 1, L, D)``.
        sigma: Noise level per sample ``(B,)`` (``FlowMatchSchedule.sample_dmd_sigma``, the same recipe as DMD).
        noise: Gaussian noise like ``x``.
        alpha: SiD's ``alpha`` (official ``sid_alpha``, 1.0).
        guidance_scale: Teacher CFG, official convention ``cond + s (cond - uncond)`` (3.0 = CFG 4).
        mask: Frames that enter the mean, ``(F,)`` or ``(B, F)`` bool (the long-rollout gradient mask, notes
            §3.5). The official SiD accepts a ``gradient_mask`` but ignores it; pass None to match it.

    Returns:
        ``(loss, logs)``: a float64 scalar and detached diagnostics (``sid_grad_norm`` = mean |r - f| / n, the
        normalised score difference, comparable to DMD's ``dmd_grad_norm``).
    """
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be (B,) = ({x.shape[0]},), one level per sample; got {tuple(sigma.shape)}")
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x shape {tuple(x.shape)}")
    # No detach, no no_grad: xt carries the graph of x into both score networks (official model/sid.py).
    xt = add_noise(x, noise, sigma)
    x0_fake = critic(xt, sigma, cond)
    x0_real = guided_x0(teacher, xt, sigma, cond, uncond, guidance_scale)

    with torch.no_grad():
        # Same per-sample normaliser as DMD eq. 8 (official: in the sample's dtype; at least fp32 here).
        dtype = torch.promote_types(x.dtype, torch.float32)
        normaliser = (x.detach().to(dtype) - x0_real.detach().to(dtype)).abs().mean(
            dim=tuple(range(1, x.ndim)), keepdim=True
        )

    r, f, xd = x0_real.double(), x0_fake.double(), x.double()
    diff = r - f
    per_element = diff * ((r - xd) - alpha * diff) / normaliser.double()
    per_element = torch.nan_to_num(per_element)
    loss = select_frames(per_element, mask).mean()
    logs = {
        "sid_loss": loss.detach().float(),
        "sid_grad_norm": (diff.detach() / normaliser.double()).abs().mean().float(),
        "sid_normaliser": normaliser.mean().float(),
        "sid_sigma": sigma.float().mean().detach(),
    }
    return loss, logs
