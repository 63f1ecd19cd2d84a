"""Toy metrics: real videos score near-perfectly, and each corruption is caught by the metric meant for it."""

import pytest
import torch

from sfvideo.metrics.toy import FRAME_METRICS, VIDEO_METRICS, ToyVideoAnalyser, ToyVideoMetrics, per_video_metrics
from sfvideo.toy.world import (
    DIRECTIONS,
    SceneAttributes,
    parse_prompt,
    prompt_for,
    render,
    render_batch,
    sample_prompts,
)

ACCURACIES = ("colour_acc", "shape_acc", "persistence", "motion_acc", "direction_acc", "background_fidelity")
N = 8


@pytest.fixture(scope="module")
def real():
    prompts = sample_prompts(N, torch.Generator().manual_seed(0), split="all", two_object_fraction=0.25)
    prompts[0] = "a red circle moving left and a blue triangle moving up on a light background"
    return prompts, render_batch(prompts, list(range(N)))


@pytest.fixture(scope="module")
def singles():
    prompts = sample_prompts(N, torch.Generator().manual_seed(1), split="all")
    return prompts, render_batch(prompts, list(range(100, 100 + N)))


def scores(videos, prompts):
    m = ToyVideoMetrics()
    m.update(videos, prompts)
    return m.compute()


def test_real_videos_score_near_perfectly(real):
    prompts, videos = real
    r = scores(videos, prompts)
    for name in ACCURACIES:
        assert r[name] >= 0.95, (name, r[name])
    assert r["flicker"] < 1e-6
    assert r["brightness_error"] < 0.01 and r["saturation_error"] < 0.01
    assert abs(r["brightness_drift"]) < 0.001 and abs(r["saturation_drift"]) < 0.001
    for name in FRAME_METRICS:
        assert r[f"{name}_curve"].shape == (21,)
    assert r["motion_acc_curve"][0].isnan() and r["flicker_curve"][0].isnan()


def test_metrics_are_deterministic_and_accumulate(real):
    prompts, videos = real
    again = render_batch(prompts, list(range(N)))
    a, b = scores(videos, prompts), scores(again, prompts)
    m = ToyVideoMetrics()
    m.update(videos[:3], prompts[:3])
    m.update(videos[3:], prompts[3:])
    c = m.compute()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)
        torch.testing.assert_close(a[key], c[key], equal_nan=True)
    with pytest.raises(ValueError, match="num_frames"):
        ToyVideoMetrics().update(videos[:, :9], prompts)


def test_per_video_metrics_aggregate_to_the_metric_and_locate_errors_in_time(real):
    prompts, videos = real
    agg = scores(videos, prompts)
    per = per_video_metrics(videos, prompts)
    for name in VIDEO_METRICS:
        assert per[name].shape == (N,)
        torch.testing.assert_close(per[name].mean().float(), agg[name])
    for name in FRAME_METRICS:
        assert per[f"{name}_curve"].shape == (N, 21)
        torch.testing.assert_close(per[f"{name}_curve"].nanmean(0).float(), agg[f"{name}_curve"], equal_nan=True)
    # Noise from frame 15 on: background fidelity drops there only, in every video; any length is accepted.
    noisy = videos.clone()
    noisy[:, 15:] += 0.5 * torch.randn(noisy[:, 15:].shape, generator=torch.Generator().manual_seed(0))
    bg = per_video_metrics(noisy.clamp(-1, 1), prompts)["background_fidelity_curve"]
    assert (bg[:, :15] > 0.95).all() and (bg[:, 15:] < 0.5).all()
    assert per_video_metrics(videos[:2, :9], prompts[:2])["persistence_curve"].shape == (2, 9)
    with pytest.raises(ValueError, match="2 videos but 3 prompts"):
        per_video_metrics(videos[:2], prompts[:3])


def test_centroids_track_the_ground_truth():
    analyser = ToyVideoAnalyser()
    for prompt, seed in [
        ("a magenta square moving down on a dark background", 4),
        ("a cyan triangle moving left and a green circle moving right on a light background", 5),
    ]:
        video, truth = render(prompt, seed)
        res = analyser.analyse(video, prompt)
        err = res["centroids"] - truth.centres
        # Triangles' centroids sit s/6 below the box centre; everything else matches to a fraction of a pixel.
        for k, shape in enumerate(truth.shapes):
            offset = truth.size / 6 if shape == "triangle" else 0.0
            assert err[:, k, 0].abs().max() < 0.2
            assert (err[:, k, 1] - offset).abs().max() < 0.2


