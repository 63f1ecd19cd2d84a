import pytest
import torch

from sfvideo.diffusion.schedule import (
    FlowMatchSchedule,
    add_noise,
    flow_from_x0,
    flow_target,
    noise_from_x0,
    sigma_to_timestep,
    timestep_to_sigma,
    x0_from_flow,
)


def test_sigma_grid_endpoints_and_shift():
    sched = FlowMatchSchedule()
    sig = sched.sigmas()
    assert sig.shape == (1000,)
    assert sig[0].item() == 1.0
    # Last entry is shift(1/1000) = 5e-3 / 1.004, never 0 (the trailing 0 is dropped).
    assert sig[-1].item() == pytest.approx(5 * 0.001 / (1 + 4 * 0.001))
    assert torch.all(sig[1:] < sig[:-1])
    assert sched.timesteps()[0].item() == 1000.0
    # Hand value: sigma 0.5 -> 2.5 / 3.
    assert sched.shift_sigma(0.5) == pytest.approx(2.5 / 3)
    assert FlowMatchSchedule(shift=1.0).shift_sigma(0.3) == pytest.approx(0.3)


def test_warp_matches_official_list():
    sched = FlowMatchSchedule(shift=5.0)
    warped = sched.warp([1000, 750, 500, 250])
    torch.testing.assert_close(warped, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))
    assert sched.warp([0]).item() == 0.0
    sig = sched.step_sigmas([1000, 750, 500, 250])
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625]))
    # CausVid style, unwarped.
    torch.testing.assert_close(sched.step_sigmas([1000, 757, 522], warp=False), torch.tensor([1.0, 0.757, 0.522]))
    with pytest.raises(ValueError, match="steps"):
        sched.warp([1001])


def test_sample_dmd_sigma_range_and_determinism():
    sched = FlowMatchSchedule()
    s1 = sched.sample_dmd_sigma(4096, torch.Generator().manual_seed(3))
    s2 = sched.sample_dmd_sigma(4096, torch.Generator().manual_seed(3))
    s3 = sched.sample_dmd_sigma(4096, torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert s1.shape == (4096,) and s1.dtype == torch.float32
    assert s1.min() >= 0.02 and s1.max() <= 0.98
    # Both clamps are hit: u = 0 -> 0 -> 0.02; shift(u) > 0.98 for u > 907 (~9% of draws).
    assert (s1 == torch.tensor(0.02)).any() and (s1 == torch.tensor(0.98)).any()
    assert 0.05 < (s1 == torch.tensor(0.98)).float().mean() < 0.14
    # Median sigma ~0.83 (shift(0.5) = 0.833).
    assert s1.median().item() == pytest.approx(2.5 / 3, abs=0.02)
    # Unclamped values lie on the shifted integer grid.
    u = torch.arange(1000, dtype=torch.float64) / 1000
    grid = sched.shift_sigma(u).float()
    inner = s1[(s1 > 0.02) & (s1 < 0.98)]
    assert torch.isclose(inner[:, None], grid[None], atol=1e-6).any(dim=1).all()


def test_add_noise_hand_values_and_broadcast():
    x0 = torch.full((2, 3, 1, 2, 2), 2.0)
    noise = torch.full_like(x0, -1.0)
    xt = add_noise(x0, noise, torch.tensor([0.25, 1.0]))
    assert torch.allclose(xt[0], torch.tensor(0.75 * 2 - 0.25))
    assert torch.allclose(xt[1], torch.tensor(-1.0))
    per_frame = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    xt = add_noise(x0, noise, per_frame)
    assert torch.allclose(xt[:, 0], torch.tensor(2.0))
    assert torch.allclose(xt[:, 1], torch.tensor(0.5))
    assert torch.allclose(xt[:, 2], torch.tensor(-1.0))
    assert torch.allclose(add_noise(x0, noise, 0.5), torch.tensor(0.5))
    with pytest.raises(ValueError, match="sigma"):
        add_noise(x0, noise, torch.ones(3))  # batch is 2


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 0.99]], dtype=torch.float64)
    xt = add_noise(x0, noise, sigma)
    flow = flow_target(x0, noise)
    torch.testing.assert_close(x0_from_flow(xt, flow, sigma), x0)
    torch.testing.assert_close(flow_from_x0(xt, x0, sigma), flow)
    torch.testing.assert_close(noise_from_x0(xt, x0, sigma), noise)
    assert sigma_to_timestep(0.25) == 250.0 and timestep_to_sigma(625.0) == 0.625


def test_dtype_follows_latent():
    x0 = torch.randn(1, 2, 1, 2, 2).bfloat16()
    xt = add_noise(x0, torch.randn_like(x0), torch.tensor([0.3]))
    assert xt.dtype == torch.bfloat16
