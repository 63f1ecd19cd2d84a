"""Rollouts longer than the teacher's window (notes §3.5; official ``model/base.py::SelfForcingModel._run_generator``).

The generator may roll out more frames than the bidirectional teacher was trained on (``num_training_frames`` >
21 latent frames). Then, per training step:

1. the rollout length is drawn, in whole chunks, uniformly in ``[min_frames, max_frames]`` (official: rank 0 draws
   ``randint(min_blocks, max_blocks + 1)`` and broadcasts it; here a rank-shared generator,
   :func:`sample_rollout_chunks`);
2. only chunks inside the last ``window_frames`` get gradient (``rollout.last_window_start``; official
   ``start_gradient_frame_index = num_output_frames - 21``);
3. the teacher (and critic) see the last window only, with its first latent replaced: the frames before the last
   ``window - 1`` latents are decoded to pixels, the **last decoded pixel frame** is re-encoded alone as a
   first-frame latent, and it is concatenated with the last ``window - 1`` latents (:func:`teacher_window`), so the
   clip's first latent has the statistics of a video's first frame, as the teacher expects;
4. when the rollout is longer than the minimum, the first chunk of that window is dropped from the loss
   (:func:`window_frame_mask`; official ``gradient_mask``: "we do not use gradient for the first chunk, since it
   contains image latents").

Codecs (``nn/interfaces.VideoCodec``): for the Wan VAE a one-frame video ``(B, 1, 3, H, W)`` encodes to one latent
frame, the causal encoder's first-frame path (``1 + 4k`` pixel frames -> ``1 + k`` latents with ``k = 0``); decoding
``F'`` latents gives ``1 + 4 (F' - 1)`` frames, of which the last belongs to latent ``F' - 1``. For the toy codec time
is 1:1 and encode/decode are inverse, so the re-encoded latent equals the replaced latent up to rounding.
The official ``independent_first_frame`` variant (windows of ``1 + 3k`` frames) is not covered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfvideo.nn.interfaces import VideoCodec


def sample_rollout_chunks(
    min_frames: int, max_frames: int, frames_per_chunk: int, generator: torch.Generator | None
) -> int:
    """Number of chunks of this step's rollout, uniform in ``[min_frames / f, max_frames / f]`` (inclusive).

    Always draws one integer (even when ``min == max``), so the generator's stream advances identically whatever
    the bounds. Seed ``generator`` identically on every rank (e.g. from ``(seed, step)``): every rank must issue the
    same number of forwards (FSDP/ZeRO collectives), which the official code ensures with a broadcast.

    Args:
        min_frames: Shortest rollout in latent frames (official: 21, the teacher window).
        max_frames: Longest rollout (official ``num_training_frames``).
        frames_per_chunk: f; both bounds must be multiples.
        generator: Rank-shared source (a CPU generator avoids a device sync).
    """
    f = frames_per_chunk
    if f <= 0 or min_frames % f or max_frames % f:
        raise ValueError(
            f"rollout bounds [{min_frames}, {max_frames}] must be multiples of frames_per_chunk={frames_per_chunk}"
        )
    if not 0 < min_frames <= max_frames:
        raise ValueError(f"need 0 < min_frames <= max_frames, got {min_frames}, {max_frames}")
    device = generator.device if generator is not None else "cpu"
    draw = torch.randint(min_frames // f, max_frames // f + 1, (1,), generator=generator, device=device)
    return int(draw.item())


@torch.no_grad()
def reencode_first_frame(prefix: Tensor, codec: VideoCodec) -> Tensor:
    """Latent ``(B, 1, C, h, w)`` of the last pixel frame of ``codec.decode(prefix)``, encoded alone.

    Args:
        prefix: Latents ``(B, F', C, h, w)`` whose decode ends where the window's first latent ends (official
            ``pred[:, :-(window - 1)]``); decoded whole, since a causal decoder's last frame depends on all of them.
        codec: The latent space.

    Returns:
        The re-encoded latent in ``prefix``'s dtype and device, without gradient.
    """
    pixels = codec.decode(prefix)  # (B, T, 3, H, W)
    latent = codec.encode(pixels[:, -1:])  # one frame alone: a first-frame latent
    if latent.shape[1] != 1:
        raise ValueError(f"codec encoded one pixel frame to {latent.shape[1]} latent frames, expected 1")
    return latent.to(device=prefix.device, dtype=prefix.dtype)


def teacher_window(latents: Tensor, codec: VideoCodec, window_frames: int) -> Tensor:
    """The teacher's view of a rollout: the last ``window_frames`` latents, first one re-encoded (step 3 above).

    Rollouts of at most ``window_frames`` frames are returned unchanged (the same tensor). Otherwise the result is
    ``cat([reencode_first_frame(latents[:, :F - W + 1]), latents[:, F - W + 1:]])``: the first frame carries no
    gradient, the other ``W - 1`` keep the rollout's graph.

    Args:
        latents: Rollout output ``(B, F, C, h, w)``.
        codec: The latent space (Wan VAE or the toy codec).
        window_frames: W, the teacher's clip length in latent frames (official 21).
    """
    if window_frames <= 0:
        raise ValueError(f"window_frames must be positive, got {window_frames}")
    num_frames = latents.shape[1]
    if num_frames <= window_frames:
        return latents
    keep = window_frames - 1
    first = reencode_first_frame(latents[:, : num_frames - keep].detach(), codec)
    if keep == 0:
        return first
    return torch.cat([first, latents[:, num_frames - keep :]], dim=1)


def window_frame_mask(
    num_frames: int, *, min_frames: int, window_frames: int, frames_per_chunk: int, device: torch.device | str = "cpu"
) -> Tensor | None:
    """Frames of the teacher window that enter the distribution-matching loss (step 4 above).

    Official rule: when the rollout length differs from the minimum, the first chunk of the window is masked out;
    otherwise there is no mask. Returns a ``(W',)`` bool tensor (``W' = min(num_frames, window_frames)``), usable as
    the ``mask`` of ``losses.dmd.dmd_loss`` / ``losses.sid.sid_loss``, or None.
    """
    if num_frames == min_frames:
        return None
    length = min(num_frames, window_frames)
    if frames_per_chunk >= length:
        raise ValueError(
            f"masking the first chunk ({frames_per_chunk} frames) of a {length}-frame window leaves no frame"
        )
    mask = torch.ones(length, dtype=torch.bool, device=device)
    mask[:frames_per_chunk] = False
    return mask
