"""Scoring generated videos (the toy world's exact metrics); sampling itself is ``sfvideo.inference``.

- :func:`score_toy_videos`: the toy world's exact metrics (``sfvideo.metrics.toy``) plus the feature-space
  distance to real videos (``sfvideo.toy.features``), for one set of generated videos. It is the evaluation
  callback's ``scorer`` in ``configs/toy/dmd.yaml`` and the demo's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def score_toy_videos(
    videos: torch.Tensor,
    prompts: Sequence[str],
    *,
    world: Any = None,
    reference: torch.Tensor | None = None,
    features: Any = None,
) -> dict[str, Any]:
    """Toy-world metrics of ``videos (B, T, 3, H, W)`` in [-1, 1]; with ``reference`` real videos, also the
    feature-space Fréchet distance ratio to real-vs-real (see ``sfvideo.toy.features``)."""
    from sfvideo.metrics.toy import ToyVideoMetrics

    metric = ToyVideoMetrics(world=world) if world is not None else ToyVideoMetrics()
    metric.update(videos.float().cpu(), list(prompts))
    scores = {k: v for k, v in metric.compute().items()}
    if reference is not None and features is not None:
        scores.update(features(videos.float().cpu(), reference.float().cpu()))
    return scores
