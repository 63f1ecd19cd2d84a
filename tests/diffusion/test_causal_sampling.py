"""Many-step causal CFG sampling (diffusion/causal_sampling.py): one chunk equals the bidirectional Euler sampler,
chunked two-cache sampling equals a masked block-causal reference, and UniPC is Wan's scheduler via diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfvideo.diffusion.causal_sampling import causal_cfg_sample, make_flow_solver, unipc_base_sigmas
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import euler_sample, sample_sigmas
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.nn.wan import FLAVORS, WanTransformer

H, W = 4, 6
TPF = (H // 2) * (W // 2)
SCHED = FlowMatchSchedule(shift=3.0)


def make(seed: int = 0) -> WanTransformer:
    torch.manual_seed(seed)
    model = WanTransformer(**FLAVORS["debug"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


class Recorder(torch.nn.Module):
    """Wraps a model and records (timestep, cache, start_frame) of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x, timestep, context, **kw):
        self.calls.append((timestep.clone(), kw.get("kv_cache"), kw.get("start_frame")))
        return self.model(x, timestep, context, **kw)


def data(model, frames=4, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, model.config.in_channels, H, W, generator=g)
    ctx = torch.randn(batch, 5, model.config.text_dim, generator=g)
    uncond = torch.randn(1, 5, model.config.text_dim, generator=g)
    return noise, ctx, uncond


def caches(model, batch, frames):
    return model.new_kv_cache(batch, TPF, frames), model.new_kv_cache(batch, TPF, frames)


@pytest.mark.parametrize("guidance,scale", [("official", 2.0), ("standard", 3.0), ("official", 0.0)])
@torch.no_grad()
def test_one_chunk_covering_the_clip_equals_the_bidirectional_euler_sampler(guidance, scale):
    model = make()
    noise, ctx, uncond = data(model)
    cond_cache, uncond_cache = caches(model, 2, 4)
    got = causal_cfg_sample(
        Denoiser(model), noise, ctx, schedule=SCHED, frames_per_chunk=4, kv_cache=cond_cache, uncond=uncond,
        uncond_kv_cache=uncond_cache, guidance_scale=scale, guidance=guidance, num_steps=6,
    )  # fmt: skip
    ref = euler_sample(
        Denoiser(model), noise, ctx, sigmas=sample_sigmas(SCHED, 6), uncond=uncond, guidance_scale=scale,
        guidance=guidance, model_kwargs={"attention": "bidirectional"},
    ).x0  # fmt: skip
    # Different code paths (cached vs. plain attention, CFG on flow vs. x0, batched vs. two forwards): fp32 rounding.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got - noise).abs().max() > 0.1  # the sampler did move the state


def masked_reference(model, noise, ctx, uncond, fpc, scale, stepper_factory, context_of=lambda out: out):
    """Per chunk and step: a block-causal masked forward on [earlier clean outputs ; current state], earlier frames at
    timestep 0 (what the clean-context refresh caches), cond and uncond each; CFG on the flow; one solver step."""
    den = Denoiser(model)
    b, frames = noise.shape[:2]
    uncond_b = uncond.expand(b, -1, -1)
    done = []
    for lo in range(0, frames, fpc):
        stepper, model_sigmas, step = stepper_factory()
        x = noise[:, lo : lo + fpc].clone()
        for j, ms in enumerate(model_sigmas):
            full = torch.cat([*done, x], dim=1)
            sig = torch.zeros(b, lo + fpc)
            sig[:, lo:] = ms
            kw = dict(attention="block_causal", frames_per_chunk=fpc)
            fc = den.flow(full, sig, ctx, **kw)[:, lo:]
            fu = den.flow(full, sig, uncond_b, **kw)[:, lo:]
            x = step(stepper, j, fc + scale * (fc - fu), x)
        done.append(context_of(x))
    return torch.cat(done, dim=1)


def euler_factory(n):
    sig = sample_sigmas(SCHED, n).tolist()

    def step(_, j, flow, x):
        return x + (sig[j + 1] - sig[j]) * flow

    return lambda: (None, sig[:-1], step)


def unipc_factory(n):
    """diffusers' UniPC on Wan's FlowUniPC grid, set up here independently of the library code."""
    from diffusers import UniPCMultistepScheduler

    def factory():
        s = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=SCHED.shift)  # fmt: skip
        s.set_timesteps(sigmas=np.linspace(0.999, 0.0, n + 1)[:-1])
        return s, [int(t) / 1000 for t in s.timesteps], lambda sch, j, flow, x: sch.step(flow, sch.timesteps[j], x)[0]

    return factory


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@torch.no_grad()
def test_chunked_two_cache_sampling_equals_the_masked_block_causal_reference(solver):
    model = make(1)
    noise, ctx, uncond = data(model, frames=6)
    rec = Recorder(model)
    cond_cache, uncond_cache = caches(model, 2, 6)
    got = causal_cfg_sample(
        Denoiser(rec), noise, ctx, schedule=SCHED, frames_per_chunk=2, kv_cache=cond_cache, uncond=uncond,
        uncond_kv_cache=uncond_cache, guidance_scale=1.5, solver=solver, num_steps=4,
    )  # fmt: skip
    factory = euler_factory(4) if solver == "euler" else unipc_factory(4)
    ref = masked_reference(model, noise, ctx, uncond, 2, 1.5, factory)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # cached vs masked attention: fp32 rounding
    # Per chunk: 4 steps x (cond, uncond) + a refresh of each cache at timestep 0, at the chunk's start frame.
    assert len(rec.calls) == 3 * (2 * 4 + 2)
    per_chunk = rec.calls[:10]
    assert [c[1] for c in per_chunk] == [cond_cache, uncond_cache] * 5
    assert torch.all(per_chunk[-1][0] == 0) and torch.all(per_chunk[-2][0] == 0)
    assert [c[2] for c in rec.calls] == [0] * 10 + [2] * 10 + [4] * 10
    assert cond_cache.frame_ids == uncond_cache.frame_ids == list(range(6))
    # Control: a reference whose context is not the clean outputs differs after the first chunk.
    wrong = masked_reference(model, noise, ctx, uncond, 2, 1.5, factory, context_of=torch.zeros_like)
    assert (wrong[:, 2:] - got[:, 2:]).abs().max() > 1e-3
    # refresh_last=False skips only the final refresh (2 calls): same samples.
    rec.calls.clear()
    again = causal_cfg_sample(
        Denoiser(rec), noise, ctx, schedule=SCHED, frames_per_chunk=2, kv_cache=cond_cache, uncond=uncond,
        uncond_kv_cache=uncond_cache, guidance_scale=1.5, solver=solver, num_steps=4, refresh_last=False,
    )  # fmt: skip
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert len(rec.calls) == 3 * (2 * 4 + 2) - 2


