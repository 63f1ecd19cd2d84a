"""Weighted flow-matching loss of the many-step TF/DF baselines (official ``model/diffusion.py``,
``CausalDiffusion.generator_loss``).

Per frame, the squared error of the flow prediction against ``noise - x0`` is averaged over ``(C, H, W)``, multiplied
by the schedule's weight of that frame's noise level (``FlowMatchSchedule.training_weight``, the Gaussian bump of
``utils/scheduler.py``), and averaged over ``(B, F)``:

    L = mean_{b, f} w(sigma_{b f}) mean_{c, h, w} (flow_pred - (noise - x0))^2.

Frames outside ``mask`` (the teacher's clean prefix, where ``noise`` is not observable) are left out: the mean runs
over the kept frames only. The inputs come from ``sfvideo.diffusion.forcing.forcing_batch``; computed in fp32
(official ``.float()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def weighted_flow_loss(
    flow_pred: Tensor, target: Tensor, weight: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-frame weighted flow-matching MSE.

    Args:
        flow_pred: Model flow prediction ``(B, F, C, H, W)``.
        target: ``noise - x0`` of the same shape.
        weight: ``(B, F)`` per-frame weights.
        mask: ``(B, F)`` bool, the frames that count (default all); both outputs average over these only.

    Returns:
        ``(loss, logs)``: fp32 scalar and the detached unweighted MSE (``flow_mse``).
    """
    if flow_pred.shape != target.shape:
        raise ValueError(f"flow_pred {tuple(flow_pred.shape)} and target {tuple(target.shape)} differ in shape")
    if tuple(weight.shape) != tuple(flow_pred.shape[:2]):
        raise ValueError(f"weight must be (B, F) = {tuple(flow_pred.shape[:2])}, got {tuple(weight.shape)}")
    per_frame = F.mse_loss(flow_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(2, target.ndim)))
    if mask is None:
        loss, mse = (per_frame * weight.float()).mean(), per_frame.mean()
    else:
        if tuple(mask.shape) != tuple(per_frame.shape):
            raise ValueError(f"mask must be (B, F) = {tuple(per_frame.shape)}, got {tuple(mask.shape)}")
        count = mask.sum().clamp_min(1).float()  # an all-masked batch gives 0, not NaN
        zero = per_frame.new_zeros(())  # where, not a product: a masked frame's error may be inf or NaN
        loss = torch.where(mask, per_frame * weight.float(), zero).sum() / count
        mse = torch.where(mask, per_frame, zero).sum() / count
    return loss, {"flow_loss": loss.detach(), "flow_mse": mse.detach()}
