"""Weighted flow-matching loss of the many-step TF/DF baselines (official ``model/diffusion.py``,
``CausalDiffusion.generator_loss``).

Per frame, the squared error of the flow prediction against ``noise - x0`` is averaged over ``(C, H, W)``, multiplied
by the schedule's weight of that frame's noise level (``FlowMatchSchedule.training_weight``, the Gaussian bump of
``utils/scheduler.py``), and averaged over ``(B, F)``:

    L = mean_{b, f} w(sigma_{b f}) mean_{c, h, w} (flow_pred - (noise - x0))^2.

The inputs come from ``sfvideo.diffusion.forcing.forcing_batch``; computed in fp32 (official ``.float()``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def weighted_flow_loss(flow_pred: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-frame weighted flow-matching MSE.

    Args:
        flow_pred: Model flow prediction ``(B, F, C, H, W)``.
        target: ``noise - x0`` of the same shape.
        weight: ``(B, F)`` per-frame weights.

    Returns:
        ``(loss, logs)``: fp32 scalar and the detached unweighted MSE (``flow_mse``).
    """
    if flow_pred.shape != target.shape:
        raise ValueError(f"flow_pred {tuple(flow_pred.shape)} and target {tuple(target.shape)} differ in shape")
    if tuple(weight.shape) != tuple(flow_pred.shape[:2]):
        raise ValueError(f"weight must be (B, F) = {tuple(flow_pred.shape[:2])}, got {tuple(weight.shape)}")
    per_frame = F.mse_loss(flow_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(2, target.ndim)))
    loss = (per_frame * weight.float()).mean()
    return loss, {"flow_loss": loss.detach(), "flow_mse": per_frame.mean().detach()}
