"""The toy world's frozen encoders: a word-table text encoder and an exact pixel-unshuffle codec.

Both implement the protocols of ``sfvideo.nn.interfaces`` (``TextEncoder``, ``VideoCodec``, ``StreamDecoder``), so
every training and inference path runs unchanged on the toy world and on Wan2.1 (umT5 + Wan VAE).

``ToyTextEncoder``: lower-cased whitespace tokens over ``world.VOCABULARY``; embedding of the token at position
``i`` = ``word_table[id] + position_table[i]`` (both frozen, N(0, 1) / sqrt(2) from ``torch.Generator`` seeded
with ``seed``), so cross-attention can bind a colour to its shape in two-object prompts (Wan's cross-attention keys
carry no positions of their own; umT5 outputs are contextual). Positions past the prompt are zero, as Wan pads
umT5 outputs, so ``""`` encodes to all zeros: the unconditional / negative prompt of classifier-free guidance.
Unknown words raise ``ValueError`` naming the word (default) or map to a reserved UNK row (``unknown="unk"``).
Prompts longer than ``text_len`` raise rather than truncate: the toy grammar never needs truncation, and a silent
cut would drop an object.

``ToyCodec``: the latent of a video ``(B, T, 3, H, W)`` is its pixel-unshuffle ``(B, T, 3 s², H/s, W/s)``
(``s = spatial_stride``, default 2), optionally normalised per channel, ``(z - shift) / scale``; time is kept
1:1 (one latent frame per pixel frame, so a 21-frame clip is 21 latent frames in 7 chunks of 3, as in the paper).
Channel ``c s² + i s + j`` holds colour ``c`` at sub-pixel ``(i, j)`` (``torch.nn.functional.pixel_unshuffle``
order). The choice is deliberate: the codec is exact and lossless (decode(encode(x)) == x bit for bit when
``scale``/``shift`` are exactly representable), it costs nothing, and it lets the toy metrics see the generator's
output directly, so any error they find is the generator's and not a VAE's. The streaming decoder is stateless
(time 1:1), so chunk-by-chunk decoding equals a full decode exactly.

Not here: the world itself (``toy/world.py``), the real encoders (``nn/umt5.py``, ``nn/wan_vae.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import RecordsInitArgs, StreamDecoder
from sfvideo.toy.world import VOCABULARY, ToyWorldConfig


class ToyTextEncoder(RecordsInitArgs, nn.Module):
    """Frozen, deterministic prompt encoder of the toy world (implements ``TextEncoder``)."""

    def __init__(
        self,
        dim: int = 32,
        text_len: int = 16,
        seed: int = 0,
        unknown: str = "error",
        positional: bool = True,
    ) -> None:
        """
        Args:
            dim: embedding width (the transformer's ``text_dim``).
            text_len: tokens per prompt after padding.
            seed: seed of the frozen tables (same seed, same embeddings on every machine).
            unknown: ``"error"`` (raise on a word outside the vocabulary) or ``"unk"`` (map it to an UNK row).
            positional: add a frozen per-position vector to each token (binds attributes to their object).
        """
        super().__init__()
        if dim <= 0 or text_len <= 0:
            raise ValueError(f"ToyTextEncoder: dim and text_len must be positive, got dim={dim}, text_len={text_len}")
        if unknown not in ("error", "unk"):
            raise ValueError(f"ToyTextEncoder.unknown must be 'error' or 'unk', got {unknown!r}")
        self.dim = dim
        self.text_len = text_len
        self.unknown = unknown
        self.vocab: dict[str, int] = {w: i for i, w in enumerate(VOCABULARY)}
        self.unk_id = len(self.vocab)
        g = torch.Generator().manual_seed(seed)
        # Unit-variance sum of the word and position parts; UNK gets its own row.
        words = torch.randn(len(self.vocab) + 1, dim, generator=g) / 2**0.5
        positions = torch.randn(text_len, dim, generator=g) / 2**0.5
        if not positional:
            words, positions = words * 2**0.5, torch.zeros_like(positions)
        self.register_buffer("word_table", words, persistent=False)
        self.register_buffer("position_table", positions, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a prompt (lower-cased, split on whitespace)."""
        ids = []
        for w in prompt.lower().split():
            if w in self.vocab:
                ids.append(self.vocab[w])
            elif self.unknown == "unk":
                ids.append(self.unk_id)
            else:
                raise ValueError(
                    f"ToyTextEncoder: unknown word {w!r} in prompt {prompt!r}; vocabulary: {sorted(self.vocab)}"
                )
        if len(ids) > self.text_len:
            raise ValueError(
                f"ToyTextEncoder: prompt {prompt!r} has {len(ids)} words, more than text_len={self.text_len}"
            )
        return ids

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, text_len, dim)`` float32 embeddings; positions after the last word are zero."""
        if isinstance(prompts, str):
            raise TypeError("ToyTextEncoder.encode takes a list of prompts, got a str")
        dev = self.word_table.device
        out = torch.zeros(len(prompts), self.text_len, self.dim, device=dev)
        for b, prompt in enumerate(prompts):
            ids = torch.tensor(self.tokenize(prompt), dtype=torch.long, device=dev)
            n = ids.numel()
            out[b, :n] = self.word_table[ids] + self.position_table[:n]
        return out

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)


class ToyStreamDecoder(StreamDecoder):
    """Chunk-by-chunk decoder of ``ToyCodec`` (stateless: time is 1:1)."""

    def __init__(self, codec: ToyCodec) -> None:
        self.codec = codec

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, f, C, h, w)`` latents -> ``(B, f, 3, H, W)`` pixels."""
        return self.codec.decode(latents)


