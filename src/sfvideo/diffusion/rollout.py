"""The Self Forcing rollout (Huang et al. 2025, Algorithm 1; notes §3.2-§3.5) and cached few-step inference.

The generator produces a video chunk by chunk, each chunk conditioned through the KV cache on the chunks it
generated itself. Per chunk ``i`` with exit step ``s_i`` and step sigmas ``sigma_0 > ... > sigma_{S-1}``:

1. for ``j < s_i`` (no gradient): ``x0_hat = G(x_j, sigma_j)``; re-noise with *fresh* Gaussian noise,
   ``x_{j+1} = (1 - sigma_{j+1}) x0_hat + sigma_{j+1} eps`` (stochastic, not an ODE step);
2. ``j = s_i``: the same call with gradient (when enabled and the chunk is inside the gradient window); its
   ``x0_hat`` is the chunk's output, even for an early exit;
3. cache refresh (no gradient): noise the detached output to ``context_sigma`` and call ``G`` again at the same
   ``start_frame``, which overwrites the chunk's cache slot with clean-context keys and values;
4. advance ``start_frame`` by ``frames_per_chunk``.

Every call at a chunk uses the same ``start_frame``; the transformer overwrites that chunk's cache slot, so only
the refresh survives into later chunks. Generator calls per rollout: ``sum_i (s_i + 2)`` (one fewer with
``refresh_last=False``); only the exit-step calls build a graph.

Whether gradient crosses chunks through the cache is the cache's ``grad_mode`` (notes §3.6), not this module's.
Decisions shared by all ranks (exit steps) come from a generator seeded identically on every rank; the rollout
has no collectives. Inference is the same function with every exit at the last step and no gradient
(:func:`generate_latents`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import add_noise


def sample_exit_steps(
    num_chunks: int,
    num_steps: int,
    generator: torch.Generator | None,
    *,
    same_across_chunks: bool = True,
    last_step_only: bool = False,
) -> list[int]:
    """Exit-step index in ``[0, num_steps)`` for each chunk (notes §3.2).

    Always draws ``num_chunks`` integers, so the generator's stream advances the same way whatever the options.
    Seed ``generator`` identically on every rank (e.g. from ``(seed, step)``) and all ranks agree without a
    broadcast; a CPU generator avoids a device sync in ``tolist``.

    Args:
        num_chunks: Chunks in the rollout.
        num_steps: Denoising steps S of the generator.
        generator: Rank-shared random source.
        same_across_chunks: One exit shared by all chunks (the released config), the first draw.
        last_step_only: Every chunk exits at the last step (``num_steps - 1``).
    """
    if num_chunks <= 0 or num_steps <= 0:
        raise ValueError(f"sample_exit_steps: num_chunks and num_steps must be positive, got {num_chunks}, {num_steps}")
    device = generator.device if generator is not None else "cpu"
    draws = torch.randint(0, num_steps, (num_chunks,), generator=generator, device=device).tolist()
    if last_step_only:
        return [num_steps - 1] * num_chunks
    if same_across_chunks:
        return [draws[0]] * num_chunks
    return draws


def last_window_start(num_frames: int, window_frames: int) -> int:
    """First frame of the trailing ``window_frames`` (the teacher's window; notes §3.5), 0 for short rollouts."""
    return max(0, num_frames - window_frames)


@dataclass
class RolloutResult:
    """What :func:`self_forcing_rollout` returns."""

    x0: Tensor
    """Generated clean latents ``(B, F, C, H, W)``; only frames in ``grad_frames`` carry gradient."""
    num_calls: int
    """Generator forwards issued."""
    num_grad_calls: int
    """Forwards that ran with gradient enabled (the exit steps of chunks in the gradient window)."""
    grad_frames: Tensor
    """``(F,)`` bool: frames whose output was produced by a forward with gradient."""
    exit_steps: list[int]
    """Exit-step index per chunk."""
    exit_sigmas: Tensor
    """``(num_chunks,)``: input noise level of each chunk's exit step (the official ``denoised_timestep_from``/N)."""


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device (a CPU generator cannot fill a GPU tensor)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def refresh_chunk(
    denoiser: Denoiser,
    latents: Tensor,
    context: Tensor,
    *,
    kv_cache: Any,
    start_frame: int,
    context_sigma: float = 0.0,
    noise_generator: torch.Generator | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Step 3 of Algorithm 1, the clean-context cache refresh of one chunk (used by the rollout and by streaming).

    Noise the chunk's clean latents ``(B, f, C, H, W)`` to ``context_sigma`` (fresh noise when > 0) and run the
    generator on them at ``start_frame`` without gradient, overwriting the chunk's cache slot with clean-context K/V.
    The output is discarded.
    """
    kwargs = {"attention": "block_causal", "frames_per_chunk": latents.shape[1], **(model_kwargs or {})}
    with torch.no_grad():
        x = latents.detach()
        if context_sigma > 0:
            x = add_noise(x, _randn_like(x, noise_generator), context_sigma)
        sigma = torch.full(x.shape[:2], context_sigma, device=x.device, dtype=torch.float32)
        denoiser(x, sigma, context, kv_cache=kv_cache, start_frame=start_frame, **kwargs)


def self_forcing_rollout(
    denoiser: Denoiser,
    noise: Tensor,
    context: Tensor,
    *,
    step_sigmas: Tensor,
    frames_per_chunk: int,
    kv_cache: Any,
    exit_steps: Sequence[int],
    context_sigma: float = 0.0,
    noise_generator: torch.Generator | None = None,
    grad_enabled: bool = True,
    grad_from_frame: int = 0,
    start_frame: int = 0,
    refresh_last: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> RolloutResult:
    """Generate ``F`` frames chunk by chunk with the generator's own KV-cached context (Algorithm 1).

    Args:
        denoiser: The generator as a :class:`Denoiser` (a causal model that accepts ``kv_cache`` and
            ``start_frame``).
        noise: Initial Gaussian noise ``(B, F, C, H, W)``; chunk ``i`` starts from ``noise[:, i f:(i + 1) f]`` at
            ``step_sigmas[0]`` (normally 1).
        context: Prompt embeddings ``(B, L, D)``.
        step_sigmas: Generator step sigmas ``(S,)``, decreasing (``FlowMatchSchedule.step_sigmas``).
        frames_per_chunk: Latent frames per chunk f; ``F`` must be a multiple.
        kv_cache: The generator's cache (``model.new_kv_cache(...)``), reset by the caller; written in place.
        exit_steps: Exit-step index per chunk (``sample_exit_steps``), each in ``[0, S)``.
        context_sigma: Noise level of the cache refresh (the official ``context_noise`` / N; 0 = clean context).
        noise_generator: Source of the fresh re-noising and context noise (per-rank); ``randn_like`` if None.
        grad_enabled: Run the exit steps with gradient. Never turns gradient on inside an outer ``no_grad``.
        grad_from_frame: Only chunks starting at a frame index ``>= grad_from_frame`` (index into ``noise``) get
            gradient: the last teacher window of a long rollout (``last_window_start``). Multiple of f.
        start_frame: Absolute stream frame of ``noise[:, 0]`` (for a cache that already holds context).
        refresh_last: Refresh the cache after the last chunk too. True matches the official training rollout
            (so the call count is ``sum (s_i + 2)``); False saves one forward when the cache is discarded.
        model_kwargs: Extra keyword arguments for every generator call.

    Returns:
        A :class:`RolloutResult`.
    """
    b, num_frames = noise.shape[0], noise.shape[1]
    f = frames_per_chunk
    if f <= 0 or num_frames % f:
        raise ValueError(f"noise has {num_frames} frames, not a positive multiple of frames_per_chunk={f}")
    num_chunks = num_frames // f
    num_steps = step_sigmas.shape[0]
    if step_sigmas.ndim != 1 or num_steps == 0:
        raise ValueError(f"step_sigmas must be a non-empty 1-D tensor, got shape {tuple(step_sigmas.shape)}")
    if len(exit_steps) != num_chunks:
        raise ValueError(f"exit_steps has {len(exit_steps)} entries for {num_chunks} chunks")
    if any(not 0 <= s < num_steps for s in exit_steps):
        raise ValueError(f"exit_steps {list(exit_steps)} must lie in [0, {num_steps}) (step_sigmas has {num_steps})")
    if grad_from_frame % f:
        raise ValueError(f"grad_from_frame={grad_from_frame} is not a multiple of frames_per_chunk={f}")

    kwargs = {"attention": "block_causal", "frames_per_chunk": f, **(model_kwargs or {})}
    want_grad = grad_enabled and torch.is_grad_enabled()
    # Python floats: per-step sigmas are read once here, so the loop does no device syncs.
    sigmas = [float(s) for s in step_sigmas.tolist()]
    grad_frames = torch.zeros(num_frames, dtype=torch.bool)
    outputs: list[Tensor] = []
    num_calls = num_grad_calls = 0

    def call(x: Tensor, sigma: float, frame: int) -> Tensor:
        # Timesteps per frame, (B, f): the causal generator takes one noise level per frame.
        sigma_bf = torch.full((b, f), sigma, device=x.device, dtype=torch.float32)
        return denoiser(x, sigma_bf, context, kv_cache=kv_cache, start_frame=frame, **kwargs)

    for i in range(num_chunks):
        lo, hi = i * f, (i + 1) * f
        frame = start_frame + lo
        exit_step = exit_steps[i]
        chunk_grad = want_grad and lo >= grad_from_frame
        x = noise[:, lo:hi]

        # 1. Steps before the exit: no gradient; re-noise x0_hat with fresh noise to the next sigma.
        with torch.no_grad():
            for j in range(exit_step):
                x0_hat = call(x, sigmas[j], frame)
                x = add_noise(x0_hat, _randn_like(x0_hat, noise_generator), sigmas[j + 1])
                num_calls += 1

        # 2. Exit step: the chunk's output, with gradient inside the window.
        with torch.set_grad_enabled(chunk_grad):
            out = call(x, sigmas[exit_step], frame)
        num_calls += 1
        num_grad_calls += int(chunk_grad)
        grad_frames[lo:hi] = chunk_grad
        outputs.append(out)

        # 3. Cache refresh: rerun on the (noised) detached output so the slot holds clean-context K/V.
        if refresh_last or i < num_chunks - 1:
            refresh_chunk(denoiser, out, context, kv_cache=kv_cache, start_frame=frame, context_sigma=context_sigma,
                          noise_generator=noise_generator, model_kwargs=kwargs)
            num_calls += 1

    return RolloutResult(
        x0=torch.cat(outputs, dim=1),
        num_calls=num_calls,
        num_grad_calls=num_grad_calls,
        grad_frames=grad_frames,
        exit_steps=list(exit_steps),
        exit_sigmas=torch.tensor([sigmas[s] for s in exit_steps], dtype=step_sigmas.dtype),
    )


def generate_latents(
    denoiser: Denoiser,
    noise: Tensor,
    context: Tensor,
    *,
    step_sigmas: Tensor,
    frames_per_chunk: int,
    kv_cache: Any,
    context_sigma: float = 0.0,
    noise_generator: torch.Generator | None = None,
    start_frame: int = 0,
    refresh_last: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Few-step cached inference: :func:`self_forcing_rollout` with every exit at the last step, no gradient.

    Returns:
        Clean latents ``(B, F, C, H, W)``. Keep ``refresh_last=True`` to continue the stream from this cache.
    """
    num_chunks = noise.shape[1] // frames_per_chunk
    with torch.no_grad():
        result = self_forcing_rollout(
            denoiser,
            noise,
            context,
            step_sigmas=step_sigmas,
            frames_per_chunk=frames_per_chunk,
            kv_cache=kv_cache,
            exit_steps=[step_sigmas.shape[0] - 1] * num_chunks,
            context_sigma=context_sigma,
            noise_generator=noise_generator,
            grad_enabled=False,
            start_frame=start_frame,
            refresh_last=refresh_last,
            model_kwargs=model_kwargs,
        )
    return result.x0
