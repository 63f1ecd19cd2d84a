"""The Wan2.1 VAE behind ``sfvideo.nn.interfaces.VideoCodec``, with a chunk-by-chunk stream decoder.

:class:`WanVAECodec` wraps diffusers' ``AutoencoderKLWan``: per-channel latent normalisation ``(z - mean) / std``
from the VAE config, our ``(B, F, C, h, w)`` layout, and :class:`WanVAEStreamDecoder`, a chunk-by-chunk decoder
whose concatenated output equals a full decode to fp32 rounding. Options for GPUs (bf16, channels-last, several
frames per decoder call) are measured or marked unmeasured in docs/benchmarks.md.

Memory (Wan2.1): about 127M parameters (0.25 GB in bf16); its causal caches during decode keep 2 frames of every
causal conv's input, which at 480x832 dominate its memory, not the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfvideo.nn.interfaces import RecordsInitArgs, StreamDecoder, freeze
from sfvideo.nn.precision import parse_dtype

__all__ = ["WanVAECodec", "WanVAEStreamDecoder"]


def _count_causal_convs(module: nn.Module) -> int:
    """Feature-cache slots a Wan encoder/decoder needs: one per causal 3-D conv (diffusers' own count)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanVAEStreamDecoder(StreamDecoder):
    """Decodes Wan latents chunk by chunk, carrying the causal-conv caches between calls.

    Drives ``vae.post_quant_conv`` and ``vae.decoder(x, feat_cache=..., feat_idx=..., first_chunk=...)`` as
    diffusers' ``AutoencoderKLWan._decode`` does over a whole video, but with the cache held here instead of on the
    VAE, so several streams can decode with one VAE. Concatenating the outputs of successive :meth:`decode_chunk`
    calls equals ``WanVAECodec.decode`` of the concatenated latents to fp32 rounding: the convolutions run on inputs
    of other lengths (``frames_per_call``) or layouts (channels-last), and oneDNN picks kernels by shape, thread
    count and CPU, so not bit for bit in general (seen: 3e-6 on AMD EPYC). The first latent frame yields 1 pixel
    frame, every later one ``temporal_stride`` frames.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Start a new stream (empty caches)."""
        # Slots hold the last frames of each causal conv's input (or diffusers' "Rep" marker), filled in call order.
        self._feat_cache: list[Any] = [None] * self.codec._num_decoder_convs
        self._frames_decoded = 0
        self._batch_size: int | None = None

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, f, C, h, w)`` → pixel frames ``(B, t, 3, H, W)`` in [-1, 1].

        ``t = 1 + s (f - 1)`` for the stream's first chunk and ``s f`` afterwards (``s`` = temporal stride).
        """
        codec, vae = self.codec, self.codec.vae
        if self._batch_size is not None and latents.shape[0] != self._batch_size:
            raise ValueError(f"decode_chunk: batch size changed from {self._batch_size} to {latents.shape[0]}")
        self._batch_size = latents.shape[0]
        z = codec._denormalise(latents)  # (B, C, f, h, w) in the VAE's dtype
        # post_quant_conv is a 1x1x1 causal conv (no temporal context), so applying it per chunk is exact.
        x = vae.post_quant_conv(z)
        if codec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        frames, i, f = [], 0, x.shape[2]
        while i < f:
            # The stream's first latent frame goes alone: with empty caches the decoder skips its temporal
            # upsampling convs (1 pixel frame, diffusers' "Rep" slots). Later frames may go several per call: every
            # causal conv pads from its cache and keeps the last 2 input frames, whatever the call's length.
            first = self._frames_decoded == 0
            n = 1 if first else min(codec.frames_per_call, f - i)
            frames.append(
                vae.decoder(
                    x[:, :, i : i + n],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],  # slot cursor, restarted for every call as in diffusers' _decode
                    first_chunk=first,
                )
            )
            self._frames_decoded += n
            i += n
        return codec._finish_decode(frames[0] if len(frames) == 1 else torch.cat(frames, dim=2))


class WanVAECodec(RecordsInitArgs):
    """Wan2.1 VAE as a ``sfvideo.nn.interfaces.VideoCodec`` (frozen; latents normalised per channel).

    Args:
        vae: a diffusers ``AutoencoderKLWan``, a folder holding one (``vae/`` subfolder of a diffusers Wan folder
            or the VAE folder itself), or a hub id (downloads; ``subfolder="vae"``).
        dtype: weight dtype (frozen, no fp32 master). ``"auto"``: bf16 on CUDA (what Self Forcing uses), fp32
            elsewhere. None keeps an instance's dtype and loads files in fp32.
        device: where the VAE runs; inputs are moved there.
        channels_last: decoder convolutions and their input in channels-last layout (NDHWC). None: on for CUDA
            (cuDNN's bf16 convolutions prefer it; not measured on a GPU yet), off elsewhere (no gain in fp32 on
            CPU; with bf16 on a CPU with AMX it pays, see docs/benchmarks.md).
        frames_per_call: latent frames per decoder call in streaming decode (after a stream's first frame, which
            always goes alone); None = 1, the whole chunk = a large number. Several per call means fewer, larger
            kernel launches but more activation memory; on CPU it measured 10-30% slower (docs/benchmarks.md),
            on a GPU it is not measured yet.

    Normalisation (Wan's): ``encode`` returns ``(mu - latents_mean) / latents_std`` with the VAE posterior mean
    ``mu``; ``decode`` inverts it. Both statistics are per-channel lists in the VAE config.
    """

    def __init__(
        self,
        vae: str | os.PathLike | nn.Module,
        *,
        dtype: torch.dtype | str | None = "auto",
        device: str | torch.device = "cpu",
        channels_last: bool | None = None,
        frames_per_call: int | None = None,
    ) -> None:
        on_cuda = torch.device(device).type == "cuda"
        if dtype == "auto":
            dtype = torch.bfloat16 if on_cuda else torch.float32
        dtype = parse_dtype(dtype)
        if frames_per_call is not None and frames_per_call <= 0:
            raise ValueError(f"WanVAECodec: frames_per_call must be positive, got {frames_per_call}")
        load_kwargs = {} if dtype is None else {"torch_dtype": dtype}
        if isinstance(vae, nn.Module):
            model = vae
        else:
            from diffusers import AutoencoderKLWan

            path = Path(vae)
            if path.is_dir():
                folder = path / "vae" if (path / "vae" / "config.json").exists() else path
                model = AutoencoderKLWan.from_pretrained(str(folder), **load_kwargs)
            elif path.exists():
                raise ValueError(f"WanVAECodec: {path} is a file; expected a diffusers VAE folder")
            else:
                model = AutoencoderKLWan.from_pretrained(str(vae), subfolder="vae", **load_kwargs)
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model.to(dtype)
        self.vae = freeze(model).to(device)
        self.channels_last = on_cuda if channels_last is None else channels_last
        """Decode in channels-last layout (decoder conv weights converted once, here)."""
        if self.channels_last:
            for m in [self.vae.post_quant_conv, *self.vae.decoder.modules()]:
                if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                    m.to(memory_format=torch.channels_last_3d if isinstance(m, nn.Conv3d) else torch.channels_last)
        self.frames_per_call = frames_per_call or 1
        """Latent frames per decoder call after a stream's first frame (at most)."""
        self._num_decoder_convs = _count_causal_convs(self.vae.decoder)
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        """Latent channels (16 for Wan2.1)."""
        # One spatial /2 per encoder stage after the first, times the optional pixel-unshuffle patch (Wan2.2).
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1) * int(cfg.get("patch_size") or 1)
        """Pixel size / latent size along H and W (8 for Wan2.1)."""
        self.temporal_stride = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"WanVAECodec: latents_mean/latents_std have {mean.numel()}/{std.numel()} entries, "
                f"z_dim is {self.latent_channels}"
            )
        # (1, C, 1, 1, 1): broadcast over diffusers' (B, C, T, H, W). Kept per device: a blocking host-to-device
        # copy per call makes the host wait for the GPU's queued work (a stall per chunk).
        self._stats_cpu = (mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1))
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents_mean, latents_std)`` as fp32 ``(1, C, 1, 1, 1)`` on ``device`` (moved once per device)."""
        if device not in self._stats_on:
            self._stats_on[device] = tuple(t.to(device) for t in self._stats_cpu)
        return self._stats_on[device]

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Pixel frames a full decode of ``num_latent_frames`` yields: ``1 + s (F - 1)`` (Wan: s = 4, 21 → 81)."""
        if num_latent_frames <= 0:
            raise ValueError(f"num_latent_frames must be positive, got {num_latent_frames}")
        return 1 + self.temporal_stride * (num_latent_frames - 1)

    def num_latent_frames(self, num_pixel_frames: int) -> int:
        """Inverse of :meth:`num_pixel_frames`; raises unless ``T = 1 + s k``."""
        if num_pixel_frames <= 0 or (num_pixel_frames - 1) % self.temporal_stride:
            raise ValueError(f"a Wan VAE video needs 1 + {self.temporal_stride}k frames, got {num_pixel_frames}")
        return 1 + (num_pixel_frames - 1) // self.temporal_stride

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] → normalised latents ``(B, F, C, h, w)`` in fp32, ``F = 1 + (T-1)/s``."""
        if video.ndim != 5:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got shape {tuple(video.shape)}")
        _, t, _, h, w = video.shape
        self.num_latent_frames(t)  # validates T
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video size {h}x{w} is not divisible by the VAE stride {self.spatial_stride}")
        x = video.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        mu = self.vae.encode(x).latent_dist.mode()  # (B, C, F, h, w): posterior mean, as Wan encodes
        mean, std = self._stats(mu.device)
        z = (mu.float() - mean) / std
        return z.permute(0, 2, 1, 3, 4).contiguous()  # (B, F, C, h, w)

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Our ``(B, F, C, h, w)`` normalised latents → the VAE's ``(B, C, F, h, w)`` raw latents, VAE dtype."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents (B, F, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(device=self.device, dtype=torch.float32).permute(0, 2, 1, 3, 4)
        mean, std = self._stats(z.device)
        return (z * std + mean).to(self.dtype)

    def _finish_decode(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, 3', T, H', W')`` → ``(B, T, 3, H, W)`` clamped to [-1, 1] (diffusers' order)."""
        patch = self.vae.config.get("patch_size")
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch)
        # in place: ``out`` is the decoder's fresh output (or a fresh concatenation of several)
        return out.clamp_(-1.0, 1.0).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, F, C, h, w)`` → ``(B, T, 3, H, W)`` in [-1, 1], ``T = num_pixel_frames(F)``."""
        out = self.vae.decode(self._denormalise(latents)).sample  # (B, 3, T, H, W), already clamped
        return out.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> WanVAEStreamDecoder:
        """A fresh streaming decoder (empty causal cache)."""
        return WanVAEStreamDecoder(self)
