"""ODE regression of the causal generator onto a teacher's trajectories (CausVid, Yin et al. 2025; notes §5).

Per sample and chunk a random index ``k`` in ``[0, S)`` (one per chunk, diffusion-forcing style): every frame of
the chunk takes the trajectory's state ``k`` and the noise level ``sigma_k``; one block-causal forward (no KV
cache) predicts x0; loss = MSE(x0_pred, x_final) over frames with ``sigma_k != 0``. The trajectories come from
``sfvideo.diffusion.sampling.ode_trajectories``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.geometry import check_chunking


def sample_chunk_indices(
    batch: int,
    num_frames: int,
    frames_per_chunk: int,
    num_steps: int,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random step index per sample and chunk, repeated over the chunk's frames: ``(B, F)`` long in ``[0, S)``."""
    check_chunking(num_frames, frames_per_chunk)
    gen_device = generator.device if generator is not None else (device or "cpu")
    idx = torch.randint(0, num_steps, (batch, num_frames // frames_per_chunk), generator=generator, device=gen_device)
    return idx.repeat_interleave(frames_per_chunk, dim=1).to(device if device is not None else gen_device)


def ode_regression_loss(
    generator: Denoiser,
    trajectory: Tensor,
    step_sigmas: Tensor,
    index: Tensor,
    context: Tensor,
    *,
    frames_per_chunk: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CausVid ODE regression: ``MSE(G(x_k, sigma_k), x_final)`` over frames with ``sigma_k != 0``.

    Args:
        generator: The causal generator's denoiser (called with ``attention="block_causal"``).
        trajectory: ``(B, S + 1, F, C, H, W)``: states at ``step_sigmas``, then the final clean latent.
        step_sigmas: ``(S,)`` sigmas of the states (the generator's step list).
        index: ``(B, F)`` long in ``[0, S)``: which state each frame takes (constant within a chunk).
        context: Prompt embeddings ``(B, L, D)``.
        frames_per_chunk: Chunk size of the block-causal mask.

    Returns:
        ``(loss, logs)``; logs hold ``x0_mse_step{k}``, the mean MSE of the frames at step ``k`` (for those present).
    """
    b, s1, f = trajectory.shape[:3]
    s = step_sigmas.numel()
    if s1 != s + 1:
        raise ValueError(f"trajectory holds {s1} states, expected len(step_sigmas) + 1 = {s + 1}")
    if index.shape != (b, f):
        raise ValueError(f"index has shape {tuple(index.shape)}, expected (B, F) = {(b, f)}")
    target = trajectory[:, -1]
    gather = index.view(b, 1, f, 1, 1, 1).expand(b, 1, *trajectory.shape[2:])
    x_in = trajectory.gather(1, gather).squeeze(1)  # (B, F, C, H, W): frame f at state index[b, f]
    sigma = step_sigmas.to(torch.float32).to(trajectory.device)[index]  # (B, F)
    x0_pred = generator(x_in, sigma, context, attention="block_causal", frames_per_chunk=frames_per_chunk)
    per_frame = (x0_pred.float() - target.float()).square().mean(dim=(2, 3, 4))  # (B, F)
    # Clean-context frames (sigma 0: a step list ending in 0, or I2V's first frame) carry no loss (notes §5).
    mask = (sigma != 0).to(per_frame.dtype)
    loss = (per_frame * mask).sum() / mask.sum().clamp_min(1.0)
    logs: dict[str, Tensor] = {}
    with torch.no_grad():
        for k in range(s):
            sel = index == k
            if bool(sel.any()):
                logs[f"x0_mse_step{k}"] = per_frame.detach()[sel].mean()
    return loss, logs
