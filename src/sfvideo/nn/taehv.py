"""TAEHV, the tiny autoencoder for Wan2.1 latents (``taew2_1.pth``), with an explicit streaming decode state.

A re-implementation of madebyollin's TAEHV (github.com/madebyollin/taehv, the ``taehv.py`` there; also vendored as
``demo_utils/taehv.py`` in the official Self Forcing demo, which offers it as the fast decoder). Module names and
block indices follow that code, so its weight files load here unchanged (``encoder.N...`` / ``decoder.N...`` keys of
two ``nn.Sequential``; see :func:`taehv_state_dict_shapes` for the full layout).

Architecture (2-D convs applied to every frame; time enters only through three kinds of blocks):

* ``MemBlock``: ``relu(convs(cat[x_t, x_{t-1}]) + skip(x_t))``, where ``x_{t-1}`` is the block's *input* at the
  previous frame (zeros before the first frame). This one-frame memory is the only temporal state of the decoder.
* ``TPool`` (encoder): stacks ``stride`` consecutive frames along channels and mixes them with a 1x1 conv
  (``T -> T / stride``).
* ``TGrow`` (decoder): a 1x1 conv to ``stride`` times the channels, split into ``stride`` consecutive frames
  (``T -> T * stride``).

Wan2.1 (``taew2_1``): 16 latent channels, 8x spatial and 4x temporal stride. The decoder turns ``F`` latent frames
into ``4 F`` frames and drops the first ``4 - 1 = 3`` of the stream (upstream's ``frames_to_trim``), so a full decode
yields ``1 + 4 (F - 1)`` frames, the Wan VAE's count, and a stream yields ``1 + 4 (f - 1)`` for its first chunk and
``4 f`` for later ones. (The Self Forcing demo keeps no memory between chunks and instead re-decodes the previous
chunk's last 3 latents with each chunk, dropping 12 frames; carrying the memory makes that re-decoding unnecessary.)

Conventions (upstream's): frames are ``(N, T, 3, H, W)`` in [0, 1]; latents are ``(N, T, C, h, w)`` and are the
*normalised* latents the diffusion model sees (no ``latents_mean``/``latents_std`` is applied, unlike the Wan VAE).
:class:`TAEHVCodec` maps to sfvideo's [-1, 1] pixel range and implements ``VideoCodec``.

Streaming state: :class:`TAEHVDecodeState` holds, per ``MemBlock``, the last input frame, plus the count of frames
already produced (for the warm-up trim). :meth:`TAEHV.decode_stream` takes a state and returns the frames and a
new state; nothing is stored on the module, so one model serves any number of streams. A full decode is the same
function called once from an empty state.

Not here: the "super" decoder variant (``taew2_2_super``, ``taehv1_5_super``). Upstream's cheap-preview settings
(temporal/spatial upscaling disabled) can be expressed by :class:`TAEHVConfig` for the model, but
:class:`TAEHVCodec` requires the full decoder, whose strides match the Wan VAE's. The encoder runs over whole videos
only (no streaming encode).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfvideo.nn.interfaces import RecordsInitArgs, StreamDecoder

__all__ = [
    "TAEHV",
    "TAEHVCodec",
    "TAEHVConfig",
    "TAEHVDecodeState",
    "TAEHVStreamDecoder",
    "load_taehv",
    "taehv_state_dict_shapes",
]


@dataclass(frozen=True)
class TAEHVConfig:
    """Architecture of a TAEHV file. Defaults are the layout of ``taew2_1.pth`` (Wan2.1 latents)."""

    latent_channels: int = 16
    """Latent channels (16 for Wan2.1)."""
    image_channels: int = 3
    """Pixel channels (RGB)."""
    patch_size: int = 1
    """Pixel-(un)shuffle factor around the network (1 for Wan2.1; 2 for ``taew2_2``)."""
    encoder_width: int = 64
    """Channels of every encoder stage."""
    encoder_time_downscale: tuple[bool, ...] = (True, True, False)
    """Per encoder stage: whether its ``TPool`` halves time (two of three: 4x for Wan2.1)."""
    decoder_widths: tuple[int, ...] = (256, 128, 64, 64)
    """Channels of the three decoder stages, then of the last conv before the output conv."""
    decoder_time_upscale: tuple[bool, ...] = (False, True, True)
    """Per decoder stage: whether its ``TGrow`` doubles time."""
    decoder_space_upscale: tuple[bool, ...] = (True, True, True)
    """Per decoder stage: whether it upsamples 2x in space (nearest)."""
    mem_blocks_per_stage: int = 3
    """``MemBlock`` s per stage (3 in every released file; it sets the block indices of the keys)."""

    def __post_init__(self) -> None:
        stages = len(self.encoder_time_downscale)
        if len(self.decoder_widths) != stages + 1:
            raise ValueError(f"TAEHVConfig: decoder_widths needs {stages + 1} entries, got {self.decoder_widths}")
        if len(self.decoder_time_upscale) != stages or len(self.decoder_space_upscale) != stages:
            raise ValueError(f"TAEHVConfig: decoder_time_upscale/decoder_space_upscale need {stages} entries")
        if min(self.latent_channels, self.image_channels, self.patch_size, self.encoder_width,
               self.mem_blocks_per_stage, *self.decoder_widths) <= 0:
            raise ValueError("TAEHVConfig: channel counts, patch_size and mem_blocks_per_stage must be positive")

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> TAEHVConfig:
        """From a dict (e.g. parsed JSON: lists become tuples); unknown fields are a one-line error."""
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"TAEHVConfig: unknown fields {unknown} (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @property
    def temporal_downscale(self) -> int:
        """Frames per latent frame of the encoder (4 for Wan2.1)."""
        return 2 ** sum(map(bool, self.encoder_time_downscale))

    @property
    def temporal_upscale(self) -> int:
        """Decoder frames per latent frame (4 for Wan2.1); the first ``temporal_upscale - 1`` are dropped."""
        return 2 ** sum(map(bool, self.decoder_time_upscale))

    @property
    def spatial_stride(self) -> int:
        """Pixel size / latent size (8 for Wan2.1): one stride-2 conv per encoder stage, times the patch."""
        return 2 ** len(self.encoder_time_downscale) * self.patch_size


def _conv3x3(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: squashes latents outside about [-3, 3] before the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over the current frame and the block's previous input frame: ``relu(conv(cat) + skip)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        # Indices 0, 2, 4 carry weights (keys conv.0/2/4); 1 and 3 are the ReLUs between them.
        self.conv = nn.Sequential(
            _conv3x3(2 * n_in, n_out), nn.ReLU(inplace=True), _conv3x3(n_out, n_out), nn.ReLU(inplace=True),
            _conv3x3(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """``x``, ``past``: ``(N T, C, H, W)``, frame-aligned; ``past[t]`` is the block input at ``t - 1``."""
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Merges ``stride`` consecutive frames: ``(N T, C, H, W) -> (N T / stride, C, H, W)``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))  # frames t..t+stride-1 side by side in channels


class TGrow(nn.Module):
    """Splits every frame into ``stride`` consecutive frames: ``(N T, C, H, W) -> (N T stride, C, H, W)``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)  # output channels [s C, (s + 1) C) become sub-frame s


