"""Attention kernels and the frame-level masks of the causal Wan transformer.

One entry point, :func:`attention`, over three kernels:

- ``"sdpa"``: ``F.scaled_dot_product_attention`` with an optional boolean mask. Works everywhere and is the only
  masked path with a CPU backward (flex_attention has none), so CPU training and tests use it.
- ``"flex"``: ``flex_attention`` with a ``BlockMask`` (compiled on CUDA); the masked training paths on GPU.
- ``"flash"``: flash-attn 2, only for unmasked half-precision attention on CUDA (the KV-cached path, where the
  attended view already encodes causality), used when the package is importable.

``"auto"`` picks among them by device, dtype, availability and whether a mask is needed (:func:`resolve_backend`).

Masks are defined on *frames* (every token of a frame sees the same keys) and expanded to tokens. They are built
once per ``(mode, num_frames, tokens_per_frame, frames_per_chunk, window_frames, device, kind)`` and cached by that
key, so a changed frame count or mode can never reuse a stale mask (the official code's ``self.block_mask`` can).
Layout of q/k/v everywhere here: ``(B, L, H, D)``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["auto", "sdpa", "flex", "flash"]
MaskMode = Literal["block_causal", "teacher_forcing"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex", "flash")

_FLEX_BLOCK = 128
"""flex_attention's default sparse block size; tables are padded to cover the rounded-up sequence."""


def flash_available() -> bool:
    """Whether the ``flash_attn`` package is importable (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """Concrete kernel for a requested backend: ``"auto"`` -> flex (masked) or flash/sdpa (unmasked) on CUDA, sdpa
    elsewhere. An explicit choice is honoured, except that ``"flash"`` cannot take a mask (falls back to flex on
    CUDA, sdpa elsewhere) and unmasked attention never uses flex (sdpa instead)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if not on_cuda:
            return "sdpa"
        if masked:
            return "flex"
        return "flash" if half and flash_available() else "sdpa"
    if backend == "flash" and masked:
        return "flex" if on_cuda else "sdpa"
    if backend == "flex" and not masked:
        return "sdpa"  # nothing to skip; avoids recompiling flex for every KV-view length
    return backend


# ---------------------------------------------------------------------------------------------------------------
# 1. Frame-level visibility
# ---------------------------------------------------------------------------------------------------------------


def _check_window(window_frames: int | None, frames_per_chunk: int) -> None:
    if window_frames is not None and window_frames < frames_per_chunk:
        raise ValueError(
            f"window_frames={window_frames} must be >= frames_per_chunk={frames_per_chunk} (a chunk sees itself)"
        )


@functools.lru_cache(maxsize=64)
def frame_visibility(
    mode: MaskMode, num_frames: int, frames_per_chunk: int, window_frames: int | None = None
) -> torch.Tensor:
    """Boolean ``(Fq, Fk)`` table on CPU: may a token of query frame ``i`` attend to a token of key frame ``j``?

    ``block_causal`` (diffusion forcing, ``F x F``): frame ``i`` in chunk ``c`` sees frames ``j < end(c)``, i.e.
    its own chunk bidirectionally and earlier chunks; with ``window_frames = W`` also only ``j >= end(c) - W``
    (chunk-aligned sliding window, as the official ``local_attn_size``).

    ``teacher_forcing`` (``2F x 2F``; rows/cols ``0..F-1`` are the clean copy, ``F..2F-1`` the noisy one): clean
    frames are block-causal among themselves and never see noisy ones; noisy chunk ``b`` sees clean chunks ``< b``
    and its own noisy chunk. The window, if any, applies to the frame positions of the keys in both halves.
    """
    _check_window(window_frames, frames_per_chunk)
    frame = torch.arange(num_frames)
    chunk = frame // frames_per_chunk
    chunk_end = (chunk + 1) * frames_per_chunk  # (F,) exclusive end frame of each frame's chunk
    causal = frame[None, :] < chunk_end[:, None]  # (Fq, Fk): key before the end of the query's chunk
    if window_frames is not None:
        causal &= frame[None, :] >= chunk_end[:, None] - window_frames
    if mode == "block_causal":
        return causal
    if mode != "teacher_forcing":
        raise ValueError(f"mask mode must be 'block_causal' or 'teacher_forcing', got {mode!r}")
    earlier_chunk = chunk[None, :] < chunk[:, None]  # (Fq, Fk): key chunk strictly before the query chunk
    same_chunk = chunk[None, :] == chunk[:, None]
    table = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool)
    table[:num_frames, :num_frames] = causal  # clean -> clean
    table[num_frames:, :num_frames] = causal & earlier_chunk  # noisy -> clean of earlier chunks
    table[num_frames:, num_frames:] = causal & same_chunk  # noisy -> own noisy chunk
    return table


