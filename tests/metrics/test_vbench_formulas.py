"""VBench formulas on hand-made videos with known answers (static, constant motion, flickering, drifting), the
preprocessing size rules, the aggregate and its partial reporting. No learned weights."""

from __future__ import annotations

import math

import pytest
import torch
from vbench_fixtures import Blend, ShiftFlow, rolled_texture, uniform_video

from sfvideo.metrics.vbench import VBenchMetric, VBenchModels, VideoScorer, aggregate, clip_ranges
from sfvideo.metrics.vbench import formulas as Fm
from sfvideo.metrics.vbench import preprocess as P
from sfvideo.metrics.vbench.constants import NORMALIZE, QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS


def _models(**kw) -> VBenchModels:
    dims = tuple(d for d, need in {"temporal_flickering": True, "motion_smoothness": "interpolator" in kw,
                                   "dynamic_degree": "raft" in kw}.items() if need)
    return VBenchModels(dimensions=dims, missing={}, **kw)


def test_static_video_scores_one():
    video = uniform_video([90] * 9)
    scorer = VideoScorer(_models(interpolator=Blend(), raft=ShiftFlow()))
    s = scorer.score(video, fps=8)
    assert s.dimensions["temporal_flickering"].value == 1.0
    assert s.dimensions["motion_smoothness"].value == 1.0
    assert s.dimensions["dynamic_degree"].value == 0.0  # no flow at all
    f = torch.randn(1, 5).expand(7, 5)
    # identical features: cosine 1 up to float64 rounding of the normalisation
    assert Fm.consistency_terms(f).sub(1).abs().max() < 1e-12
    assert all(abs(t / n - 1) < 1e-12 for t, n in Fm.gap_similarity(f, [1, 3, 6]))


def test_linear_ramp_flicker_and_smoothness():
    # x_t = 40 + 6 t: every pair differs by 6 levels; every odd frame is the exact midpoint of its neighbours.
    video = uniform_video([40 + 6 * t for t in range(9)])
    value, curve = Fm.temporal_flickering(video)
    assert value == pytest.approx((255 - 6) / 255, abs=1e-12)
    assert torch.allclose(curve, torch.full((8,), (255 - 6) / 255, dtype=torch.float64))
    s = VideoScorer(_models(interpolator=Blend())).score(video, fps=8)
    assert s.dimensions["motion_smoothness"].value == 1.0
    assert s.dimensions["motion_smoothness"].frames == [1, 3, 5, 7]


def test_flickering_video():
    # 100, 140, 100, ...: |Δ| = 40 everywhere; even frames are all 100, so interpolation misses odd frames by 40.
    video = uniform_video([100, 140] * 5 + [100])
    s = VideoScorer(_models(interpolator=Blend())).score(video, fps=8)
    assert s.dimensions["temporal_flickering"].value == pytest.approx((255 - 40) / 255, abs=1e-12)
    assert s.dimensions["motion_smoothness"].value == pytest.approx((255 - 40) / 255, abs=1e-12)


@pytest.mark.parametrize("speed, fps, dynamic", [(1, 16, True), (1, 8, False), (0, 16, False), (3, 8, True)])
def test_constant_motion_dynamic_degree(speed, fps, dynamic):
    # 64x64: threshold 6 * 64 / 256 = 1.5 px between sampled frames; fps 16 samples every 2nd frame
    # (round(16 / 8) = 2), fps 8 every frame. 17 frames at fps 16 -> 9 sampled, count_num = round(4 * 9 / 16) = 2.
    video = rolled_texture(17, speed)
    s = VideoScorer(_models(raft=ShiftFlow())).score(video, fps=fps)
    step = speed * Fm.dynamic_sample_interval(fps)
    assert s.dimensions["dynamic_degree"].value == float(dynamic)
    # the per-pair curve is the top-5 % flow magnitude over the threshold
    curve = s.dimensions["dynamic_degree"].curve
    assert curve == pytest.approx([step / 1.5] * len(curve))


def test_dynamic_degree_rules_match_vbench():
    assert [Fm.dynamic_sample_interval(f) for f in (8, 10, 12, 16, 24, 30)] == [1, 1, 2, 2, 3, 4]  # Python round
    assert Fm.dynamic_params(480, 832, 17) == (6.0 * 480 / 256, 4)
    assert Fm.is_dynamic([2.0, 0.0, 2.0], 1.0, 2) and not Fm.is_dynamic([2.0, 0.0, 0.5], 1.0, 2)
    assert not Fm.is_dynamic([], 1.0, 0)  # no pair: check_move's loop never runs
    flow = torch.zeros(2, 10, 10)
    flow[0, :5, 0] = 3.0  # 5 of 100 pixels move 3 px: cut = int(100 * 0.05) = 5 -> mean 3
    assert Fm.top_flow_magnitude(flow) == pytest.approx(3.0)
    assert math.isnan(Fm.top_flow_magnitude(torch.zeros(2, 4, 4)))  # cut = 0, np.mean of nothing


