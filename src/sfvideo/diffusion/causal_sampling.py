"""Many-step chunk-by-chunk sampling of a causal flow-matching model with classifier-free guidance: inference for
the many-step TF/DF baselines (official ``pipeline/causal_diffusion_inference.py``,
``CausalDiffusionInferencePipeline.inference``).

Per chunk ``i`` of ``f`` frames at stream frame ``s_i`` (``s_{i+1} = s_i + f``):

1. a fresh solver over the many-step grid ``sigma_0 = shift(.) > ... > sigma_n = 0`` (officially a new
   ``FlowUniPCMultistepScheduler`` per block);
2. per step ``j``: the conditional flow with the **conditional KV cache** and the unconditional flow with the
   **unconditional KV cache** (both at ``start_frame = s_i``, each call overwriting the chunk's slot), guided
   (``uncond + g (cond - uncond)`` officially, on the flow), then one solver step;
3. the cache refresh at the clean output: the model is rerun at timestep 0 on the chunk's final latents with the
   prompt into the conditional cache and with the negative prompt into the unconditional cache
   (``diffusion.rollout.refresh_chunk``), so later chunks attend to clean-context keys/values of both.

Two caches are needed because cached keys/values depend on the text through the cross-attention of every earlier
layer: the unconditional branch must see a context computed unconditionally.

Solvers (:func:`make_flow_solver`):

- ``"euler"``: the deterministic flow Euler step of ``diffusion/sampling.py`` on :func:`sampling.sample_sigmas`
  (``shift(linspace(1, 0, n + 1))``), the model called at the exact grid sigmas. With one chunk covering the clip
  this is ``sampling.euler_sample`` of the bidirectional teacher.
- ``"unipc"``: diffusers' ``UniPCMultistepScheduler`` with ``prediction_type="flow_prediction"``,
  ``use_flow_sigmas=True``, ``flow_shift = schedule.shift``, order 2, ``bh2``, and the grid of Wan's
  ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(n, shift=s)`` (``wan/utils/fm_solvers_unipc.py``, which the
  official pipeline uses): ``shift(linspace(1 - 1/N, 0, n + 1)[:-1])`` then 0. As there (and in diffusers' Wan
  pipeline) the model is called at the scheduler's integer timesteps ``floor(N sigma_j)`` while the solver uses
  ``sigma_j``.

Gradient mode is the caller's (wrap in ``torch.no_grad()``); the running state is kept in at least fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser, cfg, match_batch
from sfvideo.diffusion.rollout import refresh_chunk
from sfvideo.diffusion.sampling import Guidance, check_grid, sample_sigmas
from sfvideo.diffusion.schedule import FlowMatchSchedule

Solver = Literal["euler", "unipc"]
SOLVERS: tuple[str, ...] = ("euler", "unipc")
ChunkCallback = Callable[[int, int, Tensor], None]


class FlowSolver:
    """A fresh many-step solver over one grid: ``sigmas`` (solver grid, ends at 0), ``model_sigmas`` (levels the
    model is called at, one per step) and ``step(j, flow, x) -> x_next``. Stateful (multistep), one per chunk."""

    sigmas: list[float]
    model_sigmas: list[float]

    def step(self, j: int, flow: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        return len(self.model_sigmas)


class EulerFlowSolver(FlowSolver):
    """Flow Euler ``x_{j+1} = x_j + (sigma_{j+1} - sigma_j) flow_j``, written as the lerp of ``sampling.euler_sample``
    (``x0 + (sigma_{j+1} / sigma_j)(x_j - x0)`` with ``x0 = x_j - sigma_j flow_j``), exact at ``sigma_n = 0``."""

    def __init__(self, sigmas: Tensor) -> None:
        check_grid(sigmas)
        self.sigmas = sigmas.detach().to("cpu", torch.float64).tolist()
        self.model_sigmas = self.sigmas[:-1]

    def step(self, j: int, flow: Tensor, x: Tensor) -> Tensor:
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        x0 = x - sigma * flow
        return torch.lerp(x0, x, sigma_next / sigma)


def unipc_base_sigmas(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Unshifted UniPC grid of Wan's ``FlowUniPCMultistepScheduler``: ``linspace(1 - 1/N, 0, n + 1)[:-1]`` (n,)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    sigma_max = 1.0 - 1.0 / num_train_timesteps  # the constructor's sigmas[0] = 1 - alphas[0], alphas[0] = 1/N
    return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1].copy()


class UniPCFlowSolver(FlowSolver):
    """diffusers' ``UniPCMultistepScheduler`` in flow-matching mode on Wan's UniPC grid (see the module docstring)."""

    def __init__(self, schedule: FlowMatchSchedule, num_steps: int, *, solver_order: int = 2) -> None:
        from diffusers import UniPCMultistepScheduler

        n_train = schedule.num_train_timesteps
        self.scheduler = UniPCMultistepScheduler(
            num_train_timesteps=n_train,
            solver_order=solver_order,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=schedule.shift,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        # Custom sigmas are shifted by flow_shift inside set_timesteps, like Wan's set_timesteps(n, shift=s).
        self.scheduler.set_timesteps(sigmas=unipc_base_sigmas(num_steps, n_train))  # type: ignore[arg-type]
        self.scheduler.set_begin_index(0)
        self.sigmas = self.scheduler.sigmas.to(torch.float64).tolist()
        self.model_sigmas = [int(t) / n_train for t in self.scheduler.timesteps.tolist()]

    def step(self, j: int, flow: Tensor, x: Tensor) -> Tensor:
        if self.scheduler.step_index is not None and self.scheduler.step_index != j:
            at = self.scheduler.step_index
            raise RuntimeError(f"UniPCFlowSolver: step {j} called out of order (the scheduler is at step {at})")
        t = self.scheduler.timesteps[j]
        return self.scheduler.step(flow, t, x, return_dict=False)[0]


def make_flow_solver(
    solver: Solver, schedule: FlowMatchSchedule, num_steps: int, *, sigmas: Tensor | None = None
) -> FlowSolver:
    """A fresh solver: ``"euler"`` on ``sigmas`` (default ``sample_sigmas(schedule, num_steps)``) or ``"unipc"``
    (its own grid; ``sigmas`` is refused)."""
    if solver == "euler":
        return EulerFlowSolver(sigmas if sigmas is not None else sample_sigmas(schedule, num_steps))
    if solver == "unipc":
        if sigmas is not None:
            raise ValueError("solver='unipc' uses Wan's UniPC grid; a custom sigmas grid is for solver='euler'")
        return UniPCFlowSolver(schedule, num_steps)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def causal_cfg_sample(
    denoiser: Denoiser,
    noise: Tensor,
    context: Tensor,
    *,
    schedule: FlowMatchSchedule,
    frames_per_chunk: int,
    kv_cache: Any,
    uncond: Tensor | None = None,
    uncond_kv_cache: Any = None,
    guidance_scale: float = 0.0,
    guidance: Guidance = "official",
    solver: Solver = "euler",
    num_steps: int = 50,
    sigmas: Tensor | None = None,
    start_frame: int = 0,
    refresh_last: bool = True,
    callback: ChunkCallback | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Many-step causal generation chunk by chunk with two KV caches and classifier-free guidance.

    Args:
        denoiser: The causal model as a :class:`Denoiser` (accepts ``kv_cache`` and ``start_frame``).
        noise: Initial noise ``(B, F, C, H, W)``, ``F`` a multiple of ``frames_per_chunk``.
        context: Prompt embeddings ``(B, L, D)``.
        schedule: The flow-matching schedule (its ``shift`` shapes the grid).
        frames_per_chunk: Frames per chunk f (the model's chunk size; ``F`` for one bidirectional chunk).
        kv_cache: Cache of the conditional branch (``model.new_kv_cache(B, ...)``, reset by the caller).
        uncond: Negative-prompt embeddings ``(1 or B, L', D)``; needed unless the guidance reduces to cond.
        uncond_kv_cache: Cache of the unconditional branch (a second, separate cache of the same batch).
        guidance_scale: CFG scale in the ``guidance`` convention.
        guidance: ``"official"`` (``cond + g (cond - uncond)``, 0 = none) or ``"standard"``
            (``uncond + g (cond - uncond)``, 1 = none; what ``causal_diffusion_inference.py`` applies to its
            ``guidance_scale``). As in ``sampling.euler_sample``.
        solver: ``"euler"`` or ``"unipc"`` (the official pipeline's default, with 50 steps).
        num_steps: Steps per chunk.
        sigmas: Explicit Euler grid ``(n + 1,)`` ending at 0 (default ``sample_sigmas(schedule, num_steps)``).
        start_frame: Absolute stream frame of ``noise[:, 0]`` (both caches may already hold context).
        refresh_last: Refresh both caches after the last chunk too (keep True to continue the stream).
        callback: Called after each chunk as ``callback(chunk_index, start_frame, chunk_latents)``.
        model_kwargs: Extra keyword arguments of every model call.

    Returns:
        Clean latents ``(B, F, C, H, W)`` in ``noise``'s dtype.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be (B, F, C, H, W), got shape {tuple(noise.shape)}")
    b, num_frames = noise.shape[:2]
    f = frames_per_chunk
    if f <= 0 or num_frames % f:
        raise ValueError(f"noise has {num_frames} frames, not a positive multiple of frames_per_chunk={f}")
    if guidance not in ("official", "standard"):
        raise ValueError(f"guidance must be 'official' or 'standard', got {guidance!r}")
    # One convention inside: official scale (cond + s (cond - uncond)); standard g = official g - 1.
    scale = float(guidance_scale) if guidance == "official" else float(guidance_scale) - 1.0
    guided = scale != 0.0
    if guided and (uncond is None or uncond_kv_cache is None):
        raise ValueError(
            f"guidance_scale={guidance_scale} ({guidance}) needs uncond and uncond_kv_cache (a second KV cache)"
        )
    if guided and uncond_kv_cache is kv_cache:
        raise ValueError("uncond_kv_cache must be a different cache from kv_cache (the branches' K/V differ)")
    uncond_b = match_batch(uncond, b).to(context.dtype) if guided else None
    kwargs = {"attention": "block_causal", "frames_per_chunk": f, **(model_kwargs or {})}
    make_flow_solver(solver, schedule, num_steps, sigmas=sigmas)  # validate the options before any model call

    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    outputs: list[Tensor] = []
    for i in range(num_frames // f):
        lo = i * f
        frame = start_frame + lo
        stepper = make_flow_solver(solver, schedule, num_steps, sigmas=sigmas)  # fresh per chunk (official)
        x = noise[:, lo : lo + f].to(state_dtype)
        for j, model_sigma in enumerate(stepper.model_sigmas):
            xt = x.to(noise.dtype)
            sigma_bf = torch.full((b, f), model_sigma, device=noise.device, dtype=torch.float32)
            flow = denoiser.flow(xt, sigma_bf, context, kv_cache=kv_cache, start_frame=frame, **kwargs)
            if guided:
                flow_u = denoiser.flow(xt, sigma_bf, uncond_b, kv_cache=uncond_kv_cache, start_frame=frame, **kwargs)
                flow = cfg(flow.to(state_dtype), flow_u.to(state_dtype), scale)
            x = stepper.step(j, flow.to(state_dtype), x)
        out = x.to(noise.dtype)
        outputs.append(out)
        if callback is not None:
            callback(i, frame, out)
        # Clean-context refresh of both caches (timestep 0), official step 3.3.
        if refresh_last or lo + f < num_frames:
            refresh_chunk(denoiser, out, context, kv_cache=kv_cache, start_frame=frame, model_kwargs=kwargs)
            if guided:
                refresh_chunk(denoiser, out, uncond_b, kv_cache=uncond_kv_cache, start_frame=frame,
                              model_kwargs=kwargs)  # fmt: skip
    return torch.cat(outputs, dim=1)
