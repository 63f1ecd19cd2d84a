import math

import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import (
    euler_sample,
    nearest_grid_indices,
    ode_sigmas,
    refine_sigmas,
    sample_sigmas,
)
from sfvideo.diffusion.schedule import FlowMatchSchedule

STD = 0.5  # data std s


class GaussianFlowModel(nn.Module):
    """Exact flow of data x0 ~ N(mu, s^2) elementwise, mu = context[:, 0, 0] (so the prompt matters).

    E[x0 | xt] = mu + (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2) (xt - (1 - sigma) mu); flow = (xt - E) / sigma.
    """

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timestep, context, **kwargs):
        self.calls.append({"batch": x.shape[0], "timestep": timestep.clone(), "kwargs": kwargs})
        sigma = (timestep.double() / 1000).view(-1, 1, 1, 1, 1)
        mu = context[:, 0, 0].double().view(-1, 1, 1, 1, 1)
        a = 1 - sigma
        x0 = mu + a * STD**2 / (a**2 * STD**2 + sigma**2) * (x.double() - a * mu)
        return ((x.double() - x0) / sigma).to(x.dtype)


def marginal(noise, mu, sigma):
    """Exact ODE state at sigma from `noise` at sigma 1: (1 - sigma) mu + sqrt((1 - sigma)^2 s^2 + sigma^2) eps."""
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * STD**2 + sigma**2) * noise


def make(batch=4, mus=(0.0, 1.5, -0.7, 0.3), seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, 4, 16, 16, generator=g)
    context = torch.zeros(batch, 2, 3)
    context[:, 0, 0] = torch.tensor(mus[:batch])
    return GaussianFlowModel(), noise, context


def test_sample_sigmas_is_shifted_uniform_grid_ending_at_zero():
    sched = FlowMatchSchedule(shift=5.0)
    s = sample_sigmas(sched, 10)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(s, sched.shift_sigma(torch.linspace(1, 0, 11, dtype=torch.float64)))
    # The first n points are the scheduler's set_timesteps(n) sigmas: the 1000-step training grid at n = 1000.
    torch.testing.assert_close(sample_sigmas(sched, 1000)[:-1], sched.sigmas())


def test_official_48_step_grid_holds_the_shift8_warped_steps():
    """Notes §5: states [0, 12, 24, 36] of 48 steps at shift 8 are [1000, 750, 500, 250] warped at shift 8."""
    sched = FlowMatchSchedule(shift=8.0)
    grid = sample_sigmas(sched, 48)
    steps = sched.step_sigmas([1000, 750, 500, 250], warp=True, dtype=torch.float64)
    assert nearest_grid_indices(grid, steps) == [0, 12, 24, 36]
    torch.testing.assert_close(grid[[0, 12, 24, 36]], steps)
    # Already on the grid: refinement changes nothing.
    torch.testing.assert_close(ode_sigmas(sched, 48, include=steps), grid)


def test_refine_inserts_missing_sigmas():
    grid = sample_sigmas(FlowMatchSchedule(shift=8.0), 48)
    steps = FlowMatchSchedule(shift=5.0).step_sigmas([1000, 750, 500, 250], dtype=torch.float64)
    refined = refine_sigmas(grid, steps)
    assert bool((refined[1:] < refined[:-1]).all()) and refined[-1] == 0
    assert len(refined) == len(grid) + 3  # 1.0 is already a grid point; .9375, .8333, .625 are not
    for s in steps:
        assert (refined - s).abs().min() == 0
    for s in grid:
        assert (refined - s).abs().min() == 0
    with pytest.raises(ValueError, match="include must lie"):
        refine_sigmas(grid, [1.5])


def test_euler_maps_noise_to_the_data_distribution():
    model, noise, context = make()
    sched = FlowMatchSchedule(shift=5.0)
    mu = context[:, 0, 0].view(-1, 1, 1, 1, 1)
    exact = mu + STD * noise  # the exact probability-flow map of a Gaussian, elementwise
    errors = {}
    for n in (100, 400):
        x0 = euler_sample(Denoiser(model), noise, context, sigmas=sample_sigmas(sched, n)).x0
        errors[n] = (x0 - exact).abs().max().item()
    assert errors[400] < 0.03
    # Euler is first order: 4x the steps, about 1/4 of the error.
    assert 3.5 < errors[100] / errors[400] < 4.5
    # Statistics per sample match N(mu, s^2).
    for b in range(noise.shape[0]):
        assert abs(x0[b].mean().item() - mu[b].item()) < 0.02
        assert abs(x0[b].std().item() - STD) < 0.02
    assert len(model.calls) == 500


