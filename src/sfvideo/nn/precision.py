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


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16), as oneDNN needs for bf16 to be
    faster than fp32. Without them bf16 matmuls are emulated: measured 2026-12-03 on a 2-core AMD EPYC with AVX2
    only, torch 2.13.0+cpu, one thread, (5376, 256) @ (256, 512): fp32 32 ms, bf16 1210 ms (38x slower)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.3
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_precision_warning(precision: object, accelerator: object) -> str | None:
    """The warning for a CPU run in bf16 on a CPU without bf16 matrix instructions (see
    :func:`cpu_has_bf16_matmul`), or None. ``precision`` and ``accelerator`` are the Trainer's arguments."""
    on_cpu = str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.cuda.is_available())
    if not on_cpu or not str(precision).startswith("bf16") or cpu_has_bf16_matmul():
        return None
    return (f"--trainer.precision {precision} on a CPU without AVX512-BF16 / AMX: bf16 matmuls are emulated here "
            "(measured 38x slower than fp32); use --trainer.precision 32")


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
