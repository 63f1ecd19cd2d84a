"""Many-step deterministic sampling of a bidirectional flow-matching model (the teacher's Euler ODE sampler).

The probability-flow ODE of the flow-matching process ``xt = (1 - sigma) x0 + sigma noise`` is
``d x / d sigma = flow(x, sigma) = (x - x0_hat(x, sigma)) / sigma``. Euler on a descending grid
``sigma_0 = 1 > sigma_1 > ... > sigma_n = 0`` gives

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) flow_i,                                   (Euler step)

which is Wan's ``FlowMatchScheduler.step`` (notes §5: the ODE-pair script converts the guided x0 prediction to a
flow and steps). The last step (to sigma 0) returns the final x0 prediction exactly.

Grids. :func:`sample_sigmas` is the scheduler's many-step grid: ``n`` uniform points of ``linspace(1, 0, n + 1)``,
shifted (``extra_one_step=True`` drops the trailing 0 before the shift, and the sampler steps to 0 at the end).
The few-step generator's warped steps are ``shift(step / N)`` (``FlowMatchSchedule.warp``), so they lie *on* the
many-step grid whenever ``n step / N`` is an integer and both use the same shift: 48 steps at shift 8 hold
``[1000, 750, 500, 250]`` warped at shift 8 as points 0, 12, 24, 36 (the official ODE pairs, notes §5). For any
other combination :func:`refine_sigmas` inserts the wanted sigmas into the grid, so recorded states land exactly on
them (one extra model call per inserted point); :func:`ode_sigmas` does both.

Nothing here draws randomness: the sampler is deterministic given the initial noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser, guided_x0
from sfvideo.diffusion.schedule import FlowMatchSchedule

Guidance = Literal["official", "standard"]
StepCallback = Callable[[int, float, Tensor, Tensor], None]


@dataclass
class SampleResult:
    """What :func:`euler_sample` returns."""

    x0: Tensor
    """Final sample ``(B, F, C, H, W)`` (the state at sigma 0), in the noise's dtype."""
    trajectory: Tensor | None = None
    """States at the recorded grid points ``(B, K, F, C, H, W)``, in the noise's dtype; None without
    ``record_sigmas``."""
    trajectory_sigmas: Tensor | None = None
    """Grid sigmas ``(K,)`` (float64) of the recorded states, in the order of ``record_sigmas``."""


