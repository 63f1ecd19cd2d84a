"""Rectified-flow (flow-matching) noise schedule of Wan2.1, as Self Forcing uses it.

Conventions (notes §3.1, §10.8):

- The noise level is ``sigma`` in [0, 1]; a noisy latent is ``xt = (1 - sigma) x0 + sigma noise``.
- The model predicts the *flow* (velocity) ``d xt / d sigma = noise - x0``, so ``x0 = xt - sigma flow``.
- Wan's timestep scale is ``t = N sigma`` with ``N = num_train_timesteps = 1000``. It appears here only as a
  conversion; the model is called with timesteps by ``sfvideo.diffusion.denoiser.Denoiser`` alone.
- ``shift`` reshapes the training grid towards high noise: ``sigma' = shift sigma / (1 + (shift - 1) sigma)``.

Every function takes tensors in the public layout ``(B, F, C, H, W)``; ``sigma`` may be a Python float, a 0-d
tensor, ``(B,)`` (one level per sample) or ``(B, F)`` (one level per frame) and is broadcast over the trailing
dimensions. Results keep the dtype of the latent argument; the arithmetic runs in the promoted dtype first, so
an fp32 sigma is not rounded to bf16 before use.

Nothing here holds weights or draws randomness without a ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SigmaLike = float | Tensor


def _as_sigma(sigma: SigmaLike, x: Tensor, name: str = "sigma") -> Tensor:
    """Return ``sigma`` as a tensor on ``x.device`` shaped to broadcast over ``x`` (``(B, F, C, H, W)``).

    ``(B,)`` becomes ``(B, 1, 1, 1, 1)`` and ``(B, F)`` becomes ``(B, F, 1, 1, 1)``: sigma indexes the leading
    dimensions of ``x``, never the trailing ones (plain broadcasting would align it with W instead).
    """
    if not isinstance(sigma, Tensor):
        return torch.tensor(float(sigma), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if sigma.ndim > x.ndim:
        raise ValueError(f"{name} has shape {tuple(sigma.shape)}, more dimensions than the latent {tuple(x.shape)}")
    for i, n in enumerate(sigma.shape):
        if n not in (1, x.shape[i]):
            raise ValueError(
                f"{name} of shape {tuple(sigma.shape)} does not index the leading dimensions of the latent "
                f"{tuple(x.shape)} (expected (B,) or (B, F))"
            )
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    return sigma.to(x.device).reshape(*sigma.shape, *([1] * (x.ndim - sigma.ndim)))


def add_noise(x0: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """Flow-matching forward process ``xt = (1 - sigma) x0 + sigma noise``.

    Args:
        x0: Clean latents ``(B, F, C, H, W)``.
        noise: Standard Gaussian noise, same shape as ``x0``.
        sigma: Noise level, float, ``(B,)`` or ``(B, F)``.

    Returns:
        ``xt`` in ``x0``'s dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    s = _as_sigma(sigma, x0)
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


def x0_from_flow(xt: Tensor, flow: Tensor, sigma: SigmaLike) -> Tensor:
    """Clean estimate from a flow prediction: ``x0 = xt - sigma flow``. Output in ``xt``'s dtype."""
    s = _as_sigma(sigma, xt)
    return (xt - s * flow).to(xt.dtype)