def test_consistency_closed_form_rotation():
    # unit features rotating by θ per frame: cos to previous = cos θ, to first = cos(iθ) (clamped at 0)
    th = 0.3
    i = torch.arange(8, dtype=torch.float64)
    f = torch.stack([torch.cos(i * th), torch.sin(i * th)], -1) * 3.0  # the scale must not matter
    want = (math.cos(th) + torch.cos(i[1:] * th).clamp_min(0)) / 2
    assert torch.allclose(Fm.consistency_terms(f), want, atol=1e-12)
    (t2, n2), (t9, n9) = Fm.gap_similarity(f, [2, 9])
    assert n2 == 6 and t2 / n2 == pytest.approx(math.cos(2 * th)) and n9 == 0


def test_clip_ranges_vbench_long():
    assert clip_ranges(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert clip_ranges(20, 4) == [(0, 8), (8, 16), (12, 20)]  # the short last clip borrows 4 frames
    assert clip_ranges(5, 4) == [(0, 5)]  # shorter than a clip: the whole video
    assert clip_ranges(70, 16.9) == [(0, 32), (32, 64), (38, 70)]  # int(fps), as get_video_properties


def test_drifting_video_per_clip_curve_and_drift():
    # fps 4, 2 s clips of 8 frames; inside clip k frames alternate 128 ± (1 + 2k): pair difference a_k = 2 + 4k.
    levels = [128 + (1 + 2 * (t // 8)) * (-1) ** t for t in range(32)]
    video = uniform_video(levels)
    metric = VBenchMetric(_models(), fps=4, max_frames=32, horizon_frames=16)
    metric.update(video.unsqueeze(0))
    r = metric.compute()
    clips = [(255 - (2 + 4 * k)) / 255 for k in range(4)]
    assert r["per_clip"]["temporal_flickering"]["value"] == pytest.approx(clips, abs=1e-12)
    assert r["per_clip"]["temporal_flickering"]["start_s"] == [0.0, 2.0, 4.0, 6.0]
    assert r["long"]["temporal_flickering"] == pytest.approx(sum(clips) / 4, abs=1e-12)
    d = r["drift"]["temporal_flickering"]
    assert d["slope_per_clip"] == pytest.approx(-4 / 255, abs=1e-12)
    assert d["slope_per_second"] == pytest.approx(-2 / 255, abs=1e-12)
    assert d["last_minus_first"] == pytest.approx(-12 / 255, abs=1e-12)
    assert d["beyond_minus_within_horizon"] < 0
    # per frame: pair t-1 -> t sits at frame t
    curve = r["per_frame"]["temporal_flickering"]
    assert curve["frame"] == list(range(1, 32)) and curve["value"][0] == pytest.approx((255 - 2) / 255)


def test_metric_accumulates_like_vbench_over_videos():
    a, b = uniform_video([10, 20, 10, 20]), uniform_video([50] * 6)
    metric = VBenchMetric(_models(), fps=8, max_frames=6)
    metric.update(a.unsqueeze(0))
    metric.update(b.unsqueeze(0))
    # temporal flickering: mean of video scores (video-weighted)
    assert metric.compute()["dimensions"]["temporal_flickering"] == pytest.approx(((255 - 10) / 255 + 1) / 2)
    # float input in [-1, 1] is converted as the mp4 writer does
    m2 = VBenchMetric(_models(), fps=8, max_frames=4)
    m2.update(a.unsqueeze(0).float() / 127.5 - 1)
    assert m2.compute()["dimensions"]["temporal_flickering"] == pytest.approx((255 - 10) / 255)


def test_aggregate_constants_and_partial():
    top = {d: NORMALIZE[d][1] for d in QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS}
    agg = aggregate(top)
    assert agg["quality"].value == pytest.approx(1.0) and agg["total"].value == pytest.approx(1.0)
    low = {**top, "dynamic_degree": 0.0}  # weight 0.5 of 6.5
    assert aggregate(low)["quality"].value == pytest.approx(6 / 6.5)
    assert aggregate(low)["total"].value == pytest.approx((4 * 6 / 6.5 + 1) / 5)
    sc = {**top, "subject_consistency": (0.1462 + 1.0) / 2}  # halfway between Min and Max
    assert aggregate(sc)["quality"].value == pytest.approx((6.5 - 0.5) / 6.5)
    part = aggregate({d: v for d, v in top.items() if d != "imaging_quality"})
    assert part["quality"].status == "partial" and part["quality"].value is None
    assert part["quality"].missing == ("imaging_quality",) and part["semantic"].status == "complete"
    assert part["total"].as_dict() == {"value": None, "status": "partial", "missing": ["imaging_quality"]}


def test_metric_without_models_reports_partial():
    metric = VBenchMetric(VBenchModels.load(), fps=8, max_frames=4)
    metric.update(uniform_video([1, 2, 3, 4]).unsqueeze(0))
    r = metric.compute()
    assert r["dimensions"]["temporal_flickering"] is not None
    assert r["dimensions"]["subject_consistency"] is None
    assert r["missing"]["subject_consistency"] == "no --dino given"
    assert set(SEMANTIC_DIMENSIONS) <= set(r["missing"])
    assert all(a["status"] == "partial" for a in r["aggregate"].values())


def test_preprocess_sizes_follow_torchvision():
    assert P.short_side_size(480, 832, 224) == (224, 388)  # int(224 * 832 / 480) = 388
    assert P.short_side_size(832, 480, 224) == (388, 224)
    frames = torch.randint(0, 256, (2, 3, 480, 832), dtype=torch.uint8)
    assert P.clip_transform(frames).shape == (2, 3, 224, 224)
    assert P.dino_transform(frames).shape == (2, 3, 224, 388)  # no crop
    assert P.musiq_transform(frames).shape == (2, 3, 295, 512)  # 'longer': s = 512 / 832
    small = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    assert torch.equal(P.musiq_transform(small), small.float() / 255)  # <= 512: only /255
    # CenterCrop: top = round((H - n) / 2) with Python's round (banker's at .5)
    x = torch.arange(7 * 7).view(1, 1, 7, 7)
    assert P.center_crop(x, 4)[0, 0, 0, 0] == 2 * 7 + 2  # (7 - 4) / 2 = 1.5 rounds to 2


class _MeanLevel(torch.nn.Module):
    """Stands in for MUSIQ: 100 x the mean of the [0, 1] input; records the input sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape))
        return x.mean() * 100


def test_imaging_quality_pipeline():
    # frames at levels 51 and 102 -> MUSIQ stand-in 20 and 40 -> /100 -> 0.2, 0.4; one frame per call, longer side
    # brought to 512 (600x900 -> 341x512).
    musiq = _MeanLevel()
    models = VBenchModels(musiq=musiq, dimensions=("imaging_quality",), missing={})
    video = uniform_video([51, 102, 51, 102], h=600, w=900)
    s = VideoScorer(models).score(video, fps=8).dimensions["imaging_quality"]
    assert s.curve == pytest.approx([0.2, 0.4, 0.2, 0.4], abs=1e-6)
    assert s.value == pytest.approx(0.3, abs=1e-6)
    assert musiq.sizes == [(1, 3, 341, 512)] * 4  # int(600 * 512 / 900) = 341


class _SmallFrameRaft(torch.nn.Module):
    def forward(self, x0, x1, num_flow_updates=12):
        raise ValueError("Feature maps are too small to be down-sampled by the correlation pyramid.")


def test_flow_model_refusal_is_reported_not_raised():
    metric = VBenchMetric(_models(raft=_SmallFrameRaft()), fps=8, max_frames=6)
    metric.update(uniform_video([5] * 6).unsqueeze(0))
    r = metric.compute()
    assert r["dimensions"]["dynamic_degree"] is None
    assert "too small" in r["missing"]["dynamic_degree"] and r["dimensions"]["temporal_flickering"] == 1.0
    metric.reset()
    assert metric.skipped == {}


@pytest.mark.parametrize("hw", [(480, 832), (250, 251), (600, 300), (224, 224)])
def test_preprocess_matches_torchvision(hw):
    """Against the torchvision transforms VBench composes (``vbench/utils.py`` clip/dino_transform,
    ``vbench/imaging_quality.py`` transform); skipped where torchvision does not import (this project's venv)."""
    T = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms import InterpolationMode

    frames = torch.randint(0, 256, (2, 3, *hw), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = frames.float()  # VBench's load_video: torch.Tensor(frames)
    clip = T.Compose([T.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=False), T.CenterCrop(224),
                      T.Lambda(lambda v: v.float().div(255.0)), T.Normalize(P.CLIP_MEAN, P.CLIP_STD)])
    dino = T.Compose([T.Resize(size=224, antialias=False), T.Lambda(lambda v: v.float().div(255.0)),
                      T.Normalize(P.IMAGENET_MEAN, P.IMAGENET_STD)])
    h, w = hw
    musiq = x
    if max(h, w) > 512:
        s = 512.0 / max(h, w)
        musiq = T.Resize(size=(int(s * h), int(s * w)), antialias=False)(x)
    # same interpolation kernels on the same shapes: equal up to float32 rounding
    assert torch.allclose(P.clip_transform(frames), clip(x), atol=1e-5)
    assert torch.allclose(P.dino_transform(frames), dino(x), atol=1e-5)
    assert torch.allclose(P.musiq_transform(frames), musiq / 255.0, atol=1e-6)