def sample_sigmas(schedule: FlowMatchSchedule, num_steps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The shifted many-step sampling grid ``(num_steps + 1,)``: ``shift(linspace(1, 0, num_steps + 1))``.

    Starts at 1, ends at exactly 0, strictly descending. Equals Wan's ``FlowMatchScheduler.set_timesteps(n)``
    sigmas (with ``extra_one_step=True``) with the final 0 the scheduler steps to appended.
    """
    if num_steps <= 0:
        raise ValueError(f"sample_sigmas: num_steps must be positive, got {num_steps}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return schedule.shift_sigma(base).to(dtype)


def refine_sigmas(sigmas: Tensor, include: Sequence[float] | Tensor, *, atol: float = 1e-6) -> Tensor:
    """The grid ``sigmas`` with the points of ``include`` inserted (union, descending, float64).

    Points within ``atol`` of an existing grid point are snapped to it rather than inserted, so a grid that already
    holds them (e.g. 48 steps at shift 8 for the shift-8 warped ``[1000, 750, 500, 250]``) comes back unchanged;
    the default tolerance absorbs float32 rounding of step sigmas.

    Args:
        sigmas: Descending grid ``(n + 1,)`` ending at 0.
        include: Sigmas in ``[0, sigmas[0]]`` that must be grid points.
        atol: Snapping tolerance.
    """
    check_grid(sigmas)
    grid = sigmas.detach().to("cpu", torch.float64)
    extra = torch.as_tensor(include, dtype=torch.float64).flatten().cpu()
    if extra.numel() and (extra.min() < 0 or extra.max() > grid[0] + atol):
        raise ValueError(f"refine_sigmas: include must lie in [0, {float(grid[0])}], got {extra.tolist()}")
    new = [float(s) for s in extra if (grid - s).abs().min() > atol]
    if not new:
        return grid
    merged = torch.cat([grid, torch.tensor(new, dtype=torch.float64)]).unique()  # ascending, duplicates removed
    return merged.flip(0)


def ode_sigmas(schedule: FlowMatchSchedule, num_steps: int, include: Sequence[float] | Tensor | None = None) -> Tensor:
    """Many-step grid of :func:`sample_sigmas`, refined to contain ``include`` (e.g. the generator's step sigmas)."""
    grid = sample_sigmas(schedule, num_steps)
    return grid if include is None else refine_sigmas(grid, include)


def check_grid(sigmas: Tensor) -> None:
    """Raise unless ``sigmas`` is a strictly descending 1-d grid of at least 2 points ending at 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-d grid of at least 2 points, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly descending")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must end at 0 (the clean sample), got {float(sigmas[-1])}")


def nearest_grid_indices(sigmas: Tensor, targets: Sequence[float] | Tensor) -> list[int]:
    """Index of the grid point closest to each target sigma (ties: the earlier, noisier point)."""
    grid = sigmas.detach().to("cpu", torch.float64)
    t = torch.as_tensor(targets, dtype=torch.float64).flatten().cpu()
    return [int((grid - s).abs().argmin()) for s in t]


def euler_sample(
    denoiser: Denoiser,
    noise: Tensor,
    context: Tensor,
    *,
    sigmas: Tensor,
    uncond: Tensor | None = None,
    guidance_scale: float = 0.0,
    guidance: Guidance = "official",
    record_sigmas: Sequence[float] | Tensor | None = None,
    callback: StepCallback | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SampleResult:
    """Deterministic flow-matching Euler ODE sampling of a bidirectional model, with classifier-free guidance.

    Gradient mode is the caller's: wrap the call in ``torch.no_grad()`` for a frozen teacher. Every frame shares
    the sample's sigma (a bidirectional model). The running state is kept in at least fp32 so a bf16 model does
    not accumulate rounding over many steps; the model sees it in ``noise``'s dtype.

    Args:
        denoiser: The (teacher) denoiser, ``denoiser(xt, sigma, context) -> x0``.
        noise: Initial state at ``sigmas[0]`` ``(B, F, C, H, W)`` (standard Gaussian for ``sigmas[0] = 1``).
        context: Prompt embeddings ``(B, L, D)``.
        sigmas: Descending grid ``(n + 1,)`` ending at 0 (:func:`sample_sigmas`, :func:`ode_sigmas`).
        uncond: Negative-prompt embeddings ``(1 or B, L', D)``; needed unless the guidance reduces to the
            conditional prediction.
        guidance_scale: CFG scale in the ``guidance`` convention.
        guidance: ``"official"``: ``cond + g (cond - uncond)`` (Self Forcing's DMD teacher; 0 = no guidance);
            ``"standard"``: ``uncond + g (cond - uncond)`` (Wan, the ODE-pair script; 1 = no guidance).
            Standard ``g`` equals official ``g - 1``.
        record_sigmas: Sigmas whose states to return; each maps to the closest grid point (the reported
            ``trajectory_sigmas``), so use a grid that contains them for exact recording. 0 records the final sample.
        callback: Called after each step as ``callback(i, sigma_i, x_{i+1}, x0_hat_i)``.
        model_kwargs: Extra keyword arguments of every model call (e.g. ``{"attention": "bidirectional"}``).

    Returns:
        :class:`SampleResult` with the final sample and the recorded states.
    """
    check_grid(sigmas)
    if noise.ndim != 5:
        raise ValueError(f"noise must be (B, F, C, H, W), got shape {tuple(noise.shape)}")
    if guidance not in ("official", "standard"):
        raise ValueError(f"guidance must be 'official' or 'standard', got {guidance!r}")
    # One convention inside: official scale (cond + s (cond - uncond)); standard g = official g - 1.
    scale = float(guidance_scale) if guidance == "official" else float(guidance_scale) - 1.0
    if scale != 0.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} ({guidance}) needs uncond (negative-prompt embeddings)")
    kwargs = dict(model_kwargs or {})

    grid = sigmas.detach().to("cpu", torch.float64).tolist()  # python floats: no device syncs in the loop
    record_at: dict[int, list[int]] = {}
    trajectory_sigmas = None
    if record_sigmas is not None:
        idx = nearest_grid_indices(sigmas, record_sigmas)
        for k, i in enumerate(idx):
            record_at.setdefault(i, []).append(k)
        trajectory_sigmas = torch.tensor([grid[i] for i in idx], dtype=torch.float64)
    recorded: list[Tensor | None] = [None] * (len(trajectory_sigmas) if trajectory_sigmas is not None else 0)

    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(state_dtype)
    for k in record_at.get(0, []):
        recorded[k] = noise.clone()
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        xt = x.to(noise.dtype)
        if scale == 0.0:
            x0 = denoiser(xt, sigma, context, **kwargs)
        else:
            x0 = guided_x0(denoiser, xt, sigma, context, uncond, scale, **kwargs)
        x0 = x0.to(state_dtype)
        # Euler step x_{i+1} = x_i + (sigma_{i+1} - sigma_i) flow_i with flow_i = (x_i - x0_hat_i) / sigma_i; at
        # sigma_{i+1} = 0 this is x0_hat_i exactly (written as a lerp so no division by sigma is needed).
        x = torch.lerp(x0, x, sigma_next / sigma)
        for k in record_at.get(i + 1, []):
            recorded[k] = x.to(noise.dtype)
        if callback is not None:
            callback(i, sigma, x, x0)
    trajectory = torch.stack(recorded, dim=1) if recorded else None
    return SampleResult(x0=x.to(noise.dtype), trajectory=trajectory, trajectory_sigmas=trajectory_sigmas)


def record_sigmas_for(step_sigmas: Tensor) -> Tensor:
    """Sigmas of the kept states ``(S + 1,)`` float64: the generator's step sigmas, then 0 (the final sample)."""
    s = step_sigmas.detach().to("cpu", torch.float64).flatten()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def ode_trajectories(
    teacher: Denoiser,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    *,
    step_sigmas: Tensor,
    schedule: FlowMatchSchedule,
    num_steps: int,
    guidance_scale: float,
    guidance: Guidance = "standard",
) -> Tensor:
    """Teacher ODE trajectories at the generator's step sigmas ``(B, S + 1, F, C, H, W)``, the last entry final.

    Args:
        teacher: Bidirectional teacher denoiser.
        noise: Initial Gaussian noise ``(B, F, C, H, W)`` at sigma 1.
        cond: Prompt embeddings ``(B, L, D)``.
        uncond: Negative-prompt embeddings ``(1 or B, L, D)`` (None without guidance).
        step_sigmas: The generator's step sigmas ``(S,)``, descending, first = 1 (warped or not).
        schedule: Shift of the many-step grid (``ode_shift``).
        num_steps: Euler steps of the base grid; the step sigmas not on it are inserted.
        guidance_scale / guidance: CFG (see :func:`sfvideo.diffusion.sampling.euler_sample`).
    """
    record = record_sigmas_for(step_sigmas)
    if abs(float(record[0]) - 1.0) > 1e-6:
        raise ValueError(f"step_sigmas must start at 1 (pure noise) for ODE pairs, got {record[:-1].tolist()}")
    grid = ode_sigmas(schedule, num_steps, include=record)
    result = euler_sample(
        teacher,
        noise,
        cond,
        sigmas=grid,
        uncond=uncond,
        guidance_scale=guidance_scale,
        guidance=guidance,
        record_sigmas=record,
        model_kwargs={"attention": "bidirectional"},
    )
    assert result.trajectory is not None
    return result.trajectory
