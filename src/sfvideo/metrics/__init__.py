"""Evaluation metrics. ``toy``: the toy world's exact metrics (``ToyVideoMetrics``)."""

from sfvideo.metrics.toy import FRAME_METRICS, VIDEO_METRICS, ToyVideoAnalyser, ToyVideoMetrics

__all__ = ["FRAME_METRICS", "VIDEO_METRICS", "ToyVideoAnalyser", "ToyVideoMetrics"]
