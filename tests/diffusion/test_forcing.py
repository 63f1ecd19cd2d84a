"""TF/DF training pieces (diffusion/forcing.py, losses/flow.py, FlowMatchSchedule.training_weight) and the
CausVid-style DF/TF generator input."""

from __future__ import annotations

import math

import pytest
import torch

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.forcing import (
    causvid_generator_input,
    context_augmentation_sigmas,
    drop_captions,
    forcing_batch,
    forcing_forward,
    sample_chunk_indices,
    sample_forcing_sigmas,
)
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.losses.flow import weighted_flow_loss


@pytest.mark.parametrize("shift", [5.0, 1.0])
def test_training_weights_against_a_hand_computation(shift):
    """utils/scheduler.py, set_timesteps(1000, training=True): y = exp(-2 ((t - 500) / 1000)^2) over the grid
    timesteps t_i = 1000 shift(1 - i/1000); w = (y - min y) 1000 / sum (y - min y)."""
    sched = FlowMatchSchedule(shift=shift)
    ts = []
    for i in range(1000):
        s = 1 - i / 1000
        ts.append(1000 * shift * s / (1 + (shift - 1) * s))
    y = [math.exp(-2 * ((t - 500) / 1000) ** 2) for t in ts]
    lo = min(y)
    total = sum(v - lo for v in y)
    expected = torch.tensor([(v - lo) * 1000 / total for v in y], dtype=torch.float64)
    w = sched.training_weights()
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert w[0].item() == 0.0  # t = 1000 (pure noise) has the lowest bump value
    peak = int(w.argmax())
    assert abs(ts[peak] - 500) <= abs(ts[peak + 1] - ts[peak])  # the bump peaks at the grid point nearest t = 500
    # Lookup: the nearest grid point's weight, for on-grid and off-grid sigmas of any shape.
    grid = sched.sigmas()
    sig = torch.stack([grid[[0, 10, 500]], grid[[999, 400, 3]] + 1e-9]).float()
    torch.testing.assert_close(sched.training_weight(sig), w[torch.tensor([[0, 10, 500], [999, 400, 3]])].float())


def test_weighted_flow_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    weight = torch.rand(2, 3, generator=g)
    loss, logs = weighted_flow_loss(pred, target, weight)
    expected = sum(
        weight[b, f] * ((pred[b, f] - target[b, f]) ** 2).mean() for b in range(2) for f in range(3)
    ) / 6  # fmt: skip
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["flow_mse"], ((pred - target) ** 2).mean())
    with pytest.raises(ValueError, match="weight"):
        weighted_flow_loss(pred, target, weight[:, :2])


def test_weighted_flow_loss_mask_averages_over_the_kept_frames_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    weight = torch.rand(2, 3, generator=g)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    loss, logs = weighted_flow_loss(pred, target, weight, mask)
    kept = [(b, f) for b in range(2) for f in range(3) if mask[b, f]]
    per = {bf: ((pred[bf] - target[bf]) ** 2).mean() for bf in kept}
    torch.testing.assert_close(loss, sum(weight[bf] * per[bf] for bf in kept) / len(kept))
    torch.testing.assert_close(logs["flow_mse"], sum(per.values()) / len(kept))
    # Whatever the prediction of a masked frame, neither output moves.
    pred2 = pred.clone()
    pred2[0, 0] += 100.0
    assert torch.equal(weighted_flow_loss(pred2, target, weight, mask)[0], loss)
    with pytest.raises(ValueError, match="mask"):
        weighted_flow_loss(pred, target, weight, mask[:, :2])


