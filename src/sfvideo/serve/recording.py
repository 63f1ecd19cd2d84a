"""What a viewer has seen, as an mp4 they can download at any moment, on disk (memory stays flat).

Frames are H.264-encoded as they are streamed, into mp4 *segments* written by ``sfvideo.video.Mp4Writer`` (a
segment appears only when finalised). A download finalises the open segment and remuxes every segment into one
mp4, packet by packet without re-encoding (timestamps shifted by the frames before each segment), so asking for a
download mid-stream costs one container pass and the stream goes on into a new segment. Nothing is kept in
memory but the open encoder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np


class Recording:
    """Appending recorder of one stream; thread-safe (the stream thread writes, a download thread snapshots).

    Args:
        folder: Where the segments live (created; removed by :meth:`close`).
        fps: Frame rate of the video.
    """

    def __init__(self, folder: str | os.PathLike, *, fps: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.frames = 0
        """Frames written so far."""
        self._segments: list[tuple[Path, int]] = []  # finalised (path, frames)
        self._writer = None
        self._lock = threading.Lock()
        self._snapshot: tuple[Path, int] | None = None  # (path, frames) of the last download file
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        """Append ``(t, H, W, 3)`` uint8 frames."""
        from sfvideo.video import Mp4Writer

        if not len(frames):
            return
        with self._lock:
            if self._closed:
                return
            if self._writer is None:
                path = self.folder / f"segment-{len(self._segments):04d}.mp4"
                self._writer = Mp4Writer(path, fps=self.fps)
            self._writer.write(frames)
            self.frames += len(frames)

    def _finalise_segment(self) -> None:
        if self._writer is not None:
            n = self._writer.frames_written
            path = self._writer.close()
            if path is not None:
                self._segments.append((path, n))
            self._writer = None

    def snapshot(self) -> Path | None:
        """An mp4 of every frame written so far (None before the first frame). The stream may go on."""
        with self._lock:
            if self._closed:
                return None
            if self._snapshot is not None and self._snapshot[1] == self.frames:
                return self._snapshot[0]
            self._finalise_segment()
            if not self._segments:
                return None
            out = self.folder / "download.mp4"
            tmp = self.folder / ".download.mp4.partial"
            try:
                _concat([p for p, _ in self._segments], tmp)
                os.replace(tmp, out)  # a response still sending the previous file keeps its inode
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._snapshot = (out, self.frames)
            return out

    def close(self) -> None:
        """Discard everything (idempotent)."""
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _concat(segments: list[Path], out: Path) -> None:
    """Remux mp4 segments of one encoder configuration into one mp4, back to back (no re-encoding)."""
    import av

    with av.open(str(out), mode="w", format="mp4") as dst:
        stream = None
        offset = 0  # in the output stream's time base, pts of the first frame of the current segment
        for path in segments:
            with av.open(str(path)) as src:
                src_stream = src.streams.video[0]
                if stream is None:
                    stream = dst.add_stream_from_template(src_stream)
                end = offset
                for packet in src.demux(src_stream):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    duration = packet.duration or 0
                    packet.pts = (packet.pts if packet.pts is not None else packet.dts) + offset
                    packet.dts += offset
                    end = max(end, packet.pts + duration)
                    packet.stream = stream
                    dst.mux(packet)
                offset = end


def new_recording(root: str | os.PathLike, *, fps: int) -> Recording:
    """A recording in a fresh private folder under ``root``."""
    return Recording(tempfile.mkdtemp(prefix="stream-", dir=root), fps=fps)
