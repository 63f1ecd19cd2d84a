"""Scoring one video: every available VBench quality dimension on the whole video, per frame where the dimension
is per-frame, per VBench-Long clip, and the long-horizon coherence curve.

Per-video values follow VBench exactly (see ``formulas.py``); what each contributes to the dataset score is kept
as ``(total, count)``: frame-weighted for subject and background consistency (``sum s_i / number of terms``, as
``vbench/subject_consistency.py`` and ``vbench/background_consistency.py`` compute on one process), video-weighted
(``count = 1``) for the others.

VBench-Long segmentation (``vbench2_beta_long/utils.py::split_video_into_clips``): clips of
``int(fps) * clip_seconds`` frames (2 s for every quality dimension, ``configs/clip_length_mix.yaml``); a shorter
last clip borrows frames from the previous one so every clip has the full length; a video shorter than one clip is
one clip. Each clip is scored with the unchanged per-video formula and a long video's VBench-Long score is the mean
of its clip scores (``reorganize_clips_results``). Two steps of VBench-Long are not done here: the PySceneDetect
scene split before clipping (generated single-prompt videos have no cuts) and re-encoding each clip to mp4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sfvideo.metrics.vbench import formulas as Fm
from sfvideo.metrics.vbench import preprocess as P
from sfvideo.metrics.vbench.models import VBenchModels

DEFAULT_GAPS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
"""Frame gaps of the long-horizon coherence curve (VBench issue #206 proposes 2, 5, 10, 20, 50)."""
COHERENCE_FEATURES: tuple[str, ...] = ("dino", "clip_b32")
"""Feature spaces of the coherence curve: subject consistency's DINO and background consistency's CLIP."""
CLIP_SECONDS = 2.0
"""VBench-Long clip length of every quality dimension (``configs/clip_length_mix.yaml``)."""


@dataclass
class DimensionScore:
    """One dimension on one video."""

    value: float
    """The per-video VBench value (imaging quality already divided by 100)."""
    total: float
    """Numerator contributed to the dataset score."""
    count: int
    """Denominator contributed to the dataset score (frames for the consistencies, 1 otherwise)."""
    frames: list[int] = field(default_factory=list)
    """Frame index of each per-frame value (a pair ``i -> i+1`` is placed at ``i + 1``)."""
    curve: list[float] = field(default_factory=list)
    """Per-frame values (the dimension's per-frame term; see docs/evaluation.md)."""
    segments: list[float] = field(default_factory=list)
    """VBench-Long: the per-video formula on each clip."""


@dataclass
class VideoScores:
    name: str
    num_frames: int
    fps: float
    height: int
    width: int
    clips: list[tuple[int, int]]
    dimensions: dict[str, DimensionScore]
    gaps: list[int]
    coherence: dict[str, list[tuple[float, int]]]
    """Feature space -> per gap ``(sum of cosines, number of pairs)``."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Dimension -> why it could not be computed on this video (e.g. frames too small for RAFT)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "num_frames": self.num_frames, "fps": self.fps, "height": self.height,
            "width": self.width, "clips": [list(c) for c in self.clips],
            "dimensions": {d: {"value": s.value, "segments": s.segments} for d, s in self.dimensions.items()},
            "coherence": {k: {str(g): (t / n if n else None) for g, (t, n) in zip(self.gaps, v, strict=True)}
                          for k, v in self.coherence.items()},
            "skipped": self.skipped,
        }


def clip_ranges(num_frames: int, fps: float, clip_seconds: float = CLIP_SECONDS) -> list[tuple[int, int]]:
    """VBench-Long's fixed-length clips ``[(start, end), ...]`` (see the module docstring)."""
    length = int(int(fps) * clip_seconds)
    if length <= 0:
        raise ValueError(f"clip length int(fps={fps}) * {clip_seconds} s is not positive")
    if num_frames < length:
        return [(0, num_frames)]
    full, rest = divmod(num_frames, length)
    clips = [(i * length, (i + 1) * length) for i in range(full)]
    if rest:
        clips.append((max(0, full * length - (length - rest)), num_frames))
    return clips


class VideoScorer:
    """Scores videos ``(T, 3, H, W)`` uint8 with the loaded models (``VBenchModels``).

    Args:
        models: the models; dimensions in ``models.missing`` are not computed.
        gaps: frame gaps of the coherence curve.
        clip_seconds: VBench-Long clip length.
        imaging_mode: VBench ``imaging_quality_preprocessing_mode`` (default ``longer``).
        pair_batch: frame pairs per forward of RAFT / the interpolator.
    """

    def __init__(self, models: VBenchModels, *, gaps: tuple[int, ...] = DEFAULT_GAPS,
                 clip_seconds: float = CLIP_SECONDS, imaging_mode: str = "longer", pair_batch: int = 8) -> None:
        self.models = models
        self.gaps = list(gaps)
        self.clip_seconds = clip_seconds
        self.imaging_mode = imaging_mode
        self.pair_batch = pair_batch

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.models.available

    @torch.no_grad()
    def score(self, frames: torch.Tensor, fps: float, name: str = "", dimensions: tuple[str, ...] | None = None
              ) -> VideoScores:
        """All available (or the given subset of) dimensions of one video."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (T, 3, H, W) uint8, got {tuple(frames.shape)} {frames.dtype}")
        t, _, h, w = frames.shape
        if t < 3:
            raise ValueError(f"video {name!r} has {t} frame(s); VBench's dimensions need at least 3")
        dims = [d for d in (dimensions or self.dimensions) if d in self.dimensions]
        clips = clip_ranges(t, fps, self.clip_seconds)
        out: dict[str, DimensionScore] = {}
        feats: dict[str, torch.Tensor] = {}
        for kind, dim in (("dino", "subject_consistency"), ("clip_b32", "background_consistency")):
            extractor = getattr(self.models, kind)
            if extractor is not None:  # also for the coherence curve
                feats[kind] = extractor(frames)
                if dim in dims:
                    out[dim] = self._consistency(feats[kind], clips)
        if "temporal_flickering" in dims:
            out["temporal_flickering"] = self._flicker(frames, clips)
        if "aesthetic_quality" in dims:
            e = torch.nn.functional.normalize(self.models.clip_l14(frames).float(), dim=-1, p=2)
            head = self.models.aesthetic_head
            per_frame = head(e.to(head.weight.device)).squeeze(-1).double().cpu() / 10
            out["aesthetic_quality"] = self._per_frame(per_frame, clips)
        if "imaging_quality" in dims:
            out["imaging_quality"] = self._per_frame(self._musiq(frames) / 100.0, clips)
        if "motion_smoothness" in dims:
            out["motion_smoothness"] = self._motion_smoothness(frames, clips)
        skipped: dict[str, str] = {}
        if "dynamic_degree" in dims:
            try:
                out["dynamic_degree"] = self._dynamic_degree(frames, fps, clips)
            except ValueError as e:  # torchvision's RAFT refuses frames under 128 px (its correlation pyramid)
                skipped["dynamic_degree"] = f"RAFT: {str(e).splitlines()[0][:200]}"
        coherence = {k: Fm.gap_similarity(f, self.gaps) for k, f in feats.items()}
        return VideoScores(name, t, float(fps), h, w, clips, out, self.gaps, coherence, skipped)

    # -------------------------------------------------------------- dimensions
    @staticmethod
    def _consistency(features: torch.Tensor, clips: list[tuple[int, int]]) -> DimensionScore:
        s = Fm.consistency_terms(features)
        segs = [float(Fm.consistency_terms(features[a:b]).mean()) for a, b in clips if b - a >= 2]
        return DimensionScore(float(s.mean()), float(s.sum()), int(s.numel()), list(range(1, features.shape[0])),
                              s.tolist(), segs)

    @staticmethod
    def _flicker(frames: torch.Tensor, clips: list[tuple[int, int]]) -> DimensionScore:
        value, curve = Fm.temporal_flickering(frames)
        mae = Fm.flicker_mae(frames)
        segs = [float((255.0 - mae[a : b - 1].mean()) / 255.0) for a, b in clips if b - a >= 2]
        return DimensionScore(value, value, 1, list(range(1, frames.shape[0])), curve.tolist(), segs)

    @staticmethod
    def _per_frame(per_frame: torch.Tensor, clips: list[tuple[int, int]]) -> DimensionScore:
        value = float(per_frame.mean())
        segs = [float(per_frame[a:b].mean()) for a, b in clips]
        return DimensionScore(value, value, 1, list(range(per_frame.numel())), per_frame.tolist(), segs)

    def _musiq(self, frames: torch.Tensor) -> torch.Tensor:
        x = P.musiq_transform(frames, self.imaging_mode)
        dev = self.models.device
        # One frame per call, as vbench/imaging_quality.py::technical_quality does.
        return torch.tensor([float(self.models.musiq(x[i : i + 1].to(dev))) for i in range(x.shape[0])],
                            dtype=torch.float64)

    def _motion_smoothness(self, frames: torch.Tensor, clips: list[tuple[int, int]]) -> DimensionScore:
        t = frames.shape[0]
        starts = {s for a, b in [(0, t), *clips] for s in range(a, b - 2, 2)}
        mids = self._interpolate(frames, sorted(starts))

        def score(a: int, b: int) -> tuple[float, torch.Tensor]:
            # Even frames of the clip a, a+2, ...; the interpolations stand for a+1, a+3, ...
            interp = torch.stack([mids[s] for s in range(a, b - 2, 2)])
            return Fm.motion_smoothness(frames[a:b], interp)

        value, curve = score(0, t)
        segs = [score(a, b)[0] for a, b in clips if b - a >= 3]
        return DimensionScore(value, value, 1, list(range(1, 1 + 2 * curve.numel(), 2)), curve.tolist(), segs)

    def _interpolate(self, frames: torch.Tensor, starts: list[int]) -> dict[int, torch.Tensor]:
        """AMT's call (``vbench/motion_smoothness.py::motion_score``): frames /255 as float, replicate-padded to a
        multiple of 16 (``scale_factor`` 1, VBench's value whenever memory suffices), ``embt = 0.5``; the output is
        unpadded and converted with ``tensor2img``."""
        h, w = frames.shape[-2:]
        dev = self.models.device
        embt = torch.full((1, 1, 1, 1), 0.5, device=dev)
        out: dict[int, torch.Tensor] = {}
        for i in range(0, len(starts), self.pair_batch):
            idx = starts[i : i + self.pair_batch]
            x0 = P.pad_to_multiple(frames[idx].float().div(255.0), 16).to(dev)
            x1 = P.pad_to_multiple(frames[[s + 2 for s in idx]].float().div(255.0), 16).to(dev)
            mid = self.models.interpolator(x0, x1, embt.expand(len(idx), 1, 1, 1))
            mid = Fm.to_uint8_like_amt(P.unpad(mid.float().cpu(), h, w))
            out.update(zip(idx, mid, strict=True))
        return out

    def _dynamic_degree(self, frames: torch.Tensor, fps: float, clips: list[tuple[int, int]]) -> DimensionScore:
        t, _, h, w = frames.shape
        k = Fm.dynamic_sample_interval(fps)
        starts = sorted({s for a, b in [(0, t), *clips] for s in range(a, b - k, k)})
        mags = self._flow_scores(frames, starts, k)

        def verdict(a: int, b: int) -> tuple[float, list[float]]:
            sampled = list(range(a, b, k))
            scores = [mags[s] for s in sampled[:-1]]
            thres, count_num = Fm.dynamic_params(h, w, len(sampled))
            return float(Fm.is_dynamic(scores, thres, count_num)), scores

        value, scores = verdict(0, t)
        thres = Fm.dynamic_params(h, w, 1)[0]
        segs = [verdict(a, b)[0] for a, b in clips]
        return DimensionScore(value, value, 1, list(range(k, k * (len(scores) + 1), k)),
                              [s / thres for s in scores], segs)

    def _flow_scores(self, frames: torch.Tensor, starts: list[int], k: int) -> dict[int, float]:
        """RAFT on frames ``s -> s + k`` (``vbench/dynamic_degree.py::infer``): RGB float 0..255 replicate-padded
        to a multiple of 8; VBench's RAFT maps them to ``2 x / 255 - 1`` inside, torchvision's RAFT takes that
        range as input; 20 flow updates; the top-5 % magnitude of the padded-size flow."""
        dev = self.models.device
        out: dict[int, float] = {}
        for i in range(0, len(starts), self.pair_batch):
            idx = starts[i : i + self.pair_batch]
            x0 = P.pad_to_multiple(frames[idx].float(), 8).div(127.5).sub(1.0).to(dev)
            x1 = P.pad_to_multiple(frames[[s + k for s in idx]].float(), 8).div(127.5).sub(1.0).to(dev)
            flow = self.models.raft(x0, x1, num_flow_updates=20)[-1].float().cpu()
            out.update((s, Fm.top_flow_magnitude(f)) for s, f in zip(idx, flow, strict=True))
        return out
