"""Sampling and scoring helpers shared by the demo, the evaluation callback and benchmarks.

- :func:`sample_teacher`: many-step Euler ODE sampling of a bidirectional model with classifier-free guidance.
- :func:`sample_generator`: few-step KV-cached autoregressive sampling of a causal generator (Algorithm 1 at
  inference: exit at the last step, no gradient).
- :func:`score_toy_videos`: the toy world's exact metrics (``sfvideo.metrics.toy``) plus the feature-space
  distance to real videos (``sfvideo.toy.features``), for one set of generated videos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import generate_latents
from sfvideo.diffusion.sampling import euler_sample, sample_sigmas
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import TextEncoder


def _noise(
    geometry: VideoGeometry,
    batch: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    num_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(geometry.latent_shape(batch, num_frames), generator=g, device=device, dtype=dtype), g


@torch.no_grad()
def sample_teacher(
    model: torch.nn.Module,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    geometry: VideoGeometry,
    *,
    steps: int = 30,
    shift: float = 5.0,
    guidance_scale: float = 3.0,
    negative_prompt: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Latents ``(B, F, C, H, W)`` from ``steps`` Euler steps (official CFG convention ``cond + g (cond − uncond)``)."""
    p = model.patch_embedding.weight  # device and compute dtype (fp32 islands aside)
    cond = text_encoder.encode(list(prompts)).to(p.device, p.dtype)
    uncond = text_encoder.encode([negative_prompt]).to(p.device, p.dtype).expand_as(cond)
    noise, _ = _noise(geometry, len(prompts), seed, p.device, p.dtype)
    sigmas = sample_sigmas(FlowMatchSchedule(shift=shift), steps)
    out = euler_sample(
        Denoiser(model), noise, cond, sigmas=sigmas, uncond=uncond, guidance_scale=guidance_scale, guidance="official"
    )
    return out.x0


@torch.no_grad()
def sample_generator(
    model: torch.nn.Module,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    geometry: VideoGeometry,
    *,
    step_sigmas: torch.Tensor,
    num_frames: int | None = None,
    window_frames: int | None = None,
    sink_frames: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """Latents ``(B, F, C, H, W)`` from the causal generator, chunk by chunk with its KV cache."""
    p = model.patch_embedding.weight  # device and compute dtype (fp32 islands aside)
    frames = num_frames or geometry.num_frames
    cond = text_encoder.encode(list(prompts)).to(p.device, p.dtype)
    noise, g = _noise(geometry, len(prompts), seed, p.device, p.dtype, frames)
    capacity = frames if window_frames is None else window_frames + sink_frames + geometry.frames_per_chunk
    cache = model.new_kv_cache(
        len(prompts),
        geometry.tokens_per_frame,
        capacity,
        sink_frames=sink_frames,
        window_frames=window_frames,
        dtype=p.dtype,
        device=p.device,
    )
    return generate_latents(
        Denoiser(model),
        noise,
        cond,
        step_sigmas=step_sigmas.to(p.device),
        frames_per_chunk=geometry.frames_per_chunk,
        kv_cache=cache,
        noise_generator=g,
    )


def score_toy_videos(
    videos: torch.Tensor,
    prompts: Sequence[str],
    *,
    world: Any = None,
    reference: torch.Tensor | None = None,
    features: Any = None,
) -> dict[str, Any]:
    """Toy-world metrics of ``videos (B, T, 3, H, W)`` in [-1, 1]; with ``reference`` real videos, also the
    feature-space Fréchet distance ratio to real-vs-real (see ``sfvideo.toy.features``)."""
    from sfvideo.metrics.toy import ToyVideoMetrics

    metric = ToyVideoMetrics(world=world) if world is not None else ToyVideoMetrics()
    metric.update(videos.float().cpu(), list(prompts))
    scores = {k: v for k, v in metric.compute().items()}
    if reference is not None and features is not None:
        scores.update(features(videos.float().cpu(), reference.float().cpu()))
    return scores