def test_chunk_indices_are_constant_per_chunk_and_uniform():
    gen = torch.Generator().manual_seed(0)
    idx = sample_chunk_indices(2000, 6, 3, 5, gen)
    assert idx.shape == (2000, 6) and idx.dtype == torch.long
    assert torch.equal(idx[:, :3], idx[:, :1].expand(-1, 3)) and torch.equal(idx[:, 3:], idx[:, 3:4].expand(-1, 3))
    counts = torch.bincount(idx[:, ::3].flatten(), minlength=5).double()
    assert counts.min() > 0.9 * 800 and counts.max() < 1.1 * 800  # 4000 draws over 5 values
    assert not torch.equal(idx[:, 0], idx[:, 3])  # chunks draw independently
    # Same seed, same draws (rank-shared when seeded alike).
    assert torch.equal(idx, sample_chunk_indices(2000, 6, 3, 5, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="frames_per_chunk=4"):
        sample_chunk_indices(1, 6, 4, 5, gen)


def test_forcing_sigmas_lie_on_the_training_grid():
    sched = FlowMatchSchedule(shift=5.0)
    sig = sample_forcing_sigmas(sched, 64, 6, 2, torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = sched.sigmas()
    assert (sig.unsqueeze(-1) - grid).abs().min(-1).values.max() == 0
    assert sig.max() <= 1 and sig.min() > 0


@pytest.mark.parametrize("indexing", ["official", "low_noise"])
def test_context_augmentation_distribution(indexing):
    sched = FlowMatchSchedule(shift=5.0)
    grid = sched.sigmas()
    sig = context_augmentation_sigmas(sched, 4000, 2, 1, 50, torch.Generator().manual_seed(2), indexing=indexing,
                                      dtype=torch.float64)  # fmt: skip
    idx = (sig.unsqueeze(-1) - grid).abs().argmin(-1)
    if indexing == "official":
        # model/diffusion.py indexes the descending grid with randint(0, M): the M noisiest levels.
        allowed = torch.arange(0, 50)
        assert sig.min() >= grid[49] and sig.max() == 1.0
    else:
        allowed = torch.nonzero(grid * 1000 < 50).flatten()  # levels with timestep below 50
        assert (sig * 1000).max() < 50
    counts = torch.bincount(idx.flatten() - allowed[0], minlength=len(allowed)).double()
    assert len(counts) == len(allowed) and counts.min() > 0  # every allowed level occurs, nothing else
    expected = idx.numel() / len(allowed)
    assert counts.max() < expected + 6 * math.sqrt(expected)  # uniform up to 6 binomial standard deviations
    zero = context_augmentation_sigmas(sched, 3, 2, 1, 0, None)
    assert torch.equal(zero, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="noise_augmentation_max_timestep"):
        context_augmentation_sigmas(sched, 3, 2, 1, 1001, None)


@pytest.mark.parametrize("teacher_forcing,aug", [(False, 0), (True, 0), (True, 100)])
def test_forcing_batch(teacher_forcing, aug):
    sched = FlowMatchSchedule(shift=5.0)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 2, 2, 2, generator=g), torch.randn(3, 4, 2, 2, 2, generator=g)
    batch = forcing_batch(x0, noise, schedule=sched, frames_per_chunk=2, generator=torch.Generator().manual_seed(4),
                          teacher_forcing=teacher_forcing, augmentation_max_timestep=aug)  # fmt: skip
    s = batch.sigma.view(3, 4, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - s) * x0 + s * noise)
    assert torch.equal(batch.target, noise - x0)
    torch.testing.assert_close(batch.weight, sched.training_weight(batch.sigma))
    if not teacher_forcing:
        assert batch.clean_x is None and batch.clean_sigma is None
    elif aug == 0:
        assert batch.clean_x is x0 and torch.equal(batch.clean_sigma, torch.zeros(3, 4))
    else:
        # Officially the same noise tensor noises the input and the context.
        a = batch.clean_sigma.view(3, 4, 1, 1, 1)
        assert (batch.clean_sigma > 0).all() and torch.equal(batch.clean_sigma[:, ::2], batch.clean_sigma[:, 1::2])
        torch.testing.assert_close(batch.clean_x, (1 - a) * x0 + a * noise)


