"""Inputs of the teacher-forcing (TF) and diffusion-forcing (DF) baselines of the paper (notes §4.5), as pure
functions of a latent clip and passed-in randomness.

Two families, both with one noise level per chunk of ``frames_per_chunk`` latent frames:

- **Many-step TF/DF diffusion** (official ``model/diffusion.py::CausalDiffusion.generator_loss`` with
  ``utils/scheduler.py::FlowMatchScheduler``): a per-chunk index into the ``N``-point shifted training grid,
  flow-matching target ``noise - x0``, the loss weighted by the schedule's Gaussian bump
  (``FlowMatchSchedule.training_weight``; loss in ``sfvideo.losses.flow``). TF feeds the clean clip as context
  (``attention="teacher_forcing"``, ``clean_x``), optionally noise-augmented (``noise_augmentation_max_timestep``).
- **CausVid-style DF+DMD / TF+DMD** (official ``model/causvid.py::CausVid._run_generator``): the few-step
  generator denoises data (or ODE-final) latents noised to a per-chunk random entry of its denoising step list;
  TF adds the clean clip as context. Its x0 output goes to the DMD loss and the critic exactly as Self Forcing's
  rollout output does, with no self-rollout and no gradient mask.

Per-chunk draws follow the official ``BaseModel._get_timestep(uniform_timestep=False)``: draw ``(B, F)`` integers,
then copy the first frame's value over its chunk (so the generator stream advances ``B F`` draws).

Caption dropout (for CFG training) is not in the official code (off in its baselines); :func:`drop_captions` is
the option issue 13 asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import FlowMatchSchedule, add_noise

AugmentationIndexing = Literal["official", "low_noise"]


def _device_of(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str:
    return generator.device if generator is not None else (device or "cpu")


def sample_chunk_indices(
    batch: int,
    num_frames: int,
    frames_per_chunk: int,
    high: int,
    generator: torch.Generator | None,
    *,
    low: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integers ``(B, F)`` uniform in ``[low, high)``, constant within each chunk (official ``_get_timestep``,
    non-uniform branch).

    Args:
        batch: B.
        num_frames: F, a multiple of ``frames_per_chunk``.
        frames_per_chunk: Frames sharing one draw.
        high: Exclusive upper bound.
        generator: Source of randomness (drawn on its device, the result moved to ``device``).
        low: Inclusive lower bound.
        device: Where the result lives (default: the generator's device).
    """
    if frames_per_chunk <= 0 or num_frames % frames_per_chunk:
        raise ValueError(f"num_frames={num_frames} is not a positive multiple of frames_per_chunk={frames_per_chunk}")
    if not low < high:
        raise ValueError(f"sample_chunk_indices: need low < high, got [{low}, {high})")
    draws = torch.randint(low, high, (batch, num_frames), generator=generator, device=_device_of(generator, device))
    per_chunk = draws.view(batch, num_frames // frames_per_chunk, frames_per_chunk)[:, :, :1]
    out = per_chunk.expand(-1, -1, frames_per_chunk).reshape(batch, num_frames)
    return out.to(device if device is not None else out.device)


def sample_forcing_sigmas(
    schedule: FlowMatchSchedule,
    batch: int,
    num_frames: int,
    frames_per_chunk: int,
    generator: torch.Generator | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-chunk noise levels ``(B, F)`` of many-step TF/DF training: a uniform index into the shifted grid
    ``schedule.sigmas()`` (``N`` points from 1 down to ``shift(1/N)``), official ``model/diffusion.py``.

    The official code then casts the timestep to the training dtype (bf16 with mixed precision, a step of 4 near
    t = 1000) before the nearest-grid lookup of ``add_noise``; here the grid value is used exactly.
    """
    grid = schedule.sigmas(torch.float64)
    idx = sample_chunk_indices(batch, num_frames, frames_per_chunk, grid.numel(), generator, device=device)
    return grid.to(idx.device)[idx].to(dtype)


def context_augmentation_sigmas(
    schedule: FlowMatchSchedule,
    batch: int,
    num_frames: int,
    frames_per_chunk: int,
    max_timestep: int,
    generator: torch.Generator | None,
    *,
    indexing: AugmentationIndexing = "official",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-chunk noise levels ``(B, F)`` of the teacher-forcing context (``noise_augmentation_max_timestep``).

    ``indexing="official"`` reproduces ``model/diffusion.py``: a per-chunk index uniform in ``[0, max_timestep)``
    into the grid, which is ordered from noisiest (index 0, sigma 1) down, so the context gets one of the
    ``max_timestep`` *noisiest* levels, despite the code comment ("add small noise to clean context latents").
    ``indexing="low_noise"`` is that comment's (and the name's) intent: uniform over the grid levels whose timestep
    ``N sigma`` is below ``max_timestep``. ``max_timestep = 0`` disables augmentation (all zeros, i.e. clean
    context at timestep 0, the official ``aug_t=None``).
    """
    n = schedule.num_train_timesteps
    if not 0 <= max_timestep <= n:
        raise ValueError(f"noise_augmentation_max_timestep must lie in [0, {n}], got {max_timestep}")
    if indexing not in ("official", "low_noise"):
        raise ValueError(f"indexing must be 'official' or 'low_noise', got {indexing!r}")
    if max_timestep == 0:
        return torch.zeros(batch, num_frames, device=device or _device_of(generator, None), dtype=dtype)
    grid = schedule.sigmas(torch.float64)
    if indexing == "official":
        low, high = 0, max_timestep
    else:
        # The grid descends, so the levels below max_timestep are a suffix [low, N).
        low, high = int((grid * n >= max_timestep).sum()), n
        if low >= high:
            raise ValueError(f"no grid level has a timestep below noise_augmentation_max_timestep={max_timestep}")
    idx = sample_chunk_indices(batch, num_frames, frames_per_chunk, high, generator, low=low, device=device)
    return grid.to(idx.device)[idx].to(dtype)


@dataclass
class ForcingBatch:
    """Inputs and target of one many-step TF/DF training step (:func:`forcing_batch`)."""

    noisy: Tensor
    """``(B, F, C, H, W)`` latents noised per chunk, ``(1 - sigma) x0 + sigma noise``."""
    sigma: Tensor
    """``(B, F)`` noise level of each frame (constant per chunk)."""
    target: Tensor
    """``(B, F, C, H, W)`` flow-matching target ``noise - x0``."""
    weight: Tensor
    """``(B, F)`` fp32 loss weight ``FlowMatchSchedule.training_weight(sigma)``."""
    clean_x: Tensor | None
    """Teacher-forcing context ``(B, F, C, H, W)`` (possibly noise-augmented); None for DF."""
    clean_sigma: Tensor | None
    """``(B, F)`` noise level of ``clean_x`` (zeros without augmentation); None for DF."""


def forcing_batch(
    x0: Tensor,
    noise: Tensor,
    *,
    schedule: FlowMatchSchedule,
    frames_per_chunk: int,
    generator: torch.Generator | None,
    teacher_forcing: bool,
    augmentation_max_timestep: int = 0,
    augmentation_indexing: AugmentationIndexing = "official",
    augmentation_noise: Tensor | None = None,
    sigma: Tensor | None = None,
) -> ForcingBatch:
    """One TF/DF diffusion training example (official ``CausalDiffusion.generator_loss`` up to the model call).

    Args:
        x0: Clean latents ``(B, F, C, H, W)`` (data or the final ODE state).
        noise: Gaussian noise like ``x0``.
        schedule: The flow-matching grid (``shift`` of the generator).
        frames_per_chunk: Chunk size of the per-chunk levels.
        generator: Source of the level draws (the noise is passed in).
        teacher_forcing: Provide the clean context (TF); False = DF (block-causal on the noisy clip alone).
        augmentation_max_timestep: See :func:`context_augmentation_sigmas` (0 = off, the official default).
        augmentation_indexing: See :func:`context_augmentation_sigmas`.
        augmentation_noise: Noise of the context augmentation; default ``noise`` itself, as officially (the same
            ``noise`` tensor noises both the input and the context).
        sigma: ``(B, F)`` noise levels drawn by the caller (e.g. a training module's own noise distribution);
            default :func:`sample_forcing_sigmas` from ``generator`` (the context levels are drawn after it).
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    b, f = x0.shape[:2]
    if sigma is None:
        sigma = sample_forcing_sigmas(schedule, b, f, frames_per_chunk, generator, device=x0.device)
    elif tuple(sigma.shape) != (b, f):
        raise ValueError(f"sigma must be (B, F) = {(b, f)}, got {tuple(sigma.shape)}")
    clean_x = clean_sigma = None
    if teacher_forcing:
        clean_sigma = context_augmentation_sigmas(
            schedule, b, f, frames_per_chunk, augmentation_max_timestep, generator,
            indexing=augmentation_indexing, device=x0.device,
        )  # fmt: skip
        aug_noise = noise if augmentation_noise is None else augmentation_noise
        clean_x = add_noise(x0, aug_noise, clean_sigma) if augmentation_max_timestep > 0 else x0
    return ForcingBatch(
        noisy=add_noise(x0, noise, sigma),
        sigma=sigma,
        target=noise - x0,
        weight=schedule.training_weight(sigma),
        clean_x=clean_x,
        clean_sigma=clean_sigma,
    )


def drop_captions(
    context: Tensor, null_context: Tensor, probability: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Replace each sample's prompt embedding by ``null_context`` with probability ``probability`` (classifier-free
    guidance training; off in the official baselines, which have no such option).

    Args:
        context: ``(B, L, D)`` prompt embeddings.
        null_context: ``(1 or B, L, D)`` embedding of the empty (or negative) prompt.
        probability: Drop probability in [0, 1].
        generator: Source of the per-sample Bernoulli draws.

    Returns:
        ``(context', dropped)`` with ``dropped`` the ``(B,)`` bool mask of replaced samples.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption dropout probability must lie in [0, 1], got {probability}")
    b = context.shape[0]
    if null_context.shape[1:] != context.shape[1:] or null_context.shape[0] not in (1, b):
        raise ValueError(
            f"null_context {tuple(null_context.shape)} does not match context {tuple(context.shape)} (batch 1 or B)"
        )
    u = torch.rand(b, generator=generator, device=_device_of(generator, context.device)).to(context.device)
    dropped = u < probability
    out = torch.where(dropped[:, None, None], null_context.to(context.dtype).expand_as(context), context)
    return out, dropped


@dataclass
class CausVidInput:
    """The generator input of CausVid-style DF/TF + DMD (:func:`causvid_generator_input`)."""

    noisy: Tensor
    """``(B, F, C, H, W)``: each chunk of the data latents noised to its drawn step (clean where sigma is 0)."""
    sigma: Tensor
    """``(B, F)`` noise level of each frame (an entry of the step list, constant per chunk)."""
    index: Tensor
    """``(B, F)`` long: index into the step list."""
    clean_x: Tensor | None
    """The clean latents as teacher-forcing context, or None (DF)."""


def causvid_generator_input(
    x0: Tensor,
    noise: Tensor,
    *,
    step_sigmas: Tensor,
    frames_per_chunk: int,
    generator: torch.Generator | None,
    teacher_forcing: bool,
) -> CausVidInput:
    """Noise data latents to a per-chunk random entry of the generator's step list (official
    ``model/causvid.py::CausVid._run_generator``).

    Officially one noise tensor is drawn per list entry, every entry's noisy clip is formed, and each chunk picks
    one of them; each frame uses exactly one of those independent draws, so one ``noise`` tensor gives the same
    distribution. An entry of timestep 0 gives the clean latents. Official lists without warping (CausVid's
    ``[1000, 757, 522, 0]``) are noised at the nearest grid timestep but labelled with the list value; here noise
    level and label are both ``step_sigmas`` exactly.

    Args:
        x0: Data (or ODE-final) latents ``(B, F, C, H, W)``.
        noise: Gaussian noise like ``x0``.
        step_sigmas: The generator's step sigmas ``(S,)`` (``FlowMatchSchedule.step_sigmas``); may end at 0.
        frames_per_chunk: Chunk size.
        generator: Source of the per-chunk indices (uniform in ``[0, S)``).
        teacher_forcing: Give the clean latents as context (TF+DMD); False = DF+DMD.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    if step_sigmas.ndim != 1 or step_sigmas.numel() == 0:
        raise ValueError(f"step_sigmas must be a non-empty 1-D tensor, got shape {tuple(step_sigmas.shape)}")
    b, f = x0.shape[:2]
    index = sample_chunk_indices(b, f, frames_per_chunk, step_sigmas.numel(), generator, device=x0.device)
    sigma = step_sigmas.to(device=x0.device, dtype=torch.float32)[index]
    return CausVidInput(
        noisy=add_noise(x0, noise, sigma),  # sigma 0 reproduces x0 exactly: (1 - 0) x0 + 0 noise
        sigma=sigma,
        index=index,
        clean_x=x0 if teacher_forcing else None,
    )


def forcing_forward(
    denoiser: Denoiser,
    noisy: Tensor,
    sigma: Tensor,
    context: Tensor,
    *,
    frames_per_chunk: int,
    clean_x: Tensor | None = None,
    clean_sigma: Tensor | None = None,
    flow: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """One masked generator forward on a whole TF/DF clip: block-causal (DF) or teacher-forcing with ``clean_x``.

    Returns the x0 estimate (CausVid-style DMD input) or, with ``flow=True``, the flow prediction (many-step
    TF/DF loss). ``clean_sigma`` (default 0) is the context's noise level, passed to the model as its timestep.
    """
    kwargs: dict[str, Any] = {"frames_per_chunk": frames_per_chunk, **(model_kwargs or {})}
    if clean_x is None:
        kwargs["attention"] = "block_causal"
    else:
        kwargs["attention"] = "teacher_forcing"
        kwargs["clean_x"] = clean_x
        if clean_sigma is not None:
            kwargs["clean_timestep"] = denoiser.timestep(clean_sigma, clean_x)
    return denoiser.flow(noisy, sigma, context, **kwargs) if flow else denoiser(noisy, sigma, context, **kwargs)
