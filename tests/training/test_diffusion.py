"""FlowMatchingDiffusion as the official TF/DF trainer (model/diffusion.py): per-chunk levels from the training
table, the schedule's loss weight, noise augmentation of the teacher-forcing context (official and intended
indexing), caption dropout; the teacher's recipe unchanged. Hand-computed cases on a 4-level grid with a network
whose error per frame is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.toy.encoders import ToyTextEncoder
from sfvideo.training.diffusion import FlowMatchingDiffusion

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
N4 = FlowMatchSchedule(num_train_timesteps=4, shift=1.0)  # grid sigmas 1, 3/4, 1/2, 1/4 = timesteps 4, 3, 2, 1
PROMPT = "a red circle moving left on a dark background"
OFFSET = torch.tensor([1.0, 2.0, 3.0, 4.0])  # the network's error in frame f, so its squared error is OFFSET[f]^2


def bump_weight(t: float) -> float:
    """utils/scheduler.py at N = 4: y(t) = exp(-2 ((t - 2) / 4)^2) minus its minimum over the grid timesteps
    {4, 3, 2, 1} (y(4) = e^-1/2), scaled so the four weights sum to 4."""
    total = 1 + 2 * math.exp(-1 / 8) - 3 * math.exp(-1 / 2)  # sum of y - min over the grid
    return 4 * (math.exp(-2 * ((t - 2) / 4) ** 2) - math.exp(-1 / 2)) / total


class KnownErrorNet(nn.Module):
    """With x0 = 0, x_t = sigma eps: predicts eps + OFFSET[f] (target eps - x0 = eps) and records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward(self, x, timestep, context, **kw):
        self.calls.append({"x": x.clone(), "timestep": timestep.clone(), "context": context.clone(), **kw})
        t = timestep if timestep.ndim == 2 else timestep[:, None].expand(x.shape[:2])
        sigma = (t / 4.0)[..., None, None, None]
        return self.scale * x / sigma + OFFSET.view(1, -1, 1, 1, 1)


def module(attention: str, batch: int = 3, **kw) -> tuple[FlowMatchingDiffusion, dict]:
    kw.setdefault("caption_dropout", 0.0)
    m = FlowMatchingDiffusion(model="debug", geometry=GEO, attention=attention, text_encoder=ToyTextEncoder(),
                              schedule=N4, **kw)
    m.model = KnownErrorNet()
    return m, {"latents": torch.zeros(batch, *GEO.latent_shape(1)[1:]), "prompts": [PROMPT] * batch}


@pytest.mark.parametrize("attention", ["block_causal", "teacher_forcing"])
def test_causal_loss_is_the_schedule_weighted_per_frame_mse(attention):
    m, batch = module(attention, batch=8)
    loss, logs = m.flow_matching_loss(batch, 0)
    (call,) = m.model.calls
    t = call["timestep"]
    assert t.shape == (8, 4) and call["attention"] == attention and call["frames_per_chunk"] == 2
    # One level per chunk, a point of the 4-level table (official _get_timestep(uniform_timestep=False)).
    assert torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 2], t[:, 3])
    assert set(t.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}
    expected = sum(bump_weight(t[b, f].item()) * OFFSET[f].item() ** 2 for b in range(8) for f in range(4)) / 32
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # x / sigma * sigma in fp32: rounding only
    assert logs["flow_mse"].item() == pytest.approx((OFFSET**2).mean().item(), rel=1e-5)
    # Uniform weighting is the plain MSE; a level at t = 4 (pure noise) has weight 0 under the schedule.
    m, batch = module(attention, batch=8, loss_weight="uniform")
    assert m.flow_matching_loss(batch, 0)[0].item() == pytest.approx((OFFSET**2).mean().item(), rel=1e-5)
    assert bump_weight(4.0) == pytest.approx(0.0, abs=1e-12)


