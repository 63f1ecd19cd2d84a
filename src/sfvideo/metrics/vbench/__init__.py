"""VBench's quality dimensions on local model files, with per-frame / per-clip curves over time.

- ``constants``: VBench's normalisation constants, weights and the Total / Quality / Semantic aggregate.
- ``preprocess`` / ``formulas``: VBench's transforms and per-video formulas (no model inside).
- ``models``: loading DINO, CLIP, the LAION head, MUSIQ, RAFT and a frame interpolator from user-given paths.
- ``score``: one video -> every available dimension, per frame, per VBench-Long clip, coherence at frame gaps.
- ``metric``: ``VBenchMetric``, the same as a rank-synchronised torchmetrics ``Metric``.
- ``report``: markdown + JSON + PNG plots, several models side by side.
- ``training``: what the training callback calls (``log_vbench``) and GIF sample videos for TensorBoard.
"""

from sfvideo.metrics.vbench.constants import ALL_DIMENSIONS, QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS, aggregate
from sfvideo.metrics.vbench.metric import VBenchMetric
from sfvideo.metrics.vbench.models import SUPPORTED_DIMENSIONS, ModelUnavailable, VBenchModelPaths, VBenchModels
from sfvideo.metrics.vbench.score import DEFAULT_GAPS, VideoScorer, VideoScores, clip_ranges

__all__ = [
    "ALL_DIMENSIONS",
    "DEFAULT_GAPS",
    "QUALITY_DIMENSIONS",
    "SEMANTIC_DIMENSIONS",
    "SUPPORTED_DIMENSIONS",
    "ModelUnavailable",
    "VBenchMetric",
    "VBenchModelPaths",
    "VBenchModels",
    "VideoScorer",
    "VideoScores",
    "aggregate",
    "clip_ranges",
]
