"""FD-syn / KD-syn: distances against closed forms, the shipped encoder, and real-vs-real vs real-vs-corrupted."""

import pytest
import torch

from sfvideo.toy.features import (
    DEFAULT_CHECKPOINT,
    ToyFeatureDistance,
    ToyFeatureEncoder,
    distance_report,
    frechet_distance,
    half_sample_interval,
    kernel_distance,
    load_feature_encoder,
    save_feature_encoder,
    train_feature_encoder,
)
from sfvideo.toy.world import (
    COLOURS,
    SceneAttributes,
    ToyWorldConfig,
    parse_prompt,
    prompt_for,
    render_batch,
    sample_prompts,
)


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g) @ torch.randn(5, 5, generator=g)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    torch.testing.assert_close(frechet_distance(a, a), torch.tensor(0.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(frechet_distance(a, a + shift), shift.pow(2).sum(), atol=1e-3, rtol=1e-4)
    # b = 2a + c: S_b = 4 S_a, so FD = |mu_a - mu_b|² + tr S_a + 4 tr S_a - 2 tr(2 S_a) = |mu_a - mu_b|² + tr S_a.
    b = 2 * a + shift
    expected = (a.mean(0) - b.mean(0)).pow(2).sum() + torch.cov(a.T).trace()
    torch.testing.assert_close(frechet_distance(a, b), expected, rtol=1e-4, atol=1e-3)


def test_kernel_distance_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() + 0.5

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    kaa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kbb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kab = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / 35
    torch.testing.assert_close(kernel_distance(a, b).double(), (kaa + kbb - 2 * kab).double(), rtol=1e-5, atol=1e-6)
    big = torch.randn(400, 4, generator=g)
    assert abs(float(kernel_distance(big[:200], big[200:]))) < 0.05  # unbiased: ~0 for one distribution


def test_report_intervals_contain_their_estimates_and_kd_is_a_difference():
    g = torch.Generator().manual_seed(2)
    real_a, real_b = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    fake = torch.randn(64, 4, generator=g) + 1.0
    rep = distance_report(fake, real_a, real_b, num_subsets=40)
    value = float(frechet_distance(fake, real_a))
    assert rep["fd"] == pytest.approx(value) and rep["fd_ratio"] > 5
    for name in ("fd", "fd_ratio", "kd", "kd_diff"):
        assert rep[f"{name}_low"] <= rep[name] <= rep[f"{name}_high"], name
    assert rep["kd_diff"] == pytest.approx(rep["kd"] - rep["kd_real"])
    assert "kd_ratio" not in rep
    # Two real sets: the unbiased KD floor can be negative; the difference is still a number, near 0.
    same = distance_report(real_b, real_a, torch.randn(64, 4, generator=g), num_subsets=40)
    assert all(v == v for v in same.values())  # no NaN
    assert same["kd_diff_low"] <= 0.0 <= same["kd_diff_high"] or abs(same["kd_diff"]) < 0.05
    # Too few rows for halves: values without intervals.
    small = distance_report(fake[:3], real_a[:3], real_b[:3])
    assert "fd_low" not in small and small["fd"] > 0


def test_subsets_are_drawn_without_replacement(monkeypatch):
    """Every subset of the intervals holds distinct rows (duplicates bias both distances upward)."""
    import sfvideo.toy.features as features

    seen = []

    def spy(a, b):
        seen.append((a, b))
        return torch.tensor(1.0)

    monkeypatch.setattr(features, "frechet_distance", spy)
    monkeypatch.setattr(features, "kernel_distance", spy)
    rows = torch.arange(40.0).view(20, 2)
    features.distance_report(rows, rows + 100, rows + 200, num_subsets=5)
    assert len(seen) == 4 + 5 * 4
    for a, b in seen[4:]:
        for x in (a, b):
            assert len(x) == 10 and len(torch.unique(x[:, 0])) == len(x)


def test_half_sample_interval_is_centred_on_the_estimate():
    lo, hi = half_sample_interval(10.0, torch.tensor([12.0, 13.0, 14.0, 15.0, 16.0]), level=1.0)
    assert (lo, hi) == (pytest.approx(8.0), pytest.approx(12.0))
    with pytest.raises(ValueError, match="no subset values"):
        half_sample_interval(1.0, torch.tensor([]))


def test_half_sample_spread_matches_the_sampling_spread_of_the_full_estimate():
    """The half-sample spread estimates the spread of the full-sample FD over independent draws (the point of
    halving: the finite-population factor cancels the doubled variance), within a loose factor."""
    g = torch.Generator().manual_seed(5)
    full, halves = [], []
    for _ in range(30):
        a, b = torch.randn(80, 3, generator=g) + 0.7, torch.randn(80, 3, generator=g)
        full.append(float(frechet_distance(a, b)))
    a, b = torch.randn(80, 3, generator=g) + 0.7, torch.randn(80, 3, generator=g)
    for _ in range(60):
        ia, ib = torch.randperm(80, generator=g)[:40], torch.randperm(80, generator=g)[:40]
        halves.append(float(frechet_distance(a[ia], b[ib])))
    ratio = torch.tensor(halves).std() / torch.tensor(full).std()
    assert 0.5 < float(ratio) < 2.0


def test_save_load_round_trip(tmp_path):
    model = ToyFeatureEncoder((8, 8, 8)).eval()
    path = tmp_path / "enc.safetensors"
    save_feature_encoder(model, path, {"seed": 3})
    loaded = load_feature_encoder(path)
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    assert torch.equal(model.features(video), loaded.features(video))
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="python -m sfvideo.toy.features"):
        load_feature_encoder(tmp_path / "missing.safetensors")


def test_training_smoke_is_deterministic():
    cfg = ToyWorldConfig(num_frames=6)
    a = train_feature_encoder(cfg, steps=2, seed=0, batch_size=4, num_videos=6, crop_frames=4, widths=(4, 4, 4))
    b = train_feature_encoder(cfg, steps=2, seed=0, batch_size=4, num_videos=6, crop_frames=4, widths=(4, 4, 4))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not a.training


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="shipped feature checkpoint missing")
def test_shipped_encoder_separates_real_from_corrupted():
    enc = load_feature_encoder()
    n = 48
    prompts = sample_prompts(n, torch.Generator().manual_seed(0), split="all")
    real_a = render_batch(prompts, list(range(n)))
    real_b = render_batch(prompts, list(range(1000, 1000 + n)))
    # Wrong content: every object one palette step off (same seeds, so same motion).
    colours = list(COLOURS)
    recoloured = []
    for p in prompts:
        a = parse_prompt(p)
        o = a.objects[0]
        recoloured.append(
            prompt_for(
                SceneAttributes.single(
                    colours[(colours.index(o.colour) + 1) % len(colours)], o.shape, o.direction, a.background
                )
            )
        )
    g = torch.Generator().manual_seed(0)
    fa, fb = enc.features(real_a), enc.features(real_b)
    fd_real = float(frechet_distance(fb, fa))
    corrupted = {
        "frozen": real_b[:, :1].expand_as(real_b).contiguous(),
        "wrong colour": render_batch(recoloured, list(range(1000, 1000 + n))),
        "noise 0.3": real_b + 0.3 * torch.randn(real_b.shape, generator=g),
    }
    for name, video in corrupted.items():
        f = enc.features(video)
        assert float(frechet_distance(f, fa)) > 2 * fd_real, name
        assert float(kernel_distance(f, fa)) > float(kernel_distance(fb, fa)), name
    metric = ToyFeatureDistance(enc)
    metric.update(real_a, real=True)
    metric.update(real_b, real=False)
    out = metric.compute()
    torch.testing.assert_close(out["fd"], frechet_distance(fb, fa))
    torch.testing.assert_close(out["kd"], kernel_distance(fb, fa))
