"""The engine's ``causal_cfg`` sampler (many-step causal TF/DF sampling with CFG on two KV caches, official
pipeline/causal_diffusion_inference.py): one chunk covering the clip is the bidirectional sampler, chunked sampling
through the engine is the masked block-causal reference, the stream is one ``causal_cfg_sample`` call, and prompt
switches re-cache the conditional cache only (tiny debug transformer, toy text encoder, CPU)."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from sfvideo.config import InferenceSettings, ManyStepSampling
from sfvideo.diffusion.causal_sampling import causal_cfg_sample, make_flow_solver
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine
from sfvideo.nn.wan import WanTransformer
from sfvideo.toy.encoders import ToyTextEncoder

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
A = "a red circle moving left on a dark background"
B = "a blue square moving up on a light background"
SAMPLING = ManyStepSampling(num_steps=4, shift=3.0, guidance_scale=2.0, guidance="official")


class Recorder(nn.Module):
    """The model, recording (kv_cache, context) of every call."""

    def __init__(self, model: WanTransformer) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def new_kv_cache(self, *args, **kwargs):
        return self.model.new_kv_cache(*args, **kwargs)

    def forward(self, x, timestep, context, **kw):
        self.calls.append((kw.get("kv_cache"), context.clone()))
        return self.model(x, timestep, context, **kw)


@pytest.fixture(scope="module")
def model() -> WanTransformer:
    torch.manual_seed(0)
    m = WanTransformer.from_flavor("debug").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from the zero-initialised output: the samples move
    return m


def engine(model, sampler="causal_cfg", **sampling) -> InferenceEngine:
    settings = InferenceSettings(geometry=GEO, sampler=sampler, sampling=replace(SAMPLING, **sampling))
    return InferenceEngine(model, text_encoder=ToyTextEncoder(), settings=settings)


def latents(session) -> torch.Tensor:
    return torch.cat([item.chunk.latents for item in session], dim=1)


@pytest.mark.parametrize("guidance,scale", [("official", 2.0), ("standard", 3.0)])
@torch.no_grad()
def test_one_chunk_covering_the_clip_equals_the_bidirectional_sampler(model, guidance, scale):
    causal = engine(model, guidance=guidance, guidance_scale=scale).session(frames_per_chunk=4, decode=False)
    causal.start([A, B], seed=5)
    got = latents(causal)
    ref = engine(model, "euler", guidance=guidance, guidance_scale=scale).generate([A, B], seed=5)
    # Cached vs plain attention, CFG on the flow vs on x0, two forwards vs one batched: fp32 rounding only.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    noise, _ = engine(model).noise(2, 4, 5)
    assert (got - noise).abs().max() > 0.1  # the sampler moved the state


def masked_reference(model, noise, cond, uncond, solver, sampling):
    """Per chunk and step: one block-causal masked forward over [earlier clean outputs ; the chunk's state] with the
    earlier frames at timestep 0 (what the clean refresh caches), cond and uncond; CFG on the flow; a solver step."""
    den, f = Denoiser(model), GEO.frames_per_chunk
    b, frames = noise.shape[:2]
    scale = sampling.guidance_scale
    done = []
    for lo in range(0, frames, f):
        stepper = make_flow_solver(solver, sampling.schedule, sampling.num_steps)
        x = noise[:, lo : lo + f].clone()
        for j, ms in enumerate(stepper.model_sigmas):
            full = torch.cat([*done, x], dim=1)
            sig = torch.zeros(b, lo + f)
            sig[:, lo:] = ms
            fc = den.flow(full, sig, cond, attention="block_causal", frames_per_chunk=f)[:, lo:]
            fu = den.flow(full, sig, uncond, attention="block_causal", frames_per_chunk=f)[:, lo:]
            x = stepper.step(j, fc + scale * (fc - fu), x)
        done.append(x)
    return torch.cat(done, dim=1)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@torch.no_grad()
def test_chunked_engine_sampling_equals_the_masked_reference_and_one_causal_cfg_call(model, solver):
    e = engine(model, solver=solver)
    session = e.session(num_frames=6, window_frames=6, decode=False)  # global attention, as the reference
    session.start([A, B], seed=2)
    got = latents(session)
    noise, _ = e.noise(2, 6, 2)
    cond, uncond = e.encode([A, B]), e.negative(2)
    ref = masked_reference(model, noise, cond, uncond, solver, e.settings.sampling)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # cached vs masked attention: fp32 rounding
    # The stream issues the calls of one causal_cfg_sample over the whole clip, in the same order: identical.
    caches = [model.new_kv_cache(2, GEO.tokens_per_frame, 6) for _ in range(2)]
    s = e.settings.sampling
    whole = causal_cfg_sample(Denoiser(model), noise, cond, schedule=s.schedule, frames_per_chunk=2,
                              kv_cache=caches[0], uncond=uncond, uncond_kv_cache=caches[1],
                              guidance_scale=s.guidance_scale, guidance=s.guidance, solver=solver,
                              num_steps=s.num_steps)  # fmt: skip
    assert torch.equal(got, whole)


@torch.no_grad()
def test_prompt_switch_recaches_the_conditional_cache_only(model):
    rec = Recorder(model)
    e = engine(rec)
    scheduled = e.session(num_frames=6, decode=False)
    scheduled.start(A, seed=3, schedule=[(4, B)])
    expected = latents(scheduled)
    rec.calls.clear()
    live = e.session(num_frames=6, decode=False)
    live.start(A, seed=3)
    first = [live.next_chunk(), live.next_chunk()]
    cond_cache, uncond_cache = rec.calls[0][0], rec.calls[1][0]
    assert cond_cache is not uncond_cache
    before = len(rec.calls)
    live.switch_prompt(B)
    last = live.next_chunk()
    assert live.next_chunk() is None and last.chunk.recached
    assert torch.equal(torch.cat([c.chunk.latents for c in [*first, last]], 1), expected)
    calls = rec.calls[before:]
    steps = e.settings.sampling.num_steps
    # Deferred refresh of chunk 1 (cond, uncond), re-cache of the 2 held chunks (cond cache, prompt B), then the
    # chunk's steps (cond, uncond each).
    assert len(calls) == 2 + 2 + 2 * steps
    b_emb, neg = e.encode(B), e.negative(1)
    for cache, ctx in calls[2:4]:
        assert cache is cond_cache and torch.equal(ctx, b_emb)
    assert all(torch.equal(ctx, neg) for cache, ctx in calls if cache is uncond_cache)
    # Without the switch the last chunk differs (the prompt did take over).
    same = e.session(num_frames=6, decode=False)
    same.start(A, seed=3)
    assert not torch.allclose(latents(same)[:, 4:], expected[:, 4:])


@torch.no_grad()
def test_endless_rolling_stream_and_unguided_single_cache(model):
    rec = Recorder(model)
    session = engine(rec, guidance_scale=0.0).session(endless=True, decode=False)
    session.start(A, seed=0)
    frames = [session.next_chunk().chunk.start_frame for _ in range(4)]  # past the training clip: the cache rolls
    assert frames == [0, 2, 4, 6]
    assert len({id(c) for c, _ in rec.calls}) == 1  # no guidance: no unconditional branch, one cache
    session.close()


def test_settings_the_many_step_samplers_cannot_honour_are_refused(model):
    with pytest.raises(ValueError, match="Euler only"):
        engine(model, "euler", solver="unipc")
    with pytest.raises(ValueError, match="context_noise"):
        InferenceEngine(model, text_encoder=ToyTextEncoder(),
                        settings=InferenceSettings(geometry=GEO, sampler="causal_cfg", context_noise=100.0))
    with pytest.raises(ValueError, match="solver"):
        ManyStepSampling(solver="heun")
    assert FlowMatchSchedule(shift=SAMPLING.shift) == SAMPLING.schedule
