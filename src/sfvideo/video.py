"""Writing videos: an appending mp4 writer (PyAV) that never leaves a half-written file, and PNG contact sheets.

Pixel videos follow the codec protocol (``sfvideo.nn.interfaces``): ``(T, 3, H, W)`` (or ``(B, T, 3, H, W)``) in
[-1, 1]. They become 8-bit RGB by ``round((x + 1) * 127.5)``.

Crash safety of :class:`Mp4Writer`: frames are encoded into a hidden temporary file next to the target
(``sfvideo.files.AtomicFile``). Closing (also on ``KeyboardInterrupt`` when used as a context manager) flushes the
encoder, finalises the container and renames it onto the target in one ``os.replace``, so the target is
either absent, the previous file, or a complete, playable mp4. Any other exception discards the temporary.

PNG contact sheets are encoded by Pillow (a dependency of diffusers).
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import Tensor

from sfvideo.files import AtomicFile

DEFAULT_FPS = 16
"""Wan2.1's frame rate (81 frames = 5 s)."""


def to_uint8(video: Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> ``(..., H, W, 3)`` uint8 (a NumPy array on the CPU)."""
    if video.ndim < 3 or video.shape[-3] != 3:
        raise ValueError(f"expected a video (..., 3, H, W), got shape {tuple(video.shape)}")
    x = video.detach().to(torch.float32).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def pick_codec(preferred: str | None = None) -> str:
    """The encoder to use: ``preferred`` if given and available, else libx264 (H.264), else mpeg4."""
    import av

    available = av.codecs_available
    if preferred is not None:
        if preferred not in available:
            raise ValueError(f"video codec {preferred!r} is not available in this PyAV/FFmpeg build")
        return preferred
    for name in ("libx264", "h264", "mpeg4"):
        if name in available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # a decoder-only entry (h264 without an encoder)
                continue
            return name
    raise RuntimeError("no mp4 video encoder (libx264 or mpeg4) in this PyAV/FFmpeg build")


class Mp4Writer:
    """Appends frames to an mp4 as they come; the file appears under ``path`` only when finalised.

    Use as a context manager::

        with Mp4Writer("out.mp4", fps=16) as w:
            for chunk in chunks:
                w.write(chunk)   # (T, 3, H, W) in [-1, 1]

    On normal exit and on ``KeyboardInterrupt`` the frames written so far become a valid mp4 at ``path``; on any
    other exception nothing is left (the temporary file is removed, a previous ``path`` is untouched).

    Args:
        path: Target file (``.mp4``).
        fps: Frame rate.
        codec: Encoder name (default: libx264, else mpeg4).
        quality: libx264 CRF (lower = better; 18 is visually lossless) or mpeg4 qscale-like bitrate hint.
    """

    def __init__(self, path: str | os.PathLike, *, fps: int = DEFAULT_FPS, codec: str | None = None,
                 quality: int = 18) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.codec = pick_codec(codec)
        self.quality = quality
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self._closed = True  # until the temporary is open (nothing to clean up before)
        import av

        # Open now, so an unwritable target fails before any expensive work (PyAV opens the file lazily, so the
        # temporary is created first and the error names the target).
        try:
            self._file = AtomicFile(self.path)
        except OSError as e:
            raise OSError(f"cannot write video {self.path}: {e}") from None
        try:
            self._container = av.open(str(self._file.tmp), mode="w", format="mp4")
        except (OSError, av.FFmpegError) as e:
            self._file.discard()
            raise OSError(f"cannot write video {self.path}: {e}") from None
        self._closed = False

    # -------------------------------------------------------------- writing
    def _open_stream(self, height: int, width: int) -> None:
        stream = self._container.add_stream(self.codec, rate=self.fps)
        # yuv420p subsamples chroma 2x2: the frame size must be even (odd sizes are edge-padded in write()).
        stream.width = width + width % 2
        stream.height = height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, self.fps)
        if self.codec == "libx264":
            stream.options = {"crf": str(self.quality), "preset": "veryfast"}
        else:
            stream.bit_rate = max(400_000, 8 * stream.width * stream.height * self.fps // 4)
        self._stream = stream
        self._size = (height, width)

    def write(self, frames: Tensor | np.ndarray) -> None:
        """Append frames: a tensor ``(T, 3, H, W)`` in [-1, 1] or a uint8 array ``(T, H, W, 3)``."""
        import av

        if self._closed:
            raise RuntimeError(f"Mp4Writer for {self.path} is closed")
        arr = to_uint8(frames) if isinstance(frames, Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected frames (T, H, W, 3) uint8 or (T, 3, H, W) float, got {arr.shape} {arr.dtype}")
        h, w = arr.shape[1:3]
        if self._stream is None:
            self._open_stream(h, w)
        elif (h, w) != self._size:
            raise ValueError(f"frame size {h}x{w} differs from the video's {self._size[0]}x{self._size[1]}")
        if h % 2 or w % 2:
            arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for img in arr:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    # -------------------------------------------------------------- finishing
    def close(self) -> Path | None:
        """Flush, finalise and rename onto ``path``. Returns the path, or None when no frame was written."""
        if self._closed:
            return self.path if self.path.exists() and self.frames_written else None
        self._closed = True
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
            self._container.close()
        except BaseException:
            self._discard()
            raise
        if self.frames_written == 0:
            # An mp4 without a video stream is not a video: leave nothing.
            self._discard()
            return None
        return self._file.commit()

    def abort(self) -> None:
        """Discard everything written (the target is left as it was)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except Exception:
            pass
        self._discard()

    def _discard(self) -> None:
        self._file.discard()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # never leave the temporary behind on garbage collection
        if not getattr(self, "_closed", True):
            self.abort()


def write_mp4(path: str | os.PathLike, video: Tensor, *, fps: int = DEFAULT_FPS, codec: str | None = None) -> Path:
    """Write a whole video ``(T, 3, H, W)`` in [-1, 1] at once."""
    with Mp4Writer(path, fps=fps, codec=codec) as w:
        w.write(video)
    return Path(path)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file: ``(T, H, W, 3)`` uint8 (for tests and checks)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frame")
    return np.stack(frames)


# ------------------------------------------------------------------ PNG
def encode_png(image: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 -> PNG bytes (8-bit RGB, Pillow's encoder)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"encode_png expects (H, W, 3) uint8, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``(H, W, 3)`` uint8 as PNG (never half-written)."""
    data = encode_png(image)
    with AtomicFile(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def contact_sheet(video: Tensor, *, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Frames over time in a grid: ``(H', W', 3)`` uint8.

    ``min(columns, T)`` frames evenly spaced in time (first and last included) from left to right; one row per
    video of a batch ``(B, T, 3, H, W)``, a single row for ``(T, 3, H, W)``. Tiles are separated by ``pad`` white
    pixels.
    """
    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"contact_sheet expects (T, 3, H, W) or (B, T, 3, H, W), got {tuple(video.shape)}")
    b, t, _, h, w = video.shape
    n = max(1, min(columns, t))
    idx = torch.linspace(0, t - 1, n).round().long()
    tiles = to_uint8(video[:, idx])  # (B, n, H, W, 3)
    sheet = np.full((b * h + (b + 1) * pad, n * w + (n + 1) * pad, 3), 255, np.uint8)
    for r in range(b):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y : y + h, x : x + w] = tiles[r, c]
    return sheet


def save_contact_sheet(path: str | os.PathLike, video: Tensor, *, columns: int = 8) -> Path:
    """:func:`contact_sheet` written as PNG."""
    return write_png(path, contact_sheet(video, columns=columns))
