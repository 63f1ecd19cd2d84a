"""Dtypes: the one parser of dtype names, and the one cast that keeps a model's fp32 islands.

fp32 islands follow diffusers' rule: a parameter stays fp32 when a segment of its dotted name is listed in the
class's ``_keep_in_fp32_modules`` (``WanTransformer``: ``nn.wan.FP32_MODULES``: time embedding and projection,
modulation tables, layer norms). ``load_transformer``, ``cast_model`` and the training modules' frozen teacher
all apply it through :func:`keeps_fp32`.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""Accepted dtype names (``torch.`` prefixes are stripped)."""


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``, ``"torch.bfloat16"``, ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None.

    Raises:
        ValueError: an unknown name (one line listing the accepted ones).
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {value!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def keeps_fp32(name: str, keep_modules: list[str] | tuple[str, ...] | None) -> bool:
    """diffusers' rule: tensor ``name`` stays fp32 when one of its path segments names a ``keep_modules`` entry."""
    segments = name.split(".")
    return any(m in segments for m in keep_modules or ())


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to ``dtype`` in place, except the class's fp32 islands; returns ``model``."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if keeps_fp32(name, keep) else dtype)
    return model


def compute_dtype(model: nn.Module) -> torch.dtype:
    """Activation dtype of a network: ``WanTransformer.compute_dtype``, else its first parameter's dtype."""
    dtype = getattr(model, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    """Device of a network's parameters (the first one's)."""
    return next(model.parameters()).device
