"""VBench's frame preprocessing, re-implemented on plain ``torch.nn.functional`` (no torchvision needed).

Frames are ``(T, 3, H, W)`` uint8 RGB, as VBench's ``load_video`` returns them (``vbench/utils.py``); VBench then
converts them with ``torch.Tensor(frames)`` to float32 in 0..255 and applies torchvision transforms, whose tensor
code paths are reproduced here:

- ``Resize(n)`` with an int: the short side becomes ``n`` and the long side ``int(n * long / short)``
  (torchvision ``_compute_resized_output_size``); ``F.interpolate(..., align_corners=False, antialias=False)``;
  float input is neither rounded nor clamped.
- ``CenterCrop(n)``: top = ``int(round((H - n) / 2))``, left likewise (Python's round).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of torchvision ``Resize(size)``: short side ``size``, long side ``int(size*long/short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:  # torchvision returns the input unchanged
        return x
    return F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` for an input at least ``size`` on both sides."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = x.new_tensor(mean).view(-1, 1, 1)
    s = x.new_tensor(std).view(-1, 1, 1)
    return (x - m) / s


def clip_transform(frames: torch.Tensor, n_px: int = 224) -> torch.Tensor:
    """VBench ``clip_transform(n_px)`` (``vbench/utils.py``): bicubic ``Resize(n_px, antialias=False)``,
    ``CenterCrop(n_px)``, ``/255``, CLIP mean/std. ``(T, 3, H, W)`` uint8 -> ``(T, 3, n_px, n_px)`` float32."""
    x = frames.to(torch.float32)
    x = _resize(x, short_side_size(*x.shape[-2:], n_px), "bicubic")
    x = center_crop(x, n_px).div(255.0)
    return _normalize(x, CLIP_MEAN, CLIP_STD)


def dino_transform(frames: torch.Tensor, n_px: int = 224) -> torch.Tensor:
    """VBench ``dino_transform(n_px)`` (``vbench/utils.py``): bilinear ``Resize(n_px, antialias=False)`` of the
    short side, **no crop**, ``/255``, ImageNet mean/std. ``(T, 3, H, W)`` uint8 -> float32."""
    x = frames.to(torch.float32)
    x = _resize(x, short_side_size(*x.shape[-2:], n_px), "bilinear")
    return _normalize(x.div(255.0), IMAGENET_MEAN, IMAGENET_STD)


def musiq_transform(frames: torch.Tensor, mode: str = "longer", limit: int = 512) -> torch.Tensor:
    """VBench ``imaging_quality.transform`` (``vbench/imaging_quality.py``), default mode ``'longer'``: if the
    longer side exceeds 512, bilinear ``Resize((int(s*h), int(s*w)), antialias=False)`` with ``s = 512/max(h,w)``;
    then ``/255``. Modes ``'shorter'``, ``'shorter_centercrop'`` and ``'None'`` as in VBench."""
    x = frames.to(torch.float32)
    h, w = x.shape[-2:]
    if mode.startswith("shorter"):
        if min(h, w) > limit:
            s = limit / min(h, w)
            x = _resize(x, (int(s * h), int(s * w)), "bilinear")
            if mode == "shorter_centercrop":
                x = center_crop(x, limit)
    elif mode == "longer":
        if max(h, w) > limit:
            s = limit / max(h, w)
            x = _resize(x, (int(s * h), int(s * w)), "bilinear")
    elif mode != "None":
        raise ValueError(f"imaging quality preprocessing mode {mode!r}: expected longer, shorter, "
                         "shorter_centercrop or None")
    return x / 255.0


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """``InputPadder(dims, divisor)`` of RAFT (``third_party/RAFT/core/utils_core/utils.py``, mode 'sintel') and
    AMT (``third_party/amt/utils/utils.py``): replicate-pad H and W up to a multiple of ``divisor``, split evenly
    (the extra pixel at the bottom/right)."""
    h, w = x.shape[-2:]
    ph = (((h // divisor) + 1) * divisor - h) % divisor
    pw = (((w // divisor) + 1) * divisor - w) % divisor
    if not ph and not pw:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="replicate")


def unpad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pad_to_multiple` for an original size ``(height, width)``."""
    h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]

