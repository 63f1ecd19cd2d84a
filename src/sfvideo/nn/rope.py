"""Wan2.1's 3-axis rotary position embedding, computed for arbitrary frame positions.

Wan splits each head's ``D`` channels into ``D/2`` interleaved pairs ``(x[2i], x[2i+1])`` and rotates pair ``i`` by
``pos_axis(i) * theta^(-2j / d_axis)``: the first ``t/2`` pairs by the token's frame index, the next ``h/2`` by its row,
the last ``w/2`` by its column, with ``h = w = 2 * (D // 6)`` and ``t = D - h - w`` (22/21/21 pairs for D=128).

Unlike the official code (a 1024-row table sliced at ``start_frame``) the angles are computed on demand from the
frame positions, in float64, so any offset and any stream length work; the KV cache uses this to apply RoPE to the
attended view with positions relative to the view (``nn/kv_cache.py``).
"""

from __future__ import annotations

import functools

import torch

ROPE_THETA = 10000.0
"""Wan's RoPE base for all three axes."""


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (frame, row, column) axes: ``(D - 4*(D//6), 2*(D//6), 2*(D//6))``."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    if head_dim % 2 or t_dim % 2 or t_dim <= 0 or h_dim <= 0:
        raise ValueError(f"attention_head_dim={head_dim} cannot be split into even (t, h, w) RoPE axes")
    return t_dim, h_dim, w_dim


def _axis_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """``(N,)`` float64 positions -> ``(N, axis_dim/2)`` float64 angles ``pos * theta^(-2j/axis_dim)``."""
    inv_freq = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device) / axis_dim)
    return positions[:, None] * inv_freq[None, :]


def rope_cos_sin(
    frame_positions: torch.Tensor | list[int] | range,
    height: int,
    width: int,
    head_dim: int,
    *,
    theta: float = ROPE_THETA,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for the tokens of the given frames, frame-major then row then column (Wan's token order).

    Args:
        frame_positions: ``(F,)`` RoPE position of each frame (any non-negative values, not limited to a table).
        height: Post-patch token rows per frame.
        width: Post-patch token columns per frame.
        head_dim: Channels per attention head.
        theta: RoPE base.
        device: Device of the tables (default: that of ``frame_positions`` if a tensor, else CPU).

    Returns:
        ``(cos, sin)``, each ``(F * height * width, head_dim / 2)`` float32, one entry per channel pair.
    """
    if not isinstance(frame_positions, torch.Tensor):
        frame_positions = torch.tensor(list(frame_positions), dtype=torch.float64, device=device)
    positions = frame_positions.to(device=device or frame_positions.device, dtype=torch.float64)
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    num_frames = positions.shape[0]
    rows = torch.arange(height, dtype=torch.float64, device=positions.device)
    cols = torch.arange(width, dtype=torch.float64, device=positions.device)
    # Angles per axis, broadcast to the (F, h, w) token grid: (F, h, w, t/2 + h/2 + w/2) = (F, h, w, D/2).
    ang_t = _axis_angles(positions, t_dim, theta)[:, None, None, :].expand(num_frames, height, width, -1)
    ang_h = _axis_angles(rows, h_dim, theta)[None, :, None, :].expand(num_frames, height, width, -1)
    ang_w = _axis_angles(cols, w_dim, theta)[None, None, :, :].expand(num_frames, height, width, -1)
    angles = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(num_frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


@functools.lru_cache(maxsize=64)
def rope_table(
    num_frames: int, height: int, width: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_cos_sin` of frames ``0 .. num_frames - 1``, computed once per arguments and shared (read-only).

    The KV-cached forward rotates its attended view with positions ``0 .. V - 1`` (``nn/kv_cache.py``), so a
    stream meets only a few view lengths: computing their tables once saves a float64 table per forward, and the
    same tensors on every call are what a CUDA graph of the forward needs (its replay reads fixed addresses).
    """
    return rope_cos_sin(range(num_frames), height, width, head_dim, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (fp32 inside, result in ``x.dtype``).

    Args:
        x: ``(B, L, H, D)`` queries or keys.
        cos: ``(L, D/2)`` from :func:`rope_cos_sin`.
        sin: ``(L, D/2)``.
    """
    if cos.shape[0] != x.shape[1]:
        raise ValueError(f"apply_rope: table has {cos.shape[0]} positions but x has {x.shape[1]} tokens")
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, D/2)
    rotated = torch.stack([x_even * c - x_odd * s, x_even * s + x_odd * c], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
