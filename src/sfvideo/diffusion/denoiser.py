"""The one place where Wan's parameterisation meets the diffusion maths.

``Denoiser`` wraps any callable with ``WanTransformer.forward``'s signature
(``model(x (B,F,C,H,W), timestep (B,) | (B,F) on 0..N, context, **kwargs) -> flow``) and exposes it in sigma
space: ``denoiser(xt, sigma, context) -> x0`` and ``denoiser.flow(xt, sigma, context) -> flow``.

Declared precision island: sigma -> timestep and flow -> x0 run in ``precision`` (float64 by default, as the
official ``_convert_flow_pred_to_x0``), and results are cast back to ``xt``'s dtype. The model itself runs in
whatever dtype the caller (or the strategy) gives it.

The wrapped model may be a plain module or a distributed engine: ``Denoiser`` only calls it, so gradients,
no_grad and train/eval state are the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sfvideo.diffusion.schedule import SigmaLike, x0_from_flow

FlowModel = Callable[..., Tensor]


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in the official Self Forcing convention: ``cond + scale (cond - uncond)``.

    This equals the textbook ``uncond + w (cond - uncond)`` with ``w = 1 + scale`` (scale 3 here = CFG 4).
    It is linear, so applying it to x0 or to flow predictions at the same ``xt`` gives the same result.
    """
    return cond + scale * (cond - uncond)


class Denoiser:
    """Sigma-space view of a flow-predicting model.

    Args:
        model: Callable with ``WanTransformer.forward``'s signature, returning the flow prediction.
        num_train_timesteps: N in ``timestep = N sigma``.
        model_kwargs: Keyword arguments passed on every call (e.g. ``{"attention": "bidirectional"}``); call-time
            keyword arguments override them.
        precision: Dtype of the sigma -> timestep and flow -> x0 conversions.
    """

    def __init__(
        self,
        model: FlowModel,
        *,
        num_train_timesteps: int = 1000,
        model_kwargs: Mapping[str, Any] | None = None,
        precision: torch.dtype = torch.float64,
    ) -> None:
        self.model = model
        self.num_train_timesteps = num_train_timesteps
        self.model_kwargs = dict(model_kwargs or {})
        self.precision = precision

    def timestep(self, sigma: SigmaLike, xt: Tensor) -> Tensor:
        """Wan timesteps for ``sigma``: ``(B,)`` for a scalar or ``(B,)`` sigma, ``(B, F)`` for ``(B, F)``, fp32."""
        b, f = xt.shape[0], xt.shape[1]
        s = torch.as_tensor(sigma, device=xt.device)
        if s.ndim == 0:
            s = s.expand(b)
        elif s.ndim > 2 or s.shape[0] != b or (s.ndim == 2 and s.shape[1] != f):
            raise ValueError(
                f"sigma of shape {tuple(s.shape)} does not match the latent {tuple(xt.shape)}: expected (), (B,) "
                f"or (B, F)"
            )
        return (s.to(self.precision) * self.num_train_timesteps).to(torch.float32)

    def flow(self, xt: Tensor, sigma: SigmaLike, context: Tensor, **model_kwargs: Any) -> Tensor:
        """Flow prediction ``(B, F, C, H, W)`` at noise level ``sigma``, in ``xt``'s dtype."""
        kwargs = {**self.model_kwargs, **model_kwargs}
        out = self.model(xt, self.timestep(sigma, xt), context, **kwargs)
        if out.shape != xt.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for an input of shape {tuple(xt.shape)}")
        return out.to(xt.dtype)

    def __call__(self, xt: Tensor, sigma: SigmaLike, context: Tensor, **model_kwargs: Any) -> Tensor:
        """Clean estimate ``x0 = xt - sigma flow`` ``(B, F, C, H, W)``, in ``xt``'s dtype."""
        kwargs = {**self.model_kwargs, **model_kwargs}
        flow = self.model(xt, self.timestep(sigma, xt), context, **kwargs)
        if flow.shape != xt.shape:
            raise ValueError(f"model returned shape {tuple(flow.shape)} for an input of shape {tuple(xt.shape)}")
        s = sigma.to(self.precision) if isinstance(sigma, Tensor) else float(sigma)
        return x0_from_flow(xt.to(self.precision), flow.to(self.precision), s).to(xt.dtype)


def match_batch(uncond: Tensor, batch: int) -> Tensor:
    """Broadcast a shared negative-prompt embedding ``(1, L, D)`` to ``(B, L, D)``."""
    if uncond.shape[0] == batch:
        return uncond
    if uncond.shape[0] == 1:
        return uncond.expand(batch, *uncond.shape[1:])
    raise ValueError(f"uncond batch {uncond.shape[0]} matches neither the latent batch {batch} nor 1")


def guided_x0(
    denoiser: Denoiser,
    xt: Tensor,
    sigma: SigmaLike,
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    *,
    batched: bool = True,
    **model_kwargs: Any,
) -> Tensor:
    """CFG x0 prediction ``cfg(x0(cond), x0(uncond), scale)`` ``(B, F, C, H, W)``.

    With ``batched=True`` (and no ``kv_cache``, whose batch is fixed) cond and uncond run as one forward on a
    ``2B`` batch; this needs ``cond`` and ``uncond`` of the same text length. Otherwise two forwards.

    Args:
        denoiser: The (teacher) denoiser.
        xt: Noisy latents ``(B, F, C, H, W)``.
        sigma: Noise level, float, ``(B,)`` or ``(B, F)``.
        cond: Prompt embeddings ``(B, L, D)``.
        uncond: Negative-prompt embeddings ``(B, L', D)`` or ``(1, L', D)``.
        scale: Guidance scale in the official convention (see :func:`cfg`).
    """
    b = xt.shape[0]
    uncond = match_batch(uncond, b)
    can_batch = batched and model_kwargs.get("kv_cache") is None and cond.shape[1:] == uncond.shape[1:]
    if not can_batch:
        x0_cond = denoiser(xt, sigma, cond, **model_kwargs)
        x0_uncond = denoiser(xt, sigma, uncond, **model_kwargs)
        return cfg(x0_cond, x0_uncond, scale)
    s = torch.as_tensor(sigma, device=xt.device)
    s2 = s if s.ndim == 0 else torch.cat([s, s])
    x0_both = denoiser(torch.cat([xt, xt]), s2, torch.cat([cond, uncond.to(cond.dtype)]), **model_kwargs)
    x0_cond, x0_uncond = x0_both.chunk(2)
    return cfg(x0_cond, x0_uncond, scale)


class GuidedDenoiser:
    """A :class:`Denoiser` with classifier-free guidance built in: ``guided(xt, sigma, cond) -> x0``.

    Args:
        denoiser: The unguided denoiser.
        uncond: Negative-prompt embeddings ``(1 or B, L, D)``.
        scale: Guidance scale in the official convention (see :func:`cfg`); 0 means the cond prediction.
        batched: Run cond and uncond in one forward where possible.
    """

    def __init__(self, denoiser: Denoiser, uncond: Tensor, scale: float, *, batched: bool = True) -> None:
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = scale
        self.batched = batched

    def __call__(self, xt: Tensor, sigma: SigmaLike, context: Tensor, **model_kwargs: Any) -> Tensor:
        if self.scale == 0:
            return self.denoiser(xt, sigma, context, **model_kwargs)
        return guided_x0(
            self.denoiser, xt, sigma, context, self.uncond, self.scale, batched=self.batched, **model_kwargs
        )