def test_per_chunk_levels_cover_the_table_and_the_noisy_input_is_at_them():
    m, batch = module("block_causal", batch=64)
    batch["latents"] = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    m.flow_matching_loss(batch, 0)
    (call,) = m.model.calls
    assert set(call["timestep"].unique().tolist()) == {1.0, 2.0, 3.0, 4.0}
    # Regenerate the step's noise from the module's own seeding: x_t = (1 - sigma) x0 + sigma eps per frame.
    g = m.rng(0, 0, 0, 0)
    torch.rand(64, generator=g)  # caption dropout
    torch.randint(0, 4, (64, 4), generator=g)  # levels
    eps = torch.randn(batch["latents"].shape, generator=g)
    sigma = (call["timestep"] / 4)[..., None, None, None]
    torch.testing.assert_close(call["x"], (1 - sigma) * batch["latents"] + sigma * eps)


def test_teacher_keeps_one_level_per_sample_and_the_unweighted_mse():
    m, batch = module("bidirectional", batch=8)
    loss, _ = m.flow_matching_loss(batch, 0)
    (call,) = m.model.calls
    assert call["timestep"].shape == (8,) and call["attention"] == "bidirectional"
    assert "clean_x" not in call
    assert loss.item() == pytest.approx((OFFSET**2).mean().item(), rel=1e-5)
    # The schedule weight is an option for the teacher too.
    m, batch = module("bidirectional", batch=8, loss_weight="schedule")
    loss, _ = m.flow_matching_loss(batch, 0)
    t = m.model.calls[0]["timestep"]
    expected = sum(bump_weight(t[b].item()) * OFFSET[f].item() ** 2 for b in range(8) for f in range(4)) / 32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("indexing,levels", [("low_noise", {1.0}), ("official", {4.0, 3.0})])
def test_teacher_forcing_augmentation_reaches_only_the_clean_half(indexing, levels):
    """M = 2 on the grid {4, 3, 2, 1}: officially randint(0, 2) indexes the two noisiest levels (t 4, 3); the
    intended low-noise levels are those below timestep 2 (t = 1 only). Same noise tensor as the input."""
    x0 = torch.randn(4, *GEO.latent_shape(1)[1:], generator=torch.Generator().manual_seed(1))
    runs = {}
    for m_aug in (0, 2):
        m, batch = module("teacher_forcing", batch=4, noise_augmentation_max_timestep=m_aug,
                          augmentation_indexing=indexing)
        batch["latents"] = x0
        m.flow_matching_loss(batch, 0)
        runs[m_aug] = m.model.calls[0]
    clean, aug = runs[0], runs[2]
    # The noisy half (input and its levels) is the same with and without augmentation.
    assert torch.equal(clean["x"], aug["x"]) and torch.equal(clean["timestep"], aug["timestep"])
    # Without augmentation the context is the clean clip at timestep 0 (official aug_t = None).
    assert torch.equal(clean["clean_x"], x0) and torch.equal(clean["clean_timestep"], torch.zeros(4, 4))
    # With it: the context at its own per-chunk level, noised with the input's noise eps.
    tc = aug["clean_timestep"]
    assert set(tc.unique().tolist()) <= levels and torch.equal(tc[:, 0], tc[:, 1]) and torch.equal(tc[:, 2], tc[:, 3])
    sig = (aug["timestep"] / 4)[..., None, None, None]
    eps = (aug["x"] - (1 - sig) * x0) / sig  # the input's noise
    sc = (tc / 4)[..., None, None, None]
    torch.testing.assert_close(aug["clean_x"], (1 - sc) * x0 + sc * eps)  # fp32 rounding of the eps recovery
    assert not torch.allclose(aug["clean_x"], x0)


