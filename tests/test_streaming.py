"""Streaming generation: equality with the one-shot rollout, rolling length, prompt switches, streaming decode."""

import importlib.util

import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import generate_latents
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.streaming import StreamStats, check_context_schedule, decode_stream, stream

SIGMAS = FlowMatchSchedule().step_sigmas([1000, 750, 500, 250])
HAVE_WAN = importlib.util.find_spec("sfvideo.nn.wan") is not None and importlib.util.find_spec(
    "sfvideo.nn.kv_cache") is not None
HAVE_TOY_CODEC = importlib.util.find_spec("sfvideo.toy.encoders") is not None


# ---------------------------------------------------------------------------------------------- mock model
class MockKVCache:
    """Per-frame keys (B,) with rolling eviction past ``capacity`` (keeping ``sink_frames``), plus a cross cache."""

    def __init__(self, capacity, sink_frames=0, window_frames=None):
        self.capacity, self.sink_frames, self.window_frames = capacity, sink_frames, window_frames
        self.frames = {}  # absolute frame -> key (B,)
        self.cross = None

    def reset(self):
        self.frames, self.cross = {}, None

    def reset_cross(self):
        self.cross = None

    def write(self, start, keys):
        for j in range(keys.shape[1]):
            self.frames[start + j] = keys[:, j]
        order = sorted(self.frames)
        while len(order) > self.capacity:
            victim = next(k for k in order if k >= self.sink_frames)
            del self.frames[victim]
            order.remove(victim)


class MockCausalModel(nn.Module):
    """Honours the WanTransformer cache contract at a scalar-per-frame level: the cross-attention K/V are computed
    from the context on the first call after a reset (and used from the cache afterwards); the cached self-attention
    keys depend on the latents, the timestep and the cached cross K/V, like real K/V after cross-attention layers."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, timestep, context, *, kv_cache, start_frame, frames_per_chunk, attention):
        assert attention == "block_causal" and frames_per_chunk == x.shape[1]
        if kv_cache.cross is None:
            kv_cache.cross = context.mean(dim=(1, 2))  # (B,)
        cross = kv_cache.cross
        t = timestep if timestep.ndim == 2 else timestep[:, None].expand(x.shape[:2])
        keys = x.mean(dim=(2, 3, 4)) + 0.3 * cross[:, None] + 1e-4 * t
        kv_cache.write(start_frame, keys)
        visible = torch.stack([kv_cache.frames[k] for k in sorted(kv_cache.frames)], 1)  # (B, n)
        return self.w * x + 0.2 * visible.mean(1).view(-1, 1, 1, 1, 1) + 0.1 * cross.view(-1, 1, 1, 1, 1)


def mock_setup(num_frames, f=2, capacity=None, sink=0, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, num_frames, 3, 4, 4, generator=g)
    ctx_a = torch.randn(1, 5, 8, generator=g)
    ctx_b = torch.randn(1, 5, 8, generator=g)

    def cache():
        return MockKVCache(capacity or num_frames, sink, window)

    return Denoiser(MockCausalModel()), noise, ctx_a, ctx_b, cache


def run_stream(den, noise, context, cache, f, seed=123, **kw):
    chunks = list(stream(den, noise, context, step_sigmas=SIGMAS, frames_per_chunk=f, kv_cache=cache,
                         noise_generator=torch.Generator().manual_seed(seed), **kw))
    return chunks, torch.cat([c.latents for c in chunks], 1)


# ---------------------------------------------------------------------------------------------- tests on the mock
@pytest.mark.parametrize("f", [1, 2])
def test_stream_equals_one_shot_rollout_mock(f):
    den, noise, ctx, _, cache = mock_setup(6)
    ref = generate_latents(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=f, kv_cache=cache(),
                           noise_generator=torch.Generator().manual_seed(123))
    chunks, out = run_stream(den, noise, ctx, cache(), f)
    assert [c.start_frame for c in chunks] == list(range(0, 6, f))
    assert all(c.latents.shape[1] == f for c in chunks)
    assert torch.equal(out, ref)


def test_prompt_switch_mock_cross_reset_and_recache():
    f, n, switch = 2, 8, 4
    den, noise, a, b, cache = mock_setup(n, f)
    _, base = run_stream(den, noise, a, cache(), f)
    c = cache()
    chunks, switched = run_stream(den, noise, [(0, a), (switch, b)], c, f)
    assert [ch.segment for ch in chunks] == [0, 0, 1, 1]
    assert [ch.recached for ch in chunks] == [False, False, True, False]
    assert torch.equal(switched[:, :switch], base[:, :switch])
    assert not torch.allclose(switched[:, switch:], base[:, switch:])
    torch.testing.assert_close(c.cross, b.mean(dim=(1, 2)))  # the cross cache now holds the new prompt
    # Re-cache vs cross reset only: re-caching rewrote the earlier frames' keys under the new prompt.
    c2 = cache()
    _, no_recache = run_stream(den, noise, [(0, a), (switch, b)], c2, f, recache_on_switch=False)
    assert torch.equal(no_recache[:, :switch], base[:, :switch])
    assert not torch.allclose(no_recache[:, switch:], switched[:, switch:])
    for k in range(switch):
        assert not torch.allclose(c.frames[k], c2.frames[k])


def test_rolling_mock_long_stream_keeps_window_and_sink():
    f, window, sink = 2, 6, 2
    den, noise, ctx, _, _ = mock_setup(60, f)
    c = MockKVCache(window + sink, sink, window)
    chunks, out = run_stream(den, noise, ctx, c, f)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert sorted(c.frames) == [0, 1, *range(60 - window, 60)]
    assert len(chunks) == 30


def test_context_schedule_errors():
    t = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="start at frame 0"):
        check_context_schedule([(3, t)], 3, 9)
    with pytest.raises(ValueError, match="chunk boundary"):
        check_context_schedule([(0, t), (4, t)], 3, 9)
    with pytest.raises(ValueError, match="increase"):
        check_context_schedule([(0, t), (3, t), (3, t)], 3, 9)
    with pytest.raises(ValueError, match="past the video"):
        check_context_schedule([(0, t), (9, t)], 3, 9)


def test_stats():
    den, noise, ctx, _, cache = mock_setup(4)
    stats = StreamStats()
    for c in stream(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=2, kv_cache=cache()):
        stats.update(c, pixel_frames=8, decode_s=0.0)
    d = stats.as_dict()
    assert d["chunks"] == 2 and d["latent_frames"] == 4 and d["pixel_frames"] == 16
    assert d["first_chunk_s"] is not None and d["first_chunk_s"] >= 0