# ---------------------------------------------------------------------------------------------------------------
# 2. Token-level masks (cached by key)
# ---------------------------------------------------------------------------------------------------------------


def _canonical_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_mask(
    mode: MaskMode,
    num_frames: int,
    tokens_per_frame: int,
    frames_per_chunk: int,
    window_frames: int | None,
    device: torch.device | str,
    kind: Literal["bool", "block"] = "bool",
):
    """The token mask for a masked forward: ``(L, L)`` boolean (True = attend) for sdpa, or a flex ``BlockMask``.

    ``L = num_frames * tokens_per_frame`` (twice that for teacher forcing). Cached by all arguments.
    """
    return _build_mask_cached(
        mode, num_frames, tokens_per_frame, frames_per_chunk, window_frames, _canonical_device(device), kind
    )


@functools.lru_cache(maxsize=32)
def _build_mask_cached(mode, num_frames, tokens_per_frame, frames_per_chunk, window_frames, device, kind):
    table = frame_visibility(mode, num_frames, frames_per_chunk, window_frames)
    if kind == "bool":
        expand = functools.partial(torch.repeat_interleave, repeats=tokens_per_frame)
        return expand(expand(table, dim=0), dim=1).to(device)
    if kind != "block":
        raise ValueError(f"mask kind must be 'bool' or 'block', got {kind!r}")
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len = table.shape[0] * tokens_per_frame
    # flex evaluates mask_mod on the sequence rounded up to its block size: pad the frame table with False so
    # padded indices look up a valid (masked-out) entry.
    padded_len = -(-seq_len // _FLEX_BLOCK) * _FLEX_BLOCK  # ceil to a block multiple
    padded_frames = -(-padded_len // tokens_per_frame) + 1
    padded = torch.zeros(padded_frames, padded_frames, dtype=torch.bool)
    padded[: table.shape[0], : table.shape[1]] = table
    padded = padded.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[q_idx // tokens_per_frame, kv_idx // tokens_per_frame]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device, _compile=False)


# ---------------------------------------------------------------------------------------------------------------
# 3. Kernels
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        # Fused kernel; without compile flex materialises the full score matrix.
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention  # eager: forward only, for CPU checks


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention (no dropout, scale ``D^-1/2``).

    Args:
        q: ``(B, Lq, H, D)``.
        k: ``(B, Lk, H, D)``.
        v: ``(B, Lk, H, D)``.
        mask: ``None``, an ``(Lq, Lk)`` boolean tensor (True = attend) for ``"sdpa"``, or a ``BlockMask`` for
            ``"flex"`` (build either with :func:`build_mask`).
        backend: ``"sdpa"``, ``"flex"`` or ``"flash"`` (resolve ``"auto"`` first with :func:`resolve_backend`).

    Returns:
        ``(B, Lq, H, D)`` in ``q.dtype``.
    """
    if backend == "flash":
        if mask is not None:
            raise ValueError("attention: backend 'flash' takes no mask")
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    if backend == "flex":
        if mask is not None and isinstance(mask, torch.Tensor):
            raise ValueError("attention: backend 'flex' needs a BlockMask (build_mask(..., kind='block'))")
        out = _flex_kernel(q.device.type)(qt, kt, vt, block_mask=mask)
    elif backend == "sdpa":
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError("attention: backend 'sdpa' needs a boolean tensor mask (build_mask(..., kind='bool'))")
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        raise ValueError(f"attention: unknown backend {backend!r} (expected 'sdpa', 'flex' or 'flash')")
    return out.transpose(1, 2).type_as(q)