def flow_from_x0(xt: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """Flow implied by an x0 estimate: ``flow = (xt - x0) / sigma`` (undefined at sigma = 0), in ``xt``'s dtype."""
    s = _as_sigma(sigma, xt)
    return ((xt - x0) / s).to(xt.dtype)


def noise_from_x0(xt: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """Noise implied by an x0 estimate: ``noise = (xt - (1 - sigma) x0) / sigma``. Output in ``xt``'s dtype."""
    s = _as_sigma(sigma, xt)
    return ((xt - (1 - s) * x0) / s).to(xt.dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target ``noise - x0`` (the velocity of ``xt`` along sigma)."""
    return noise - x0


def sigma_to_timestep(sigma: SigmaLike, num_train_timesteps: int = 1000) -> SigmaLike:
    """Wan timestep ``t = N sigma`` (no shift: the shift acts on the grid, not on the mapping; notes §3.1)."""
    return sigma * num_train_timesteps


def timestep_to_sigma(timestep: SigmaLike, num_train_timesteps: int = 1000) -> SigmaLike:
    """Inverse of :func:`sigma_to_timestep`: ``sigma = t / N``."""
    return timestep / num_train_timesteps


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Wan2.1's shifted flow-matching grid (``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``)."""

    num_train_timesteps: int = 1000
    """N: training timesteps; Wan's timestep is ``N sigma``."""
    shift: float = 5.0
    """Timestep shift; 5 for Self Forcing, 8 for CausVid."""

    def __post_init__(self) -> None:
        if self.num_train_timesteps <= 0:
            raise ValueError(f"FlowMatchSchedule.num_train_timesteps must be positive, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"FlowMatchSchedule.shift must be positive, got {self.shift}")

    def shift_sigma(self, sigma: SigmaLike) -> SigmaLike:
        """``sigma' = shift sigma / (1 + (shift - 1) sigma)``; keeps 0 and 1 fixed."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def sigmas(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The shifted training grid ``(N,)``, from 1 down to ``shift(1/N)``.

        ``sigma_i = linspace(1, 0, N + 1)[:-1]`` (the trailing 0 dropped, as ``extra_one_step=True`` does), then
        shifted.
        """
        n = self.num_train_timesteps
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        return self.shift_sigma(base).to(dtype)

    def timesteps(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Wan timesteps of the grid, ``N sigma'`` ``(N,)``, from 1000 downwards."""
        return self.sigmas(torch.float64).mul(self.num_train_timesteps).to(dtype)

    def training_weights(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Flow-matching loss weight of every grid point ``(N,)``, aligned with :meth:`sigmas` (mean exactly 1).

        The official ``FlowMatchScheduler.set_timesteps(N, training=True)`` (``utils/scheduler.py``) bump over the
        grid timesteps ``t_i = N sigma'_i``:

            y_i = exp(-2 ((t_i - N / 2) / N)^2),    w_i = (y_i - min_j y_j) N / sum_j (y_j - min_j y_j),

        so the weight peaks at ``t = N / 2``, vanishes at the grid's lowest bump value (``t = N``, pure noise, for
        any shift >= 1) and averages 1 over the grid. (Officially ``N`` here is the grid size passed to
        ``set_timesteps``, 1000, equal to ``num_train_timesteps``.) Computed in float64; the official float32
        grid differs by float32 rounding only.
        """
        n = self.num_train_timesteps
        t = self.timesteps(torch.float64)
        y = torch.exp(-2.0 * ((t - n / 2) / n) ** 2)
        y = y - y.min()
        return (y * (n / y.sum())).to(dtype)

    def grid_index(self, sigma: Tensor) -> Tensor:
        """Index (long, shape of ``sigma``) of the grid point nearest to each sigma (ties: the noisier point), the
        official ``argmin |timesteps - t|`` lookup of ``add_noise``/``training_weight``."""
        grid = self.sigmas(torch.float64).to(sigma.device)
        return (grid.reshape(*([1] * sigma.ndim), -1) - sigma.to(torch.float64).unsqueeze(-1)).abs().argmin(dim=-1)

    def training_weight(self, sigma: Tensor) -> Tensor:
        """Loss weight (:meth:`training_weights`) of the grid point nearest to each sigma; shape of ``sigma``, fp32
        (official ``FlowMatchScheduler.training_weight``)."""
        return self.training_weights(torch.float64).to(sigma.device)[self.grid_index(sigma)].to(torch.float32)

    def warp(self, steps: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        """Warp a uniform few-step list onto the shifted grid (notes §3.1).

        Append 0 to the timestep table and take ``table[N - step]``; with shift 5, ``[1000, 750, 500, 250]``
        becomes ``[1000, 937.5, 833.33, 625]``.

        Args:
            steps: Integer timesteps in ``[0, N]``, e.g. the config's ``denoising_step_list``.

        Returns:
            Warped timesteps ``(len(steps),)``.
        """
        n = self.num_train_timesteps
        idx = []
        for step in steps:
            if int(step) != step or not 0 <= step <= n:
                raise ValueError(f"warp: steps must be integers in [0, {n}], got {step!r} in {list(steps)}")
            idx.append(n - int(step))
        table = torch.cat([self.timesteps(torch.float64), torch.zeros(1, dtype=torch.float64)])
        return table[torch.tensor(idx, dtype=torch.long)].to(dtype)

    def step_sigmas(self, steps: Sequence[int], warp: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
        """Sigmas ``(S,)`` of a few-step generator schedule: warped (Self Forcing) or ``step / N`` (CausVid)."""
        if len(steps) == 0:
            raise ValueError("step_sigmas: steps is empty")
        if warp:
            t = self.warp(steps)
        else:
            t = torch.tensor([float(s) for s in steps], dtype=torch.float64)
            if (t < 0).any() or (t > self.num_train_timesteps).any():
                raise ValueError(f"step_sigmas: steps must lie in [0, {self.num_train_timesteps}], got {list(steps)}")
        return timestep_to_sigma(t, self.num_train_timesteps).to(dtype)

    def sample_dmd_sigma(
        self,
        batch: int,
        generator: torch.Generator | None,
        *,
        min_timestep: float = 20,
        max_timestep: float = 980,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Noise levels ``(batch,)`` for the DMD and critic losses (notes §4.1 step 2).

        ``u ~ randint[0, N)`` (integer, as the official ``torch.randint``), shifted, clamped to
        ``[min_timestep, max_timestep]`` on the timestep scale (0.02 N and 0.98 N in the release), divided by N.

        Args:
            batch: Number of samples (one sigma per sample, shared by its frames).
            generator: Source of randomness; it is drawn on its own device, the result moved to ``device``.
            min_timestep: Lower clamp, Wan timestep scale.
            max_timestep: Upper clamp, Wan timestep scale.
            device: Where the result lives (default: the generator's device).
            dtype: Result dtype.
        """
        n = self.num_train_timesteps
        if not 0 <= min_timestep <= max_timestep <= n:
            raise ValueError(
                f"sample_dmd_sigma: need 0 <= min_timestep <= max_timestep <= {n}, got {min_timestep}, {max_timestep}"
            )
        gen_device = generator.device if generator is not None else (device or "cpu")
        u = torch.randint(0, n, (batch,), generator=generator, device=gen_device, dtype=torch.long)
        t = self.shift_sigma(u.to(torch.float64) / n) * n
        t = t.clamp(min_timestep, max_timestep)
        return timestep_to_sigma(t, n).to(device=device if device is not None else gen_device, dtype=dtype)
