import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import (
    generate_latents,
    last_window_start,
    sample_exit_steps,
    self_forcing_rollout,
)
from sfvideo.diffusion.schedule import FlowMatchSchedule

B, C, H, W = 2, 3, 2, 2
F_CHUNK = 2
SIGMAS = FlowMatchSchedule().step_sigmas([1000, 750, 500, 250])  # 1, .9375, .8333, .625


class MockCache:
    """Stand-in KV cache: one slot per chunk start frame; a call at the same start_frame overwrites it."""

    def __init__(self):
        self.slots = {}


class MockCausalModel(nn.Module):
    """Records every call; flow = w * x + 0.1 * mean of the cached earlier chunks (so context matters)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def forward(self, x, timestep, context, *, kv_cache, start_frame, frames_per_chunk, attention):
        assert attention == "block_causal" and frames_per_chunk == x.shape[1]
        earlier = [v[0] for k, v in sorted(kv_cache.slots.items()) if k < start_frame]
        ctx = torch.stack(earlier).mean() if earlier else torch.zeros(())
        flow = self.w * x + 0.1 * ctx + 0.01 * context.mean()
        kv_cache.slots[start_frame] = (x.detach().clone(), timestep.clone())
        self.calls.append(
            {
                "grad": torch.is_grad_enabled(),
                "timestep": timestep.clone(),
                "start_frame": start_frame,
                "x": x.detach().clone(),
                "flow": flow.detach().clone(),
            }
        )
        return flow


def setup(num_chunks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, num_chunks * F_CHUNK, C, H, W, generator=g)
    context = torch.randn(B, 4, 5, generator=g)
    model = MockCausalModel()
    return model, Denoiser(model), noise, context


def run(exit_steps, *, num_chunks=3, **kw):
    model, den, noise, context = setup(num_chunks)
    kw.setdefault("noise_generator", torch.Generator().manual_seed(123))
    res = self_forcing_rollout(
        den,
        noise,
        context,
        step_sigmas=SIGMAS,
        frames_per_chunk=F_CHUNK,
        kv_cache=MockCache(),
        exit_steps=exit_steps,
        **kw,
    )
    return model, res, noise


def x0_of(call):
    sigma = call["timestep"][0, 0] / 1000
    return call["x"] - sigma * call["flow"]


def test_call_counts_grad_modes_timesteps_and_start_frames():
    exits = [0, 3, 1]
    model, res, _ = run(exits, start_frame=10)
    assert res.num_calls == sum(e + 2 for e in exits) == len(model.calls) == 10
    assert res.num_grad_calls == 3
    pos = 0
    for i, e in enumerate(exits):
        chunk_calls = model.calls[pos : pos + e + 2]
        pos += e + 2
        assert all(c["start_frame"] == 10 + i * F_CHUNK for c in chunk_calls)
        # Only the exit-step call (index e) runs with gradient.
        assert [c["grad"] for c in chunk_calls] == [j == e for j in range(e + 2)]
        for j, c in enumerate(chunk_calls[: e + 1]):
            assert c["timestep"].shape == (B, F_CHUNK)
            torch.testing.assert_close(c["timestep"], torch.full((B, F_CHUNK), SIGMAS[j].item() * 1000))
        # Refresh: sigma = context_sigma = 0, input = the chunk's (detached) output.
        refresh = chunk_calls[-1]
        assert torch.all(refresh["timestep"] == 0)
        torch.testing.assert_close(refresh["x"], res.x0[:, i * F_CHUNK : (i + 1) * F_CHUNK].detach())
    assert res.exit_steps == exits
    torch.testing.assert_close(res.exit_sigmas, SIGMAS[exits])
    assert res.grad_frames.all()
    # The output carries gradient to the generator parameters.
    assert res.x0.requires_grad
    res.x0.sum().backward()
    assert model.w.grad is not None and model.w.grad != 0


def test_first_step_uses_initial_noise_and_renoise_uses_fresh_noise():
    exits = [2, 2]
    model, res, noise = run(exits, num_chunks=2)
    torch.testing.assert_close(model.calls[0]["x"], noise[:, :F_CHUNK])
    torch.testing.assert_close(model.calls[4]["x"], noise[:, F_CHUNK:])
    # x_1 = (1 - s1) x0_hat_0 + s1 eps with eps the first draw of an identically seeded generator.
    s1 = SIGMAS[1].item()
    eps = (model.calls[1]["x"] - (1 - s1) * x0_of(model.calls[0])) / s1
    ref = torch.Generator().manual_seed(123)
    expected_eps = torch.randn(B, F_CHUNK, C, H, W, generator=ref)
    torch.testing.assert_close(eps, expected_eps, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps, noise[:, :F_CHUNK], atol=0.1)
    s2 = SIGMAS[2].item()
    eps2 = (model.calls[2]["x"] - (1 - s2) * x0_of(model.calls[1])) / s2
    torch.testing.assert_close(eps2, torch.randn(B, F_CHUNK, C, H, W, generator=ref), rtol=1e-4, atol=1e-4)


def test_context_sigma_noises_the_refresh():
    model, res, _ = run([1, 1], num_chunks=2, context_sigma=0.1)
    refresh = model.calls[2]
    torch.testing.assert_close(refresh["timestep"], torch.full((B, F_CHUNK), 100.0))
    out = res.x0[:, :F_CHUNK].detach()
    eps = (refresh["x"] - 0.9 * out) / 0.1
    assert eps.abs().max() > 0.05 and eps.std().item() == pytest.approx(1.0, abs=0.5)


def test_cache_ends_with_refreshed_clean_context():
    model, res, _ = run([3, 0, 2])
    cache_slots = {}
    for c in model.calls:
        cache_slots[c["start_frame"]] = c
    for i, frame in enumerate(sorted(cache_slots)):
        assert torch.all(cache_slots[frame]["timestep"] == 0)
        torch.testing.assert_close(cache_slots[frame]["x"], res.x0[:, i * F_CHUNK : (i + 1) * F_CHUNK].detach())


def test_refresh_last_false_skips_one_call():
    model, res, _ = run([1, 1, 1], refresh_last=False)
    assert res.num_calls == 3 * 3 - 1 == len(model.calls)
    assert model.calls[-1]["grad"]  # last call is the last chunk's exit step


def test_grad_from_frame_restricts_gradient_window():
    model, res, _ = run([1, 1, 1], grad_from_frame=2 * F_CHUNK)
    assert res.num_grad_calls == 1
    assert res.grad_frames.tolist() == [False] * 4 + [True] * 2
    assert sum(c["grad"] for c in model.calls) == 1
    assert [c["start_frame"] for c in model.calls if c["grad"]] == [2 * F_CHUNK]
    assert last_window_start(num_frames=24, window_frames=21) == 3
    assert last_window_start(num_frames=21, window_frames=21) == 0
    with pytest.raises(ValueError, match="grad_from_frame"):
        run([1, 1, 1], grad_from_frame=1)


def test_no_grad_modes():
    model, res, _ = run([1, 2, 0], grad_enabled=False)
    assert res.num_grad_calls == 0 and not any(c["grad"] for c in model.calls)
    assert not res.x0.requires_grad and not res.grad_frames.any()
    # An outer no_grad (the critic step's rollout) is never overridden.
    with torch.no_grad():
        model, res, _ = run([1, 2, 0])
    assert res.num_grad_calls == 0 and not any(c["grad"] for c in model.calls)


def test_generate_latents_exits_at_last_step_without_grad():
    model, den, noise, context = setup(3)
    x0 = generate_latents(
        den,
        noise,
        context,
        step_sigmas=SIGMAS,
        frames_per_chunk=F_CHUNK,
        kv_cache=MockCache(),
        noise_generator=torch.Generator().manual_seed(5),
    )
    assert len(model.calls) == 3 * (len(SIGMAS) + 1)
    assert not any(c["grad"] for c in model.calls) and not x0.requires_grad
    _, den2, _, _ = setup(3)
    ref = self_forcing_rollout(
        den2,
        noise,
        context,
        step_sigmas=SIGMAS,
        frames_per_chunk=F_CHUNK,
        kv_cache=MockCache(),
        exit_steps=[3, 3, 3],
        grad_enabled=False,
        noise_generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(x0, ref.x0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="exit_steps"):
        run([1, 1])
    with pytest.raises(ValueError, match="exit_steps"):
        run([1, 4, 1])
    model, den, noise, context = setup(3)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        self_forcing_rollout(
            den, noise, context, step_sigmas=SIGMAS, frames_per_chunk=4, kv_cache=MockCache(), exit_steps=[0]
        )


def test_sample_exit_steps():
    a = sample_exit_steps(7, 4, torch.Generator().manual_seed(11))
    b = sample_exit_steps(7, 4, torch.Generator().manual_seed(11))
    assert a == b and len(set(a)) == 1 and all(isinstance(e, int) for e in a)
    per_chunk = [sample_exit_steps(7, 4, torch.Generator().manual_seed(s), same_across_chunks=False) for s in range(50)]
    assert all(0 <= e < 4 for row in per_chunk for e in row)
    assert {e for row in per_chunk for e in row} == {0, 1, 2, 3}
    assert any(len(set(row)) > 1 for row in per_chunk)
    # The shared exit is the first per-chunk draw of the same stream.
    assert a[0] == sample_exit_steps(7, 4, torch.Generator().manual_seed(11), same_across_chunks=False)[0]
    shared = [sample_exit_steps(7, 4, torch.Generator().manual_seed(s))[0] for s in range(50)]
    assert set(shared) == {0, 1, 2, 3}
    assert sample_exit_steps(7, 4, torch.Generator().manual_seed(1), last_step_only=True) == [3] * 7
