"""``VBenchMetric``: the VBench quality dimensions, their per-frame and per-clip curves and the coherence curve as
one torchmetrics ``Metric``. Every state is a sum (``dist_reduce_fx="sum"``), so ``compute()`` on several ranks
gives the score of all their videos together; the ``sfvideo evaluate`` command and the training callback both
accumulate through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from sfvideo.metrics.vbench.constants import SEMANTIC_DIMENSIONS, aggregate
from sfvideo.metrics.vbench.models import VBenchModels
from sfvideo.metrics.vbench.score import CLIP_SECONDS, COHERENCE_FEATURES, DEFAULT_GAPS, VideoScorer, VideoScores

SEMANTIC_MISSING = (
    "not computed by sfvideo: VBench's semantic dimensions need GRiT (detectron2), UMT, Tag2Text and ViCLIP with "
    "VBench's vendored code and the official prompt suite's auxiliary info"
)


def as_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``(T, 3, H, W)`` uint8 from uint8 as is, or from a float video in [-1, 1] by ``round((x + 1) * 127.5)`` (the
    mp4 writer's conversion, ``sfvideo.video.to_uint8``)."""
    if video.dtype == torch.uint8:
        return video
    return video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def drift_summary(values: Sequence[float], step_seconds: float) -> dict[str, float | None]:
    """Least-squares slope of a per-clip curve (per clip and per second) and its last minus first clip."""
    y = [v for v in values if v is not None and not math.isnan(v)]
    if len(y) < 2:
        return {"slope_per_clip": None, "slope_per_second": None, "last_minus_first": None}
    n = len(y)
    xm, ym = (n - 1) / 2, sum(y) / n
    slope = sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sum((i - xm) ** 2 for i in range(n))
    return {"slope_per_clip": slope, "slope_per_second": slope / step_seconds, "last_minus_first": y[-1] - y[0]}


