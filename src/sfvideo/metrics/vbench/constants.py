"""VBench's dimension list, normalisation constants and weights, and the Total / Quality / Semantic aggregate.

All numbers are VBench's ``scripts/constant.py`` (``NORMALIZE_DIC``, ``DIM_WEIGHT``, ``QUALITY_WEIGHT``,
``SEMANTIC_WEIGHT``, ``QUALITY_LIST``, ``SEMANTIC_LIST``) and the arithmetic is ``scripts/cal_final_score.py``
(github.com/Vchitect/VBench, read at commit 45e79ec). One deliberate difference: ``cal_final_score.py`` fills a
missing dimension with 0 and still prints a Total; here an aggregate is computed only when every dimension it needs
is present, otherwise it is reported as ``partial`` with the missing dimensions listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

QUALITY_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
"""``QUALITY_LIST`` (VBench's order)."""
SEMANTIC_DIMENSIONS: tuple[str, ...] = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
"""``SEMANTIC_LIST``. None of them is computed by sfvideo (their models are detectors, captioners and video-text
models that no maintained library ships in VBench's exact form; see docs/evaluation.md)."""
ALL_DIMENSIONS: tuple[str, ...] = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS

NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
"""``NORMALIZE_DIC``: (Min, Max) of the min-max normalisation (no clipping, as in VBench)."""
DIM_WEIGHT: dict[str, float] = {d: 1.0 for d in ALL_DIMENSIONS} | {"dynamic_degree": 0.5}
"""``DIM_WEIGHT``: every dimension 1, dynamic degree 0.5."""
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0


@dataclass(frozen=True)
class Aggregate:
    """One aggregate score: its value when complete, else the dimensions it lacks."""

    name: str
    value: float | None
    missing: tuple[str, ...]

    @property
    def status(self) -> str:
        return "complete" if self.value is not None else "partial"

    def as_dict(self) -> dict[str, object]:
        return {"value": self.value, "status": self.status, "missing": list(self.missing)}


def normalized(dimension: str, raw: float) -> float:
    """``(raw - Min) / (Max - Min) * DIM_WEIGHT`` (``get_nomalized_score``)."""
    lo, hi = NORMALIZE[dimension]
    return (raw - lo) / (hi - lo) * DIM_WEIGHT[dimension]


def _group(dimensions: tuple[str, ...], scores: Mapping[str, float | None]) -> tuple[float | None, tuple[str, ...]]:
    missing = tuple(d for d in dimensions if scores.get(d) is None)
    if missing:
        return None, missing
    # get_quality_score / get_semantic_score: sum of weighted normalised scores over the sum of weights.
    return sum(normalized(d, float(scores[d])) for d in dimensions) / sum(DIM_WEIGHT[d] for d in dimensions), ()


def aggregate(scores: Mapping[str, float | None]) -> dict[str, Aggregate]:
    """Quality, Semantic and Total from raw dataset-level dimension scores (absent or None = missing).

    ``Total = (QUALITY_WEIGHT * Quality + SEMANTIC_WEIGHT * Semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)``
    (``get_final_score``); each is ``partial`` (value None) unless every dimension it needs is present.
    """
    q, q_missing = _group(QUALITY_DIMENSIONS, scores)
    s, s_missing = _group(SEMANTIC_DIMENSIONS, scores)
    total = None
    if q is not None and s is not None:
        total = (q * QUALITY_WEIGHT + s * SEMANTIC_WEIGHT) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {
        "quality": Aggregate("quality", q, q_missing),
        "semantic": Aggregate("semantic", s, s_missing),
        "total": Aggregate("total", total, q_missing + s_missing),
    }