def _other(options, word, shift=1):
    options = list(options)
    return options[(options.index(word) + shift) % len(options)]


def _with(prompts, field):
    """Prompts whose single object has a different ``field`` (colour, shape or direction)."""
    out = []
    for p in prompts:
        o = parse_prompt(p).objects[0]
        vals = {"colour": o.colour, "shape": o.shape, "direction": o.direction}
        pool = {
            "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
            "shape": ("circle", "square", "triangle"),
            "direction": ("left", "up", "right", "down"),
        }[field]
        vals[field] = _other(pool, vals[field], 2 if field == "direction" else 1)  # direction: the opposite
        out.append(prompt_for(SceneAttributes.single(**vals, background=parse_prompt(p).background)))
    return out


def test_wrong_colour_is_caught_by_colour_accuracy(singles):
    prompts, videos = singles
    r = scores(render_batch(_with(prompts, "colour"), list(range(100, 100 + N))), prompts)
    assert r["colour_acc"] < 0.05
    for name in ("shape_acc", "persistence", "motion_acc", "background_fidelity"):
        assert r[name] >= 0.95, name


def test_wrong_shape_is_caught_by_shape_accuracy(singles):
    prompts, _ = singles
    r = scores(render_batch(_with(prompts, "shape"), list(range(100, 100 + N))), prompts)
    assert r["shape_acc"] < 0.05 and r["colour_acc"] >= 0.95


def test_wrong_direction_is_caught_by_direction_accuracy(singles):
    prompts, _ = singles
    r = scores(render_batch(_with(prompts, "direction"), list(range(100, 100 + N))), prompts)
    assert r["direction_acc"] < 0.05 and r["motion_acc"] < 0.8 and r["colour_acc"] >= 0.95


def test_frozen_video_is_caught_by_motion_accuracy(real):
    prompts, videos = real
    r = scores(videos[:, :1].expand_as(videos).contiguous(), prompts)
    assert r["motion_acc"] < 0.3 and r["direction_acc"] == 0
    assert r["colour_acc"] >= 0.95 and r["persistence"] >= 0.95


def test_flicker_is_caught_by_the_flicker_metric(real):
    prompts, videos = real
    g = torch.Generator().manual_seed(0)
    r = scores(videos + 0.1 * torch.randn(N, 21, 1, 1, 1, generator=g), prompts)
    assert r["flicker"] > 0.05
    assert r["motion_acc"] >= 0.95 and r["colour_acc"] >= 0.95


def test_brightness_drift_is_caught_by_the_drift_metric(real):
    prompts, videos = real
    ramp = torch.linspace(0, 0.4, 21).view(1, 21, 1, 1, 1)
    r = scores(videos + ramp, prompts)
    assert r["brightness_drift"] > 0.1
    assert r["brightness_error_curve"][-1] > r["brightness_error_curve"][0] + 0.1
    # Over-saturation: push every pixel away from its grey level, more and more (only the objects have chroma
    # here, so the frame-mean change is small, but real videos drift by < 0.001).
    grey = videos.mean(dim=2, keepdim=True)
    r = scores(grey + (videos - grey) * (1 + ramp), prompts)
    assert r["saturation_drift"] > 0.008


def test_noise_is_caught_by_background_fidelity_and_persistence(real):
    prompts, videos = real
    g = torch.Generator().manual_seed(0)
    mild = scores(videos + 0.1 * torch.randn(videos.shape, generator=g), prompts)
    assert mild["background_fidelity"] < 0.6 and mild["colour_acc"] >= 0.95
    strong = scores(videos + 0.3 * torch.randn(videos.shape, generator=g), prompts)
    assert strong["persistence"] < 0.2 and strong["background_fidelity"] < 0.1


def test_missing_object_scores_zero():
    prompt = "a red circle moving left on a dark background"
    video, _ = render(prompt, 0)
    res = ToyVideoAnalyser().analyse(video[:, :, :, :] * 0 + video[0, :, 0, 0].view(1, 3, 1, 1), prompt)
    for name in ("colour_acc", "shape_acc", "persistence"):
        assert (res[name] == 0).all()
    assert res["centroids"].isnan().all() and res["direction_acc"] == 0
    assert set(VIDEO_METRICS) <= set(res)


def test_direction_words_have_unit_vectors():
    assert {tuple(v) for v in DIRECTIONS.values()} == {(-1, 0), (1, 0), (0, -1), (0, 1)}