def test_caption_dropout_rate_and_the_negative_prompt():
    n = 2000
    for p in (0.0, 0.3):
        m, batch = module("block_causal", batch=n, caption_dropout=p)
        m.flow_matching_loss({"latents": torch.zeros(n, *GEO.latent_shape(1)[1:]), "prompts": batch["prompts"]}, 0)
        ctx = m.model.calls[0]["context"]
        cond, null = m.encode([PROMPT])
        dropped = (ctx == null).flatten(1).all(1)
        assert bool(((ctx == cond).flatten(1).all(1) | dropped).all())  # each row is the prompt or the negative
        rate = dropped.float().mean().item()
        # Binomial(2000, p): 4 standard deviations is 0.041 at p = 0.3 (fixed seed: deterministic).
        assert rate == 0.0 if p == 0 else abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_options_are_checked_and_the_sampler_is_recorded():
    for attention, sampler in [("bidirectional", "euler"), ("block_causal", "causal_cfg"),
                               ("teacher_forcing", "causal_cfg")]:
        m, _ = module(attention)
        assert m.inference_settings().sampler == sampler
    with pytest.raises(ValueError, match="needs attention teacher_forcing"):
        module("block_causal", noise_augmentation_max_timestep=2)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
        module("teacher_forcing", noise_augmentation_max_timestep=5)
    with pytest.raises(ValueError, match="no level"):  # no grid timestep below 1
        module("teacher_forcing", noise_augmentation_max_timestep=1, augmentation_indexing="low_noise")


def test_learning_rate_warms_up_then_follows_the_cosine_to_its_floor():
    m, _ = module("bidirectional", warmup_steps=4, lr_decay_steps=10, min_lr_ratio=0.1)
    f = [m.lr_factor(s) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up (step + 1) / warm
    # cosine from the peak at step 4 to min_lr_ratio at step 14: 0.1 + 0.9 (1 + cos(pi t)) / 2, t = (s - 4) / 10
    for s in range(4, 20):
        t = min(1.0, (s - 4) / 10)
        assert f[s] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t)), abs=1e-12)
    assert f[9] == pytest.approx(0.55) and f[19] == pytest.approx(0.1)
    constant, _ = module("bidirectional", warmup_steps=2)  # lr_decay_steps 0: constant after warm-up
    assert [constant.lr_factor(s) for s in (0, 1, 50)] == [0.5, 1.0, 1.0]


