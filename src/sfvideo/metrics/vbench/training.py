"""VBench during training: what ``SampleEvaluator`` (``sfvideo.training.callbacks``) calls every N generator steps
on its fixed prompt set, and animated sample videos for TensorBoard.

TensorBoard's own ``add_video`` needs ``moviepy.editor``, which moviepy 2 removed (and logs nothing without it), so
sample videos are written as animated GIF images (Pillow), which TensorBoard's image dashboard plays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from sfvideo.metrics.vbench.metric import VBenchMetric
from sfvideo.metrics.vbench.models import VBenchModelPaths, VBenchModels
from sfvideo.video import DEFAULT_FPS, to_uint8


def gif_bytes(video: torch.Tensor, fps: float = DEFAULT_FPS, max_side: int | None = None) -> bytes:
    """``(T, 3, H, W)`` in [-1, 1] -> an animated GIF (looping, ``1000 / fps`` ms a frame), downscaled so the longer
    side is at most ``max_side`` (None: full size)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in to_uint8(video)]
    if max_side is not None and max(frames[0].size) > max_side:
        s = max_side / max(frames[0].size)
        size = (max(1, round(frames[0].width * s)), max(1, round(frames[0].height * s)))
        frames = [f.resize(size, Image.BILINEAR) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def log_sample_videos(trainer: Any, video: torch.Tensor, *, fps: float = DEFAULT_FPS,
                      tag: str = "samples/video", max_side: int = 256) -> int:
    """Log each video of ``(B, T, 3, H, W)`` as an animated GIF (longer side at most ``max_side`` px, so Wan-size
    samples stay a few MB in the event file) to every TensorBoard logger of ``trainer``, tags ``<tag>_<i>`` in
    prompt order (``prompts.txt`` next to the mp4s names them). Returns how many loggers received them."""
    from PIL import Image as PILImage
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = []
    for i, clip in enumerate(video):
        gif = gif_bytes(clip, fps, max_side)
        w, h = PILImage.open(io.BytesIO(gif)).size
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
        values.append(Summary.Value(tag=f"{tag}_{i:02d}", image=image))
    sent = 0
    for logger in trainer.loggers:
        writer = getattr(getattr(logger, "experiment", None), "_get_file_writer", None)
        if writer is None:  # not a torch SummaryWriter
            continue
        writer().add_summary(Summary(value=values), trainer.global_step)
        sent += 1
    return sent


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of ``VBenchMetric.compute()``: ``vbench/<dimension>``, complete aggregates
    (``vbench/quality`` ...), ``vbench_long/<dimension>``, ``vbench_drift/<dimension>`` (last minus first clip) and
    ``vbench_coherence/<features>_gap<g>``."""
    out: dict[str, float] = {}
    for d, v in result["dimensions"].items():
        if v is not None:
            out[f"vbench/{d}"] = v
    for k, a in result["aggregate"].items():
        if a["value"] is not None:
            out[f"vbench/{k}"] = a["value"]
    for d, v in result["long"].items():
        if v is not None:
            out[f"vbench_long/{d}"] = v
    for d, dr in result["drift"].items():
        if dr.get("last_minus_first") is not None:
            out[f"vbench_drift/{d}"] = dr["last_minus_first"]
    for kind, c in result["coherence"].items():
        for g, v in zip(c["gap"], c["value"], strict=True):
            out[f"vbench_coherence/{kind}_gap{g}"] = v
    return out


class VBenchSampleLogger:
    """Loads the models once (at the first call) and scores each evaluation's videos with a fresh
    ``VBenchMetric`` state.

    ``SampleEvaluator`` generates on global rank 0 only, so the metric is built with ``sync_on_compute=False``
    here; across ranks (each scoring its share) the same metric sums its states over ranks in ``compute()``.

    Args:
        paths: the model files (``VBenchModelPaths``); absent ones make their dimensions missing.
        dimensions: subset of the supported dimensions (default all).
        fps: frame rate of the decoded samples.
        horizon_frames: training horizon in frames, for the within/beyond drift split.
    """

    def __init__(self, paths: VBenchModelPaths, *, dimensions: Sequence[str] | None = None, fps: float = DEFAULT_FPS,
                 horizon_frames: int | None = None) -> None:
        self.paths = paths
        self.dimensions = tuple(dimensions) if dimensions else None
        self.fps = fps
        self.horizon_frames = horizon_frames
        self._models: VBenchModels | None = None
        self.last_result: dict[str, Any] | None = None

    def models(self, device: torch.device | str = "cpu") -> VBenchModels:
        if self._models is None:
            self._models = VBenchModels.load(self.paths, dimensions=self.dimensions, device=device)
        return self._models

    def __call__(self, trainer: Any, video: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, float]:
        """Score ``video (B, T, 3, H, W)`` in [-1, 1], log the scalars to every logger, return them."""
        metric = VBenchMetric(self.models(device), fps=self.fps, max_frames=max(3, video.shape[1]),
                              horizon_frames=self.horizon_frames, sync_on_compute=False)
        metric.update(video)
        self.last_result = metric.compute()
        values = scalars(self.last_result)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        return values