@pytest.mark.parametrize("shift", [8.0, 5.0])
def test_recorded_states_are_at_exactly_the_requested_sigmas(shift):
    model, noise, context = make()
    steps = FlowMatchSchedule(shift=shift).step_sigmas([1000, 750, 500, 250], dtype=torch.float64)
    record = torch.cat([steps, torch.zeros(1, dtype=torch.float64)])
    grid = ode_sigmas(FlowMatchSchedule(shift=8.0), 48, include=record)
    seen = {}
    res = euler_sample(
        Denoiser(model), noise, context, sigmas=grid, record_sigmas=record,
        callback=lambda i, s, x, x0: seen.__setitem__(i + 1, x.clone()),
    )  # fmt: skip
    assert res.trajectory.shape == (noise.shape[0], 5, *noise.shape[1:])
    torch.testing.assert_close(res.trajectory_sigmas, record, rtol=0, atol=0)
    torch.testing.assert_close(res.trajectory[:, 0], noise, rtol=0, atol=0)  # sigma 1 = the initial noise
    torch.testing.assert_close(res.trajectory[:, -1], res.x0, rtol=0, atol=0)  # sigma 0 = the final sample
    idx = nearest_grid_indices(grid, record)
    mu = context[:, 0, 0].view(-1, 1, 1, 1, 1)
    for k, (i, s) in enumerate(zip(idx, record.tolist())):
        if i > 0:
            torch.testing.assert_close(res.trajectory[:, k], seen[i])
        if s > 0:  # high-noise states are accurate after few steps; the final one carries the full Euler error
            torch.testing.assert_close(res.trajectory[:, k], marginal(noise, mu, s), atol=2e-2, rtol=0)


def test_guidance_zero_equals_no_uncond_and_skips_the_uncond_call():
    model, noise, context = make()
    uncond = torch.full((1, 2, 3), 9.0)
    grid = sample_sigmas(FlowMatchSchedule(), 6)
    plain = euler_sample(Denoiser(model), noise, context, sigmas=grid).x0
    n_plain = len(model.calls)
    with_uncond = euler_sample(Denoiser(model), noise, context, sigmas=grid, uncond=uncond, guidance_scale=0.0).x0
    assert torch.equal(plain, with_uncond)
    assert len(model.calls) == 2 * n_plain and all(c["batch"] == noise.shape[0] for c in model.calls)
    standard_one = euler_sample(
        Denoiser(model), noise, context, sigmas=grid, uncond=uncond, guidance_scale=1.0, guidance="standard"
    ).x0
    assert torch.equal(plain, standard_one)


def test_official_and_standard_guidance_differ_by_one():
    model, noise, context = make()
    uncond = torch.zeros(1, 2, 3)  # unconditional mean 0
    grid = sample_sigmas(FlowMatchSchedule(), 8)
    official = euler_sample(Denoiser(model), noise, context, sigmas=grid, uncond=uncond, guidance_scale=3.0).x0
    standard = euler_sample(
        Denoiser(model), noise, context, sigmas=grid, uncond=uncond, guidance_scale=4.0, guidance="standard"
    ).x0
    torch.testing.assert_close(official, standard)
    plain = euler_sample(Denoiser(model), noise, context, sigmas=grid).x0
    assert (official - plain).abs().max() > 0.1  # guidance does something
    # Guided calls run cond and uncond as one 2B batch.
    assert model.calls[0]["batch"] == 2 * noise.shape[0]


def test_model_kwargs_reach_the_model_and_bad_input_is_rejected():
    model, noise, context = make()
    grid = sample_sigmas(FlowMatchSchedule(), 2)
    euler_sample(Denoiser(model), noise, context, sigmas=grid, model_kwargs={"attention": "bidirectional"})
    assert model.calls[-1]["kwargs"] == {"attention": "bidirectional"}
    with pytest.raises(ValueError, match="needs uncond"):
        euler_sample(Denoiser(model), noise, context, sigmas=grid, guidance_scale=2.0)
    with pytest.raises(ValueError, match="end at 0"):
        euler_sample(Denoiser(model), noise, context, sigmas=grid[:-1])
    with pytest.raises(ValueError, match="descending"):
        euler_sample(Denoiser(model), noise, context, sigmas=grid.flip(0))
    with pytest.raises(ValueError, match="guidance must be"):
        euler_sample(Denoiser(model), noise, context, sigmas=grid, guidance="cfg")


def test_bf16_noise_keeps_an_fp32_state():
    model, noise, context = make()
    grid = sample_sigmas(FlowMatchSchedule(), 50)
    ref = euler_sample(Denoiser(model), noise, context, sigmas=grid).x0
    res = euler_sample(Denoiser(model), noise.bfloat16(), context, sigmas=grid).x0
    assert res.dtype == torch.bfloat16
    torch.testing.assert_close(res.float(), ref, atol=5e-2, rtol=0)