@dataclass(frozen=True)
class TAEHVDecodeState:
    """Temporal state of one decode stream (immutable: :meth:`TAEHV.decode_stream` returns a new one).

    ``memory[i]`` is the last input frame ``(N, C_i, H_i, W_i)`` of decoder block ``i`` when that block is a
    ``MemBlock`` that has seen a frame, else None. At 480x832 with ``taew2_1`` in fp16 this is about 67 MB.
    """

    memory: tuple[torch.Tensor | None, ...]
    """One entry per decoder block (None for blocks without memory and before the first frame)."""
    frames_out: int = 0
    """Decoder output frames produced so far, the dropped warm-up frames included."""


def _layout(blocks: nn.Sequential) -> torch.memory_format:
    """Channels-last when the convolution weights are (``TAEHVCodec(channels_last=True)``), else contiguous."""
    w = next(m.weight for m in blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _run_blocks(
    blocks: nn.Sequential, x: torch.Tensor, memory: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Apply ``blocks`` to ``x`` ``(N, T, C, H, W)``, all frames at once, continuing from ``memory``.

    Returns the output ``(N, T', C', H', W')`` and the new memory (one entry per block).

    Every block but ``MemBlock`` acts on frames independently (``TPool``/``TGrow`` regroup consecutive frames of
    the flattened ``(N T)`` axis), so the only thing a stretch of frames needs from the frames before it is each
    ``MemBlock``'s previous input frame, which ``memory`` holds (zeros at the start of a stream). Running frames
    ``[0, a)`` then ``[a, T)`` with the memory carried is therefore the same computation as running ``[0, T)``.
    """
    n = x.shape[0]
    h = x.flatten(0, 1).contiguous(memory_format=_layout(blocks))
    new_memory = list(memory)
    for i, block in enumerate(blocks):
        if isinstance(block, MemBlock):
            frames = h.unflatten(0, (n, -1))  # (N, T_i, C_i, H_i, W_i)
            prev = memory[i]
            if prev is None:
                prev = torch.zeros_like(frames[:, 0])
            elif prev.shape != frames.shape[:1] + frames.shape[2:]:
                raise ValueError(
                    f"TAEHV decode state holds frames of shape {tuple(prev.shape)} at block {i}, the input gives "
                    f"{tuple(frames.shape[:1] + frames.shape[2:])} (batch or latent size changed mid-stream)"
                )
            past = torch.cat([prev.unsqueeze(1), frames[:, :-1]], dim=1).flatten(0, 1)
            # clone: a view would keep the whole stretch's activation alive in the state
            new_memory[i] = frames[:, -1].clone()
            h = block(h, past)
        else:
            h = block(h)
    return h.unflatten(0, (n, -1)), tuple(new_memory)


class TAEHV(nn.Module):
    """The TAEHV encoder and decoder (key-compatible with madebyollin's ``taehv.py``; see the module docstring).

    Single-device; computes in the parameters' dtype on their device (inputs are not cast: :class:`TAEHVCodec`
    does that). Frames in [0, 1], ``(N, T, 3, H, W)``; latents ``(N, T, C, h, w)``.
    """

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or TAEHVConfig()
        w, k = cfg.encoder_width, cfg.mem_blocks_per_stage
        pixel_channels = cfg.image_channels * cfg.patch_size**2
        encoder: list[nn.Module] = [_conv3x3(pixel_channels, w), nn.ReLU(inplace=True)]
        for down in cfg.encoder_time_downscale:
            encoder += [TPool(w, 2 if down else 1), _conv3x3(w, w, bias=False, stride=2)]
            encoder += [MemBlock(w, w) for _ in range(k)]
        encoder.append(_conv3x3(w, cfg.latent_channels))
        self.encoder = nn.Sequential(*encoder)

        n = cfg.decoder_widths
        decoder: list[nn.Module] = [_SoftClamp(), _conv3x3(cfg.latent_channels, n[0]), nn.ReLU(inplace=True)]
        for s, (up_t, up_s) in enumerate(zip(cfg.decoder_time_upscale, cfg.decoder_space_upscale, strict=True)):
            decoder += [MemBlock(n[s], n[s]) for _ in range(k)]
            # Upsample(scale 1) in upstream when disabled: a parameter-free slot either way, so indices match.
            decoder.append(nn.Upsample(scale_factor=2) if up_s else nn.Identity())
            decoder += [TGrow(n[s], 2 if up_t else 1), _conv3x3(n[s], n[s + 1], bias=False)]
        decoder += [nn.ReLU(inplace=True), _conv3x3(n[-1], pixel_channels)]
        self.decoder = nn.Sequential(*decoder)

    @property
    def frames_to_trim(self) -> int:
        """Warm-up frames dropped at the start of every decode stream (3 for Wan2.1)."""
        return self.config.temporal_upscale - 1

    def new_decode_state(self) -> TAEHVDecodeState:
        """An empty decode state (the start of a stream)."""
        return TAEHVDecodeState(memory=(None,) * len(self.decoder))

    def decode_stream(
        self, latents: torch.Tensor, state: TAEHVDecodeState | None = None
    ) -> tuple[torch.Tensor, TAEHVDecodeState]:
        """Decode the next ``f`` latent frames of a stream.

        Args:
            latents: ``(N, f, C, h, w)`` normalised latents, in the parameters' dtype and device.
            state: the state returned by the previous call, or None to start a stream.

        Returns:
            ``(frames, new_state)``: frames ``(N, t, 3, H, W)`` in [0, 1] with ``t = u f`` (``u`` the temporal
            upscale), less the first ``u - 1`` frames of the stream; ``H, W = spatial_stride * (h, w)``.
        """
        cfg = self.config
        if latents.ndim != 5 or latents.shape[2] != cfg.latent_channels:
            raise ValueError(
                f"TAEHV.decode_stream expects latents (N, f, {cfg.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        state = state or self.new_decode_state()
        if len(state.memory) != len(self.decoder):
            raise ValueError(f"TAEHV decode state has {len(state.memory)} slots, the decoder {len(self.decoder)}")
        raw, memory = _run_blocks(self.decoder, latents, state.memory)
        frames = raw.clamp(0, 1)
        if cfg.patch_size > 1:
            frames = F.pixel_shuffle(frames.flatten(0, 1), cfg.patch_size).unflatten(0, frames.shape[:2])
        skip = max(0, self.frames_to_trim - state.frames_out)
        new_state = TAEHVDecodeState(memory=memory, frames_out=state.frames_out + raw.shape[1])
        return frames[:, skip:], new_state

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Full decode: ``(N, F, C, h, w)`` → ``(N, 1 + u (F - 1), 3, H, W)`` in [0, 1] (one stream, one call)."""
        return self.decode_stream(latents)[0]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, T, 3, H, W)`` in [0, 1] → latents ``(N, ceil(T / d), C, h, w)`` (``d`` the temporal downscale).

        As upstream's ``encode_video``: the end is padded with copies of the last frame to a multiple of ``d``
        (a Wan-style ``1 + 4k``-frame clip gives ``1 + k`` latents), all frames at once (memory grows with T).
        """
        cfg = self.config
        if frames.ndim != 5 or frames.shape[2] != cfg.image_channels:
            raise ValueError(
                f"TAEHV.encode_video expects frames (N, T, {cfg.image_channels}, H, W), got {tuple(frames.shape)}"
            )
        if cfg.patch_size > 1:
            frames = F.pixel_unshuffle(frames.flatten(0, 1), cfg.patch_size).unflatten(0, frames.shape[:2])
        pad = -frames.shape[1] % cfg.temporal_downscale
        if pad:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        return _run_blocks(self.encoder, frames, (None,) * len(self.encoder))[0]


# ----------------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------------


def taehv_state_dict_shapes(config: TAEHVConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of a TAEHV weight file for ``config`` (default: ``taew2_1.pth``, 128 tensors)."""
    with torch.device("meta"):
        model = TAEHV(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reader errors become one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read TAEHV weights {path}: {type(e).__name__}: {first}") from e


def _short(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_taehv(path: str | os.PathLike, config: TAEHVConfig | None = None) -> TAEHV:
    """Build a :class:`TAEHV` and load a weight file (``taew2_1.pth`` or its ``.safetensors`` conversion).

    Strict: a missing or unexpected key, or a shape mismatch, is a one-line ``ValueError`` naming the file.
    As upstream, a ``TGrow`` weight with more output channels than the config asks for is cut to its last rows
    (the last sub-frame's channels), which is how a file trained with temporal upscaling serves a config without.
    Weights stay in the file's dtype on the CPU; move/cast the module as needed (:class:`TAEHVCodec` does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV weights not found: {path} (supply taew2_1.pth; nothing is downloaded)")
    sd = _read_state_dict(path)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a TAEHV weight file (expected a flat state dict of tensors)")
    model = TAEHV(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(unexpected)}"] if unexpected else []
        )
        raise ValueError(f"{path}: not a TAEHV file for {model.config}: " + "; ".join(parts))
    sd = dict(sd)
    for i, block in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(block, TGrow) and sd[key].shape[0] > expected[key].shape[0]:
            sd[key] = sd[key][-expected[key].shape[0] :].clone()
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} for {model.config}"
            )
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# VideoCodec / StreamDecoder
# ----------------------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # fp16 on CUDA, as upstream's and the Self Forcing demo's TAEHV; fp32 elsewhere (CPU half convs are slow)
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    key = dtype.removeprefix("torch.")
    if key not in names:
        raise ValueError(f"TAEHVCodec: dtype must be auto, one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[key]


class TAEHVStreamDecoder(StreamDecoder):
    """Chunk-by-chunk TAEHV decode for one stream; holds that stream's :class:`TAEHVDecodeState` (not the model).

    The first chunk of ``f`` latent frames yields ``1 + 4 (f - 1)`` pixel frames, every later one ``4 f`` (Wan2.1),
    as the Wan VAE's stream decoder. Concatenated outputs equal :meth:`TAEHVCodec.decode` of the concatenated
    latents up to fp32 rounding (same operations; convolution kernels may differ with the number of frames).
    """

    def __init__(self, codec: TAEHVCodec) -> None:
        self.codec = codec
        self.state = codec.model.new_decode_state()

    def reset(self) -> None:
        """Start a new stream."""
        self.state = self.codec.model.new_decode_state()

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, f, C, h, w)`` → pixel frames ``(B, t, 3, H, W)`` in [-1, 1]."""
        frames, self.state = self.codec.decode_stream(latents, self.state)
        return frames


class TAEHVCodec(RecordsInitArgs):
    """TAEHV as a ``sfvideo.nn.interfaces.VideoCodec`` over sfvideo's conventions (pixels in [-1, 1]).

    Select it in ``sfvideo generate`` with ``--decoder sfvideo.nn.taehv.TAEHVCodec --decoder.path
    checkpoints/taew2_1.pth --decoder.device cuda`` (decode only, the run's own codec stays recorded) or as
    ``--codec``.

    Args:
        path: the weight file (``taew2_1.pth`` from github.com/madebyollin/taehv, or its ``.safetensors``); the
            user supplies it, nothing is downloaded. Give ``model`` instead to wrap an instance.
        model: a :class:`TAEHV` instance (tests, or weights loaded elsewhere).
        config: architecture of the file (default: ``taew2_1``); a mapping of :class:`TAEHVConfig` fields is
            accepted too (a JSON object on the command line).
        dtype: ``"auto"`` (fp16 on CUDA as upstream and the Self Forcing demo, fp32 elsewhere), a name or a
            ``torch.dtype``; None keeps the instance's / file's dtype.
        device: where it runs; inputs are moved there.
        frames_per_call: latent frames per decoder pass (a chunk is split into passes of at most this many;
            None: the whole chunk, or the whole video for :meth:`decode`). Bounds activation memory; the output
            is the same up to fp32 rounding.
        channels_last: weights and activations in NHWC layout. None: on for CUDA (not measured yet), off elsewhere
            (see docs/decoders.md for what it does on CPU).

    Encode is supported (upstream's, over whole videos); the latents it gives approximate the Wan VAE's, which is
    what training data should be encoded with.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        model: TAEHV | None = None,
        config: TAEHVConfig | Mapping[str, Any] | None = None,
        dtype: torch.dtype | str | None = "auto",
        device: str | torch.device = "cpu",
        frames_per_call: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if (path is None) == (model is None):
            raise ValueError("TAEHVCodec: give exactly one of path (a taew2_1.pth file) or model")
        if frames_per_call is not None and frames_per_call <= 0:
            raise ValueError(f"TAEHVCodec: frames_per_call must be positive, got {frames_per_call}")
        device = torch.device(device)
        if isinstance(config, Mapping):
            config = TAEHVConfig.from_mapping(config)
        model = load_taehv(path, config) if model is None else model
        dtype = _resolve_dtype(dtype, device)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        """Convolutions in NHWC layout (weights converted once, here; activations follow the weights)."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # every 4-D parameter is a conv weight
        self.frames_per_call = frames_per_call
        cfg = self.model.config
        if not all(cfg.decoder_space_upscale) or cfg.temporal_upscale != cfg.temporal_downscale:
            raise ValueError(
                "TAEHVCodec needs the full decoder (decoder_space_upscale all true, temporal upscale = temporal "
                f"downscale), got {cfg}"
            )
        self.latent_channels = cfg.latent_channels
        """Latent channels (16 for Wan2.1)."""
        self.spatial_stride = cfg.spatial_stride
        """Pixel size / latent size along H and W (8 for Wan2.1)."""
        self.temporal_stride = cfg.temporal_upscale
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """``1 + s (F - 1)``: the Wan VAE's count (s = 4, 21 → 81)."""
        if num_latent_frames <= 0:
            raise ValueError(f"num_latent_frames must be positive, got {num_latent_frames}")
        return 1 + self.temporal_stride * (num_latent_frames - 1)

    def num_latent_frames(self, num_pixel_frames: int) -> int:
        """Inverse of :meth:`num_pixel_frames`; raises unless ``T = 1 + s k``."""
        if num_pixel_frames <= 0 or (num_pixel_frames - 1) % self.temporal_stride:
            raise ValueError(f"a TAEHV/Wan video needs 1 + {self.temporal_stride}k frames, got {num_pixel_frames}")
        return 1 + (num_pixel_frames - 1) // self.temporal_stride

    def decode_stream(
        self, latents: torch.Tensor, state: TAEHVDecodeState | None = None
    ) -> tuple[torch.Tensor, TAEHVDecodeState]:
        """Next chunk of a stream: latents ``(B, f, C, h, w)`` → ``(frames in [-1, 1], new state)``."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents (B, F, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(device=self.device, dtype=self.dtype)
        step = self.frames_per_call or z.shape[1]
        state = state or self.model.new_decode_state()
        pieces = []
        with torch.no_grad():
            for start in range(0, z.shape[1], step):
                frames, state = self.model.decode_stream(z[:, start : start + step], state)
                pieces.append(frames)
        frames = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return frames * 2 - 1, state

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, F, C, h, w)`` → ``(B, T, 3, H, W)`` in [-1, 1], ``T = num_pixel_frames(F)``."""
        return self.decode_stream(latents)[0]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1], ``T = 1 + s k`` → latents ``(B, 1 + k, C, h, w)`` in fp32."""
        if video.ndim != 5:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got shape {tuple(video.shape)}")
        _, t, _, h, w = video.shape
        self.num_latent_frames(t)  # same frame-count contract as the Wan VAE
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video size {h}x{w} is not divisible by the TAEHV stride {self.spatial_stride}")
        x = (video.to(device=self.device, dtype=self.dtype) + 1) / 2
        return self.model.encode_video(x).float()

    def stream_decoder(self) -> TAEHVStreamDecoder:
        """A fresh streaming decoder (empty state)."""
        return TAEHVStreamDecoder(self)
