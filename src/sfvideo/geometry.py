"""Video geometry: the only place shape numbers are derived.

Canonical latent layout at every public API is ``(B, F, C, H, W)``: batch, latent frames, latent channels,
latent height, latent width. Only ``WanTransformer.forward`` permutes to Conv3d's ``(B, C, F, H, W)``.

A *chunk* (the paper's "block") is ``frames_per_chunk`` consecutive latent frames generated together:
3 for the paper's chunk-wise model, 1 for frame-wise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """Shape of the latent video a generator produces.

    Defaults are the paper's recipe for Wan2.1 at 832×480: 21 latent frames (81 pixel frames), 16 latent
    channels, a 60×104 latent grid, chunks of 3 frames.
    """

    num_frames: int = 21
    """Latent frames per training clip (the teacher's window)."""
    channels: int = 16
    """Latent channels."""
    height: int = 60
    """Latent height (pixel height / VAE spatial stride)."""
    width: int = 104
    """Latent width (pixel width / VAE spatial stride)."""
    frames_per_chunk: int = 3
    """Latent frames generated together: 3 = chunk-wise, 1 = frame-wise."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Transformer patch (t, h, w); must match the transformer config."""

    def __post_init__(self) -> None:
        for name in ("num_frames", "channels", "height", "width", "frames_per_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VideoGeometry.{name} must be positive, got {getattr(self, name)}")
        p_t, p_h, p_w = self.patch_size
        if p_t != 1:
            raise ValueError(f"VideoGeometry.patch_size: temporal patch must be 1 for frame-wise caching, got {p_t}")
        if self.height % p_h or self.width % p_w:
            raise ValueError(
                f"VideoGeometry: latent size {self.height}x{self.width} is not divisible by patch {p_h}x{p_w}"
            )
        check_chunking(self.num_frames, self.frames_per_chunk, what="VideoGeometry.num_frames")

    @property
    def tokens_per_frame(self) -> int:
        """Transformer tokens per latent frame, (H / p_h) * (W / p_w): 1560 for 60×104 with patch 2×2."""
        return (self.height // self.patch_size[1]) * (self.width // self.patch_size[2])

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.frames_per_chunk

    @property
    def seq_len(self) -> int:
        """Tokens in a whole clip: 32760 for the paper's recipe."""
        return self.num_frames * self.tokens_per_frame

    def latent_shape(self, batch_size: int, num_frames: int | None = None) -> tuple[int, int, int, int, int]:
        """``(B, F, C, H, W)`` for a clip of ``num_frames`` (default: the training clip)."""
        return (batch_size, num_frames or self.num_frames, self.channels, self.height, self.width)


def check_chunking(num_frames: int, frames_per_chunk: int, what: str = "num_frames") -> None:
    """Raise a one-line error when ``num_frames`` does not split into chunks of ``frames_per_chunk``."""
    if frames_per_chunk <= 0:
        raise ValueError(f"frames_per_chunk must be positive, got {frames_per_chunk}")
    if num_frames <= 0 or num_frames % frames_per_chunk:
        raise ValueError(
            f"{what}={num_frames} does not split into chunks of {frames_per_chunk} latent frames "
            f"(nearest valid: {max(frames_per_chunk, num_frames // frames_per_chunk * frames_per_chunk)})"
        )