class ToyCodec(RecordsInitArgs, nn.Module):
    """Pixel-unshuffle latent space of the toy world (implements ``VideoCodec``)."""

    def __init__(
        self,
        spatial_stride: int = 2,
        scale: float | list[float] = 1.0,
        shift: float | list[float] = 0.0,
    ) -> None:
        """
        Args:
            spatial_stride: pixel-unshuffle factor ``s``; latent channels are ``3 s²``.
            scale: normalising scale, a scalar, one per colour channel (3) or one per latent channel (3 s²).
            shift: normalising shift, same forms as ``scale``; latents are ``(unshuffle(x) - shift) / scale``.
        """
        super().__init__()
        if spatial_stride <= 0:
            raise ValueError(f"ToyCodec.spatial_stride must be positive, got {spatial_stride}")
        self.spatial_stride = spatial_stride
        self.latent_channels = 3 * spatial_stride**2
        self.register_buffer("scale", self._per_channel(scale, "scale"), persistent=False)
        self.register_buffer("shift", self._per_channel(shift, "shift"), persistent=False)
        if (self.scale == 0).any():
            raise ValueError("ToyCodec.scale must be non-zero")
        self.requires_grad_(False)
        self.eval()

    def _per_channel(self, value: float | list[float], name: str) -> torch.Tensor:
        v = torch.as_tensor(value, dtype=torch.float32).flatten()
        s2 = self.spatial_stride**2
        if v.numel() == 1:
            v = v.expand(self.latent_channels)
        elif v.numel() == 3:
            v = v.repeat_interleave(s2)  # unshuffle keeps colour-major channel order: c s² + i s + j
        elif v.numel() != self.latent_channels:
            raise ValueError(f"ToyCodec.{name}: need 1, 3 or {self.latent_channels} values, got {v.numel()}")
        return v.clone().view(1, 1, -1, 1, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] -> ``(B, T, 3 s², H/s, W/s)`` normalised latents."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"ToyCodec.encode: video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        b, t, _, h, w = video.shape
        s = self.spatial_stride
        if h % s or w % s:
            raise ValueError(f"ToyCodec.encode: frame size {h}x{w} is not divisible by spatial_stride={s}")
        z = F.pixel_unshuffle(video.reshape(b * t, 3, h, w), s).reshape(b, t, self.latent_channels, h // s, w // s)
        return (z - self.shift.to(z)) / self.scale.to(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3 s², h, w)`` normalised latents -> ``(B, F, 3, h s, w s)`` pixels (not clamped)."""
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"ToyCodec.decode: latents must be (B, F, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        b, f, c, h, w = latents.shape
        z = latents * self.scale.to(latents) + self.shift.to(latents)
        s = self.spatial_stride
        return F.pixel_shuffle(z.reshape(b * f, c, h, w), s).reshape(b, f, 3, h * s, w * s)

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Time is 1:1."""
        return num_latent_frames

    def stream_decoder(self) -> ToyStreamDecoder:
        return ToyStreamDecoder(self)


def toy_geometry(
    world: ToyWorldConfig | None = None, codec: ToyCodec | None = None, frames_per_chunk: int = 3
) -> VideoGeometry:
    """The latent ``VideoGeometry`` of the toy world through the toy codec (default: 21 x 12 x 16 x 16, chunks of 3)."""
    world = world or ToyWorldConfig()
    codec = codec or ToyCodec()
    s = codec.spatial_stride
    if world.height % s or world.width % s:
        raise ValueError(f"toy_geometry: frame {world.height}x{world.width} is not divisible by spatial_stride={s}")
    return VideoGeometry(
        num_frames=world.num_frames,
        channels=codec.latent_channels,
        height=world.height // s,
        width=world.width // s,
        frames_per_chunk=frames_per_chunk,
    )