class VBenchMetric(Metric):
    """VBench quality dimensions of generated videos, with curves over time.

    ``update(videos)`` takes a batch ``(B, T, 3, H, W)`` (uint8, or float in [-1, 1]) at frame rate ``fps``;
    ``update(scores=[...])`` adds already scored videos (``VideoScorer.score``). ``compute()`` returns a dict:

    - ``dimensions``: dataset score per dimension (None when no video was scored for it);
    - ``missing``: dimension -> reason for every requested dimension without a model (and the semantic ones);
    - ``aggregate``: VBench Quality / Semantic / Total (``constants.aggregate``: partial unless complete);
    - ``long``: VBench-Long score per dimension (mean over videos of the mean over clips);
    - ``per_frame``: per dimension ``{"frame": [...], "value": [...]}`` mean over videos per frame index;
    - ``per_clip``: per dimension ``{"start_s": [...], "value": [...]}`` mean over videos per clip index;
    - ``drift``: per dimension slope and last-minus-first of the per-clip curve, and with ``horizon_frames`` the
      per-frame mean beyond minus within the training horizon;
    - ``coherence``: per feature space ``{"gap": [...], "value": [...]}`` mean cosine at each frame gap.

    Args:
        models: loaded models (``VBenchModels.load``); their ``missing`` dimensions are reported, not computed.
        fps: frame rate of the videos given to ``update``.
        max_frames: length of the per-frame curves (longer videos are scored whole, their curves truncated).
        clip_seconds: VBench-Long clip length.
        gaps: frame gaps of the coherence curve.
        horizon_frames: the training horizon in frames, for the within/beyond drift split (None: no split).
        imaging_mode: VBench's imaging quality preprocessing mode.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, models: VBenchModels, *, fps: float, max_frames: int, clip_seconds: float = CLIP_SECONDS,
                 gaps: Sequence[int] = DEFAULT_GAPS, horizon_frames: int | None = None, imaging_mode: str = "longer",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if fps <= 0 or max_frames < 3:
            raise ValueError(f"VBenchMetric needs fps > 0 and max_frames >= 3, got fps={fps}, max_frames={max_frames}")
        self.scorer = VideoScorer(models, gaps=tuple(gaps), clip_seconds=clip_seconds, imaging_mode=imaging_mode)
        self.models = models
        self.fps = float(fps)
        self.max_frames = int(max_frames)
        self.clip_seconds = clip_seconds
        self.clip_frames = int(int(fps) * clip_seconds)
        self.max_clips = max(1, math.ceil(max_frames / max(1, self.clip_frames)))
        self.gaps = list(gaps)
        self.horizon_frames = horizon_frames
        self.skipped: dict[str, str] = {}  # dimension -> a reason some video could not be scored (not a state)
        f64 = torch.float64

        def add(name: str, shape: tuple[int, ...] = ()) -> None:
            self.add_state(name, default=torch.zeros(shape, dtype=f64), dist_reduce_fx="sum")

        add("videos")
        for d in self.dims:
            add(f"{d}_total")
            add(f"{d}_count")
            add(f"{d}_frame_sum", (self.max_frames,))
            add(f"{d}_frame_count", (self.max_frames,))
            add(f"{d}_clip_sum", (self.max_clips,))
            add(f"{d}_clip_count", (self.max_clips,))
            add(f"{d}_long_sum")
            add(f"{d}_long_count")
        for k in COHERENCE_FEATURES:
            add(f"coherence_{k}_sum", (len(self.gaps),))
            add(f"coherence_{k}_count", (len(self.gaps),))

    @property
    def dims(self) -> tuple[str, ...]:
        return self.models.available

    def update(self, videos: torch.Tensor | None = None, *, scores: Sequence[VideoScores] | None = None) -> None:
        batch: list[VideoScores] = list(scores or [])
        if videos is not None:
            if videos.ndim != 5 or videos.shape[2] != 3:
                raise ValueError(f"expected videos (B, T, 3, H, W), got {tuple(videos.shape)}")
            batch += [self.scorer.score(as_uint8_frames(v).cpu(), self.fps) for v in videos]
        for vs in batch:
            self._add(vs)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.skipped = {}

    def _add(self, vs: VideoScores) -> None:
        self.videos += 1
        for d, why in vs.skipped.items():
            self.skipped.setdefault(d, f"{vs.name or 'a video'}: {why}")
        for d, s in vs.dimensions.items():
            if d not in self.dims:
                continue
            getattr(self, f"{d}_total").add_(s.total)
            getattr(self, f"{d}_count").add_(s.count)
            fr = torch.tensor(s.frames, dtype=torch.long)
            keep = fr < self.max_frames
            vals = torch.tensor(s.curve, dtype=torch.float64)
            getattr(self, f"{d}_frame_sum").index_add_(0, fr[keep].to(self.device), vals[keep].to(self.device))
            getattr(self, f"{d}_frame_count").index_add_(0, fr[keep].to(self.device),
                                                         torch.ones_like(vals[keep]).to(self.device))
            segs = torch.tensor(s.segments[: self.max_clips], dtype=torch.float64, device=self.device)
            getattr(self, f"{d}_clip_sum")[: segs.numel()] += segs
            getattr(self, f"{d}_clip_count")[: segs.numel()] += 1
            if s.segments:
                getattr(self, f"{d}_long_sum").add_(sum(s.segments) / len(s.segments))
                getattr(self, f"{d}_long_count").add_(1)
        for k, per_gap in vs.coherence.items():
            if k in COHERENCE_FEATURES and list(vs.gaps) == self.gaps:
                getattr(self, f"coherence_{k}_sum").add_(torch.tensor([t for t, _ in per_gap], dtype=torch.float64,
                                                                      device=self.device))
                getattr(self, f"coherence_{k}_count").add_(torch.tensor([n for _, n in per_gap], dtype=torch.float64,
                                                                        device=self.device))

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
        return float(num / den) if float(den) > 0 else None

    def compute(self) -> dict:
        dims: dict[str, float | None] = {}
        long: dict[str, float | None] = {}
        per_frame, per_clip, drift = {}, {}, {}
        for d in self.dims:
            dims[d] = self._ratio(getattr(self, f"{d}_total"), getattr(self, f"{d}_count"))
            long[d] = self._ratio(getattr(self, f"{d}_long_sum"), getattr(self, f"{d}_long_count"))
            fs, fc = getattr(self, f"{d}_frame_sum").cpu(), getattr(self, f"{d}_frame_count").cpu()
            idx = torch.nonzero(fc > 0).flatten()
            per_frame[d] = {"frame": idx.tolist(), "time_s": (idx.double() / self.fps).tolist(),
                            "value": (fs[idx] / fc[idx]).tolist()}
            cs, cc = getattr(self, f"{d}_clip_sum").cpu(), getattr(self, f"{d}_clip_count").cpu()
            cidx = torch.nonzero(cc > 0).flatten()
            clip_values = (cs[cidx] / cc[cidx]).tolist()
            per_clip[d] = {"clip": cidx.tolist(), "start_s": (cidx.double() * self.clip_seconds).tolist(),
                           "value": clip_values}
            drift[d] = drift_summary(clip_values, self.clip_seconds)
            if self.horizon_frames is not None:
                v = torch.tensor(per_frame[d]["value"], dtype=torch.float64)
                inside = idx < self.horizon_frames
                drift[d]["beyond_minus_within_horizon"] = (
                    float(v[~inside].mean() - v[inside].mean()) if inside.any() and (~inside).any() else None)
        missing = dict(self.models.missing or {})
        missing.update({d: "no video was scored for this dimension" + (f" ({self.skipped[d]})" if d in self.skipped
                                                                         else "")
                        for d, v in dims.items() if v is None})
        missing.update({d: SEMANTIC_MISSING for d in SEMANTIC_DIMENSIONS})
        coherence = {}
        for k in COHERENCE_FEATURES:
            s, c = getattr(self, f"coherence_{k}_sum").cpu(), getattr(self, f"coherence_{k}_count").cpu()
            if float(c.sum()) > 0:
                keep = c > 0
                coherence[k] = {"gap": [g for g, m in zip(self.gaps, keep.tolist(), strict=True) if m],
                                "value": (s[keep] / c[keep]).tolist()}
        scores = {d: v for d, v in dims.items() if v is not None}
        return {
            "videos": int(self.videos),
            "skipped": dict(self.skipped),
            "fps": self.fps,
            "clip_seconds": self.clip_seconds,
            "horizon_frames": self.horizon_frames,
            "dimensions": {d: dims.get(d) for d in self.models.dimensions},
            "missing": missing,
            "aggregate": {k: a.as_dict() for k, a in aggregate(scores).items()},
            "long": long,
            "per_frame": per_frame,
            "per_clip": per_clip,
            "drift": drift,
            "coherence": coherence,
        }
