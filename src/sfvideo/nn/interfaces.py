"""Interfaces shared by the real (umT5, Wan VAE) and toy (embedded world) encoders.

Every training and inference path talks to these protocols only, so the toy world and Wan2.1 share code.
Layouts: videos are ``(B, T, 3, H, W)`` in [-1, 1]; latents are ``(B, F, C, h, w)`` (see ``sfvideo.geometry``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TextEncoder(Protocol):
    """Frozen prompt encoder. Padding positions of the output are zero (Wan's convention)."""

    text_len: int
    """Tokens per prompt after padding/truncation (512 for umT5 in Wan)."""
    dim: int
    """Embedding width (4096 for umT5-XXL)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Return ``(B, text_len, dim)`` embeddings, padding zeroed."""
        ...


@runtime_checkable
class StreamDecoder(Protocol):
    """Decodes a latent video chunk by chunk, carrying causal state; concatenated output equals a full decode."""

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, f, C, h, w)`` latents -> ``(B, t, 3, H, W)`` pixel frames in [-1, 1]."""
        ...


@runtime_checkable
class VideoCodec(Protocol):
    """Frozen latent space (the Wan VAE, or the toy world's pixel-unshuffle).

    Implementations also carry ``latent_channels`` (C of the latents) and ``spatial_stride`` (pixel size / latent
    size along H and W: 8 for the Wan VAE). They are instance attributes, so they are not protocol members (which
    LightningCLI checks on the class).
    """

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, F, C, h, w)``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, F, C, h, w)`` -> ``(B, T, 3, H, W)`` in [-1, 1]."""
        ...

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Pixel frames a full decode of ``num_latent_frames`` yields (Wan: 1 + 4 (F - 1))."""
        ...

    def stream_decoder(self) -> Any:
        """A fresh :class:`StreamDecoder` (its causal cache starts empty).

        Annotated ``Any``: LightningCLI's protocol check compares return annotations by identity.
        """
        ...