def test_forcing_batch_takes_caller_drawn_levels():
    """A caller's levels (a training module's own noise distribution) replace the default draw, and the context
    levels are then the generator's next draws, as after the default one."""
    sched = FlowMatchSchedule(shift=5.0)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 2, 2, 2, generator=g), torch.randn(2, 4, 2, 2, 2, generator=g)
    kw = dict(schedule=sched, frames_per_chunk=2, teacher_forcing=True, augmentation_max_timestep=50)
    default = forcing_batch(x0, noise, generator=torch.Generator().manual_seed(4), **kw)
    g = torch.Generator().manual_seed(4)
    drawn = sample_forcing_sigmas(sched, 2, 4, 2, g)
    given = forcing_batch(x0, noise, generator=g, sigma=drawn, **kw)
    assert torch.equal(given.sigma, default.sigma) and torch.equal(given.clean_sigma, default.clean_sigma)
    half = torch.full((2, 4), 0.5)
    mine = forcing_batch(x0, noise, generator=torch.Generator().manual_seed(4), sigma=half, **kw)
    assert torch.equal(mine.sigma, half) and torch.equal(mine.noisy, 0.5 * x0 + 0.5 * noise)
    with pytest.raises(ValueError, match=r"sigma must be \(B, F\)"):
        forcing_batch(x0, noise, generator=None, sigma=torch.ones(2), **kw)


def test_drop_captions():
    g = torch.Generator().manual_seed(5)
    ctx, null = torch.randn(4000, 3, 2, generator=g), torch.randn(1, 3, 2, generator=g)
    out, dropped = drop_captions(ctx, null, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(out[~dropped], ctx[~dropped])
    assert abs(dropped.double().mean().item() - 0.1) < 6 * math.sqrt(0.09 / 4000)
    assert torch.equal(drop_captions(ctx, null, 0.0, None)[0], ctx)
    assert drop_captions(ctx, null, 1.0, None)[1].all()
    with pytest.raises(ValueError, match="probability"):
        drop_captions(ctx, null, 1.5, None)


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causvid_input_noises_data_at_a_per_chunk_step(teacher_forcing):
    steps = torch.tensor([1.0, 0.757, 0.522, 0.0])  # CausVid's [1000, 757, 522, 0], unwarped
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(500, 6, 2, 2, 2, generator=g), torch.randn(500, 6, 2, 2, 2, generator=g)
    inp = causvid_generator_input(
        x0, noise, step_sigmas=steps, frames_per_chunk=3, generator=torch.Generator().manual_seed(8),
        teacher_forcing=teacher_forcing,
    )  # fmt: skip
    assert torch.equal(inp.sigma, steps[inp.index])
    assert torch.equal(inp.index[:, :3], inp.index[:, :1].expand(-1, 3))
    s = inp.sigma.view(500, 6, 1, 1, 1)
    torch.testing.assert_close(inp.noisy, (1 - s) * x0 + s * noise)
    clean = inp.index == 3
    assert torch.equal(inp.noisy[clean], x0[clean])  # the 0 entry gives the data latent itself
    counts = torch.bincount(inp.index[:, ::3].flatten(), minlength=4).double()
    assert counts.min() > 0.85 * 250  # 1000 draws over 4 entries
    assert (inp.clean_x is x0) if teacher_forcing else (inp.clean_x is None)


class KwargsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kwargs = None

    def forward(self, x, timestep, context, **kwargs):
        self.kwargs = {"timestep": timestep, **kwargs}
        return 0.5 * x


def test_forcing_forward_masks():
    model = KwargsModel()
    den = Denoiser(model)
    x, sig, ctx = torch.randn(2, 4, 1, 2, 2), torch.full((2, 4), 0.5), torch.zeros(2, 1, 1)
    x0 = forcing_forward(den, x, sig, ctx, frames_per_chunk=2)
    assert model.kwargs["attention"] == "block_causal" and model.kwargs["frames_per_chunk"] == 2
    torch.testing.assert_close(x0, x - 0.5 * 0.5 * x)
    clean = torch.randn_like(x)
    flow = forcing_forward(den, x, sig, ctx, frames_per_chunk=2, clean_x=clean, clean_sigma=torch.full((2, 4), 0.1),
                           flow=True)  # fmt: skip
    assert model.kwargs["attention"] == "teacher_forcing" and model.kwargs["clean_x"] is clean
    torch.testing.assert_close(model.kwargs["clean_timestep"], torch.full((2, 4), 100.0))
    torch.testing.assert_close(flow, 0.5 * x)