def test_logit_normal_levels_follow_their_density():
    m, _ = module("bidirectional", sigma_sampling="logit_normal", logit_mean=0.5, logit_std=1.0)
    n = 4000
    sigma = m.sample_sigma(n, torch.Generator().manual_seed(0))
    assert sigma.shape == (n, GEO.num_frames) and bool((sigma == sigma[:, :1]).all())  # one level per sample
    s = sigma[:, 0]
    assert 0 < float(s.min()) and float(s.max()) < 1
    # logit(sigma) ~ N(0.5, 1) (shift 1): its quartiles are 0.5 -/+ 0.674; sample quartiles of 4000 draws have a
    # standard error of about 0.03, so 0.1 is > 3 of them.
    z = torch.logit(s.double())
    q = torch.quantile(z, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert q.tolist() == pytest.approx([0.5 - 0.674, 0.5, 0.5 + 0.674], abs=0.1)
    grid, _ = module("bidirectional")  # the default stays the grid: only its N levels occur
    levels = set(grid.sample_sigma(200, torch.Generator().manual_seed(0))[:, 0].tolist())
    assert levels <= set(N4.sigmas(torch.float32).tolist())


def test_frame_level_fraction_gives_that_share_of_samples_one_level_per_frame():
    kw = dict(sigma_sampling="logit_normal", logit_mean=0.5, logit_std=1.0)
    base, _ = module("bidirectional", **kw)
    off, _ = module("bidirectional", frame_level_fraction=0.0, **kw)
    half, _ = module("bidirectional", frame_level_fraction=0.5, **kw)
    n = 2000
    ref = base.sample_sigma(n, torch.Generator().manual_seed(0))
    # Fraction 0 draws nothing extra: an earlier teacher run replays exactly.
    assert torch.equal(off.sample_sigma(n, torch.Generator().manual_seed(0)), ref)
    sigma = half.sample_sigma(n, torch.Generator().manual_seed(0))
    own = ~(sigma == sigma[:, :1]).all(1)
    assert abs(own.float().mean().item() - 0.5) < 0.05  # binomial sd 0.011
    # The per-sample draw comes first, so the other samples keep the levels of fraction 0.
    assert torch.equal(sigma[~own], ref[~own])
    # Per-frame levels follow the same density: logit median 0.5 (standard error ~0.01 over these draws).
    assert torch.logit(sigma[own].double()).median().item() == pytest.approx(0.5, abs=0.05)
    # The network gets them per frame.
    m, batch = module("bidirectional", batch=8, frame_level_fraction=1.0)
    m.flow_matching_loss(batch, 0)
    assert m.model.calls[0]["timestep"].shape == (8, GEO.num_frames)


def test_clean_prefix_fraction_gives_that_share_a_clean_first_chunk_left_out_of_the_loss():
    kw = dict(sigma_sampling="logit_normal", logit_mean=0.5, logit_std=1.0)
    base, _ = module("bidirectional", **kw)
    half, _ = module("bidirectional", clean_prefix_fraction=0.5, **kw)
    n = 2000
    ref = base.sample_sigma(n, torch.Generator().manual_seed(0))
    sigma = half.sample_sigma(n, torch.Generator().manual_seed(0))
    k = GEO.frames_per_chunk
    clean = (sigma[:, :k] == 0).all(1)
    assert abs(clean.float().mean().item() - 0.5) < 0.05  # binomial sd 0.011
    # Drawn last: every other level is the one of fraction 0, and only the first chunk is ever clean.
    assert torch.equal(sigma[~clean], ref[~clean]) and torch.equal(sigma[clean, k:], ref[clean, k:])
    assert (sigma[:, k:] > 0).all()
    # The loss is the mean squared error over the noisy frames only: OFFSET[f]^2 of frames k.. (uniform weight;
    # the clean frames' prediction, NaN here since x_t = 0 at sigma 0, does not enter).
    m, batch = module("bidirectional", batch=8, clean_prefix_fraction=1.0)
    loss, logs = m.flow_matching_loss(batch, 0)
    assert m.model.calls[0]["timestep"].shape == (8, GEO.num_frames)
    assert (m.model.calls[0]["timestep"][:, :k] == 0).all()
    expected = float((OFFSET[k:] ** 2).mean())
    assert loss.item() == pytest.approx(expected) and logs["flow_mse"].item() == pytest.approx(expected)
    # A one-frame prefix (clean_prefix_frames 1): only frame 0 is clean and left out.
    m, batch = module("bidirectional", batch=8, clean_prefix_fraction=1.0, clean_prefix_frames=1)
    loss, _ = m.flow_matching_loss(batch, 0)
    t = m.model.calls[0]["timestep"]
    assert (t[:, 0] == 0).all() and (t[:, 1:] > 0).all()
    assert loss.item() == pytest.approx(float((OFFSET[1:] ** 2).mean()))


def test_teacher_only_options_are_checked():
    with pytest.raises(ValueError, match="frame_level_fraction is a teacher option"):
        module("block_causal", frame_level_fraction=0.5)
    with pytest.raises(ValueError, match=r"frame_level_fraction must be in \[0, 1\]"):
        module("bidirectional", frame_level_fraction=1.5)
    with pytest.raises(ValueError, match="clean_prefix_fraction is a teacher option"):
        module("teacher_forcing", clean_prefix_fraction=0.5)
    with pytest.raises(ValueError, match=r"clean_prefix_fraction must be in \[0, 1\]"):
        module("bidirectional", clean_prefix_fraction=-0.1)
    for frames in (0, GEO.num_frames):
        with pytest.raises(ValueError, match=r"clean_prefix_frames must be in \[1, num_frames\)"):
            module("bidirectional", clean_prefix_fraction=0.5, clean_prefix_frames=frames)
    with pytest.raises(ValueError, match="teacher option"):
        module("block_causal", sigma_sampling="logit_normal")
    with pytest.raises(ValueError, match="sigma_sampling must be grid or logit_normal"):
        module("bidirectional", sigma_sampling="uniform")
    with pytest.raises(ValueError, match="logit_std must be positive"):
        module("bidirectional", sigma_sampling="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\]"):
        module("bidirectional", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="lr_decay_steps must be >= 0"):
        module("bidirectional", lr_decay_steps=-1)