def test_unipc_grid_and_integer_model_timesteps_are_wans():
    """Wan's FlowUniPCMultistepScheduler(shift=1).set_timesteps(n, shift=s): sigmas shift(linspace(1 - 1/N, 0, n+1)
    [:-1]) then 0 (fm_solvers_unipc.py); the model is called at int64(N sigma)."""
    n, shift = 7, 5.0
    solver = make_flow_solver("unipc", FlowMatchSchedule(shift=shift), n)
    base = [0.999 * (1 - i / n) for i in range(n)]
    expected = [shift * s / (1 + (shift - 1) * s) for s in base] + [0.0]
    np.testing.assert_allclose(solver.sigmas, expected, rtol=1e-6, atol=1e-7)  # the scheduler keeps float32
    assert solver.model_sigmas == [math.floor(1000 * np.float32(s)) / 1000 for s in expected[:-1]]
    np.testing.assert_allclose(unipc_base_sigmas(n), base, rtol=1e-12)
    model = Recorder(make())
    noise, ctx, _ = data(model.model, frames=2)
    with torch.no_grad():
        causal_cfg_sample(Denoiser(model), noise, ctx, schedule=FlowMatchSchedule(shift=shift), frames_per_chunk=2,
                          kv_cache=model.model.new_kv_cache(2, TPF, 2), solver="unipc", num_steps=n)  # fmt: skip
    stepped = [c[0][0, 0].item() for c in model.calls[:-1]]
    assert stepped == [round(1000 * s, 3) for s in solver.model_sigmas]


def gaussian_flow(x, sigma, mu=0.7, s=0.5):
    a = 1 - sigma
    return (x - (mu + a * s**2 / (a**2 * s**2 + sigma**2) * (x - a * mu))) / sigma


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_is_higher_order_than_euler_on_the_gaussian_ode(shift):
    """The exact flow map of N(mu, s^2) data from state x at sigma_0 is mu + s (x - (1 - sigma_0) mu) / std(sigma_0)."""
    x_start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for kind in ("euler", "unipc"):
        for n in (20, 40):
            solver = make_flow_solver(kind, FlowMatchSchedule(shift=shift), n)
            s0 = solver.sigmas[0]
            exact = 0.7 + 0.5 * (x_start - (1 - s0) * 0.7) / math.sqrt((1 - s0) ** 2 * 0.25 + s0**2)
            x = x_start.clone()
            for j in range(solver.num_steps):
                x = solver.step(j, gaussian_flow(x, solver.sigmas[j]), x)
            errors[kind, n] = (x - exact).abs().max().item()
    assert 1.7 < errors["euler", 20] / errors["euler", 40] < 2.3  # first order
    assert errors["unipc", 40] < errors["euler", 40] / 10
    assert errors["unipc", 20] / errors["unipc", 40] > 3  # second order or better


@torch.no_grad()
def test_no_guidance_skips_the_unconditional_branch_and_callbacks_see_chunks():
    model = Recorder(make())
    noise, ctx, _ = data(model.model)
    seen = []
    out = causal_cfg_sample(Denoiser(model), noise, ctx, schedule=SCHED, frames_per_chunk=2,
                            kv_cache=model.model.new_kv_cache(2, TPF, 4), num_steps=3,
                            callback=lambda i, frame, x: seen.append((i, frame, x.clone())))  # fmt: skip
    assert len(model.calls) == 2 * (3 + 1)
    assert [(i, f) for i, f, _ in seen] == [(0, 0), (1, 2)]
    torch.testing.assert_close(torch.cat([x for *_, x in seen], dim=1), out, rtol=0, atol=0)


def test_bad_options():
    model = make()
    noise, ctx, uncond = data(model)
    cache = model.new_kv_cache(2, TPF, 4)
    den = Denoiser(model)
    kw = dict(schedule=SCHED, frames_per_chunk=2, kv_cache=cache)
    with pytest.raises(ValueError, match="uncond_kv_cache"):
        causal_cfg_sample(den, noise, ctx, uncond=uncond, guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="different cache"):
        causal_cfg_sample(den, noise, ctx, uncond=uncond, uncond_kv_cache=cache, guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="frames_per_chunk=3"):
        causal_cfg_sample(den, noise, ctx, schedule=SCHED, frames_per_chunk=3, kv_cache=cache)
    with pytest.raises(ValueError, match="solver"):
        causal_cfg_sample(den, noise, ctx, solver="heun", **kw)
    with pytest.raises(ValueError, match="custom sigmas"):
        causal_cfg_sample(den, noise, ctx, solver="unipc", sigmas=sample_sigmas(SCHED, 4), **kw)
