"""VBench's per-video formulas on frames, features and flows (no model inside; models live in ``models.py``).

Frames are ``(T, 3, H, W)`` uint8 RGB. Each function names the VBench file whose arithmetic it reproduces
(github.com/Vchitect/VBench at commit 45e79ec). Sums run in float64: VBench accumulates in float32 numpy or Python
floats, so results agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flicker_mae(frames: torch.Tensor) -> torch.Tensor:
    """Per consecutive pair ``i -> i+1``: ``mean |x_{i+1} - x_i|`` over all pixels and channels in 0..255, shape
    ``(T-1,)`` (``vbench/temporal_flickering.py``: ``calculate_mae`` = ``np.mean(cv2.absdiff(float32, float32))``;
    cv2 reads BGR, which does not change a mean over channels)."""
    x = frames.to(torch.float64)
    return (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))


def temporal_flickering(frames: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Video score ``(255 - mean_i MAE_i) / 255`` and the per-pair curve ``(255 - MAE_i) / 255``, ``(T-1,)``
    (``vbench/temporal_flickering.py::cal_score``; VBench averages video scores over the dataset)."""
    if frames.shape[0] < 2:
        raise ValueError("temporal flickering needs at least 2 frames")
    mae = flicker_mae(frames)
    return float((255.0 - mae.mean()) / 255.0), (255.0 - mae) / 255.0


def consistency_terms(features: torch.Tensor) -> torch.Tensor:
    """``s_i = (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2`` for ``i = 1..T-1``, shape ``(T-1,)``.

    ``vbench/subject_consistency.py`` (DINO features) and ``vbench/background_consistency.py`` (CLIP image
    embeddings): features are L2-normalised, then compared to the previous and to the first frame. The per-video
    value is the mean of ``s_i``; the dataset value is ``sum s_i / number of terms`` over all videos (frame-weighted).
    """
    if features.shape[0] < 2:
        raise ValueError("a consistency score needs at least 2 frames")
    f = F.normalize(features.to(torch.float64), dim=-1, p=2)
    prev = (f[1:] * f[:-1]).sum(-1).clamp_min(0.0)
    first = (f[1:] * f[:1]).sum(-1).clamp_min(0.0)
    return (prev + first) / 2


def gap_similarity(features: torch.Tensor, gaps: list[int]) -> list[tuple[float, int]]:
    """Long-horizon coherence: for each gap ``g``, ``(sum_t cos(f_t, f_{t+g}), number of pairs)`` (0 pairs when
    ``g >= T``). Not a VBench dimension: the curve proposed in VBench issue #206 (DINO cosine similarity against the
    frame gap), which adjacent-frame scores cannot see."""
    f = F.normalize(features.to(torch.float64), dim=-1, p=2)
    out = []
    for g in gaps:
        if g <= 0:
            raise ValueError(f"frame gaps must be positive, got {g}")
        n = f.shape[0] - g
        out.append((float((f[g:] * f[:-g]).sum()) if n > 0 else 0.0, max(n, 0)))
    return out


def dynamic_sample_interval(fps: float) -> int:
    """``max(1, round(fps / 8))`` (``vbench/dynamic_degree.py::get_frames``: frames subsampled to about 8 fps;
    Python's round, as VBench)."""
    return max(1, round(fps / 8))


def top_flow_magnitude(flow: torch.Tensor) -> float:
    """Mean of the largest 5 % flow magnitudes of one flow field ``(2, H, W)``: ``cut = int(H * W * 0.05)``
    (``vbench/dynamic_degree.py::get_score``; H, W are those of the padded frames RAFT saw). NaN when ``cut`` is 0,
    as ``np.mean`` of an empty slice is."""
    rad = flow.to(torch.float64).pow(2).sum(0).sqrt().flatten()
    cut = int(rad.numel() * 0.05)
    if cut == 0:
        return float("nan")
    return float(rad.topk(cut).values.mean())


def dynamic_params(height: int, width: int, num_sampled_frames: int) -> tuple[float, int]:
    """``thres = 6 * min(H, W) / 256`` (unpadded frame) and ``count_num = round(4 * count / 16)`` with ``count``
    the number of sampled frames (``vbench/dynamic_degree.py::set_params``)."""
    return 6.0 * (min(height, width) / 256.0), round(4 * (num_sampled_frames / 16.0))


def is_dynamic(scores: list[float], thres: float, count_num: int) -> bool:
    """``check_move``: true as soon as ``count_num`` pair scores exceed ``thres`` (so never for no pair)."""
    count = 0
    for s in scores:
        if s > thres:
            count += 1
        if count >= count_num:
            return True
    return False


def to_uint8_like_amt(x: torch.Tensor) -> torch.Tensor:
    """AMT ``tensor2img`` (``third_party/amt/utils/utils.py``): ``(x * 255).clip(0, 255).astype(np.uint8)``, i.e.
    truncation toward zero, not rounding."""
    return (x * 255.0).clamp(0, 255).to(torch.uint8)


def motion_smoothness(frames: torch.Tensor, interpolated: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Video score ``(255 - mean_k d_k) / 255`` with ``d_k = mean |x_{2k+1} - x̂_{2k+1}|`` (uint8 absdiff, all
    pixels and channels), where ``x̂_{2k+1}`` is interpolated from the even frames ``x_{2k}, x_{2k+2}``
    (``vbench/motion_smoothness.py::motion_score`` / ``vfi_score`` / ``get_diff``). ``interpolated`` is uint8
    ``(K, 3, H, W)``, ``K = ceil(T/2) - 1``. Returns the score and ``(255 - d_k)/255`` per odd frame."""
    odd = frames[1::2][: interpolated.shape[0]]
    if odd.shape[0] == 0:
        raise ValueError("motion smoothness needs at least 3 frames")
    d = (odd.to(torch.int16) - interpolated.to(torch.int16)).abs().to(torch.float64).mean(dim=(1, 2, 3))
    return float((255.0 - d.mean()) / 255.0), (255.0 - d) / 255.0
