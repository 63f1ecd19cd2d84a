"""Streaming generation: equality with the one-shot rollout, rolling length, prompt switches, streaming decode."""


import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import generate_latents
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.inference import StreamStats, check_context_schedule, decode_stream, stream

SIGMAS = FlowMatchSchedule().step_sigmas([1000, 750, 500, 250])


# ---------------------------------------------------------------------------------------------- mock model
class MockKVCache:
    """Per-frame keys (B,) with KVCache's write rule: a call at ``start_frame <= end`` drops the held frames
    ``>= start_frame`` and writes the chunk; beyond ``capacity`` the oldest non-sink frames are evicted."""

    def __init__(self, capacity, sink_frames=0, window_frames=None):
        self.capacity, self.sink_frames, self.window_frames = capacity, sink_frames, window_frames
        self.frames = {}  # absolute frame -> key (B,)
        self.cross = None
        self.end = 0

    @property
    def frame_ids(self):
        return sorted(self.frames)

    def reset_cross(self):
        self.cross = None

    def write(self, start, keys):
        assert 0 <= start <= self.end
        held = self.frame_ids
        assert not (len(held) > self.sink_frames and self.sink_frames <= start < held[self.sink_frames])
        self.frames = {k: v for k, v in self.frames.items() if k < start}
        for j in range(keys.shape[1]):
            self.frames[start + j] = keys[:, j]
        self.end = start + keys.shape[1]
        order = self.frame_ids
        while len(order) > self.capacity:
            victim = order[self.sink_frames]
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
@pytest.mark.parametrize("f, context_sigma", [(1, 0.0), (2, 0.0), (2, 0.1)])
def test_stream_equals_one_shot_rollout_mock(f, context_sigma):
    den, noise, ctx, _, cache = mock_setup(6)
    ref = generate_latents(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=f, kv_cache=cache(),
                           noise_generator=torch.Generator().manual_seed(123), context_sigma=context_sigma)
    chunks, out = run_stream(den, noise, ctx, cache(), f, context_sigma=context_sigma)
    assert [c.start_frame for c in chunks] == list(range(0, 6, f))
    assert all(c.latents.shape[1] == f for c in chunks)
    assert torch.equal(out, ref)  # same calls on the same shapes in the same order: exact by construction


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


def test_prompt_switch_after_eviction_keeps_sinks_and_rewrites_window_mock():
    f, window, sink, n, switch = 2, 6, 2, 20, 12
    den, noise, a, b, _ = mock_setup(n, f)
    c = MockKVCache(window + sink, sink, window)
    chunks = stream(den, noise, [(0, a), (switch, b)], step_sigmas=SIGMAS, frames_per_chunk=f, kv_cache=c)
    before = None
    for ch in chunks:
        if ch.start_frame == switch - f:
            before = {k: v.clone() for k, v in c.frames.items()}
        if ch.start_frame == switch:
            assert ch.recached
            break
    # Sinks keep their keys; the rest of the window was re-written under prompt b before the chunk at `switch`.
    assert set(before) == {0, 1, *range(switch - window, switch)}
    for k in (0, 1):
        assert torch.equal(c.frames[k], before[k])
    for k in range(switch - window + f, switch):  # (the oldest window frames were evicted by the new chunk)
        assert not torch.allclose(c.frames[k], before[k])


# ---------------------------------------------------------------------------------------------- the real transformer
def wan_setup(train_frames=6, f=2, seed=0):
    from sfvideo.geometry import VideoGeometry
    from sfvideo.nn.wan import WanTransformer

    torch.manual_seed(seed)
    model = WanTransformer.from_flavor("debug").eval()
    geo = VideoGeometry(num_frames=train_frames, channels=4, height=4, width=4, frames_per_chunk=f)
    g = torch.Generator().manual_seed(seed)
    ctx_a = torch.randn(1, 7, model.config.text_dim, generator=g)
    ctx_b = torch.randn(1, 7, model.config.text_dim, generator=g)
    return model, Denoiser(model), geo, ctx_a, ctx_b


def wan_noise(geo, frames, seed=1):
    return torch.randn(geo.latent_shape(1, frames), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("f, context_sigma", [(1, 0.0), (3, 0.0), (3, 0.05)])
def test_stream_equals_one_shot_rollout_wan(f, context_sigma):
    model, den, geo, ctx, _ = wan_setup(train_frames=6, f=f)
    noise = wan_noise(geo, 6)
    ref = generate_latents(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=f,
                           kv_cache=model.new_kv_cache(1, geo.tokens_per_frame, 6), context_sigma=context_sigma,
                           noise_generator=torch.Generator().manual_seed(5))
    chunks, out = run_stream(den, noise, ctx, model.new_kv_cache(1, geo.tokens_per_frame, 6), f, seed=5,
                             context_sigma=context_sigma)
    assert len(chunks) == 6 // f
    # Exact by construction: the stream issues the rollout's model calls (same chunk shapes, same cache views, same
    # noise draws in the same order), only the refresh is deferred; any kernel choice is the same on both sides.
    assert torch.equal(out, ref)


def test_rolling_stream_ten_times_training_length_wan():
    f, train, sink = 2, 6, 2
    model, den, geo, ctx, _ = wan_setup(train_frames=train, f=f)
    n = 10 * train
    noise = wan_noise(geo, n)
    cache = model.new_kv_cache(1, geo.tokens_per_frame, train + sink, sink_frames=sink, window_frames=train)
    chunks, out = run_stream(den, noise, ctx, cache, f)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert cache.frame_ids == [0, 1, *range(n - train, n)]
    # The stream does not collapse: late chunks are as spread as early ones.
    assert out[:, -f:].std() > 0.25 * out[:, :f].std()


@pytest.mark.parametrize("sink", [0, 2])
def test_prompt_switch_wan(sink):
    f, n, switch = 2, 16, 10
    model, den, geo, a, b = wan_setup(train_frames=6, f=f)
    noise = wan_noise(geo, n)

    def cache():
        return model.new_kv_cache(1, geo.tokens_per_frame, 6 + sink, sink_frames=sink, window_frames=6)

    _, base = run_stream(den, noise, a, cache(), f)
    c = cache()
    cross_before = None
    out = []
    for ch in stream(den, noise, [(0, a), (switch, b)], step_sigmas=SIGMAS, frames_per_chunk=f, kv_cache=c,
                     noise_generator=torch.Generator().manual_seed(123)):
        if ch.start_frame == switch - f:
            cross_before = c.cross_k[0].clone()
        if ch.start_frame == switch:
            assert ch.recached and ch.segment == 1
            assert not torch.allclose(c.cross_k[0], cross_before)  # the cross-attention cache holds prompt b
        out.append(ch.latents)
    switched = torch.cat(out, 1)
    assert switched.shape == noise.shape and torch.isfinite(switched).all()
    assert torch.equal(switched[:, :switch], base[:, :switch])  # identical calls before the switch: exact
    assert not torch.allclose(switched[:, switch:], base[:, switch:])
    # Cross reset only (no re-cache) differs from the LongLive re-cache.
    _, cross_only = run_stream(den, noise, [(0, a), (switch, b)], cache(), f, recache_on_switch=False)
    assert not torch.allclose(cross_only[:, switch:], switched[:, switch:])


def test_streaming_decode_equals_full_decode_toy():
    from sfvideo.toy.encoders import ToyCodec

    codec = ToyCodec()
    den, noise, ctx, _, cache = mock_setup(6)
    noise = torch.randn(1, 6, codec.latent_channels, 3, 5, generator=torch.Generator().manual_seed(0))
    chunks = list(stream(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=2, kv_cache=cache()))
    decoded = list(decode_stream(chunks, codec.stream_decoder()))
    full = codec.decode(torch.cat([c.latents for c in chunks], 1))
    # The toy codec is a permutation plus elementwise scale/shift (each element rounded once, whatever the shape).
    assert torch.equal(torch.cat([d.frames for d in decoded], 1), full)
    assert all(d.decode_s >= 0 for d in decoded)


def _tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            attn_scales=[], temperal_downsample=[False, True, True],
                            latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0]).eval()


def test_streaming_decode_equals_full_decode_wan_vae():
    from sfvideo.nn.wan_vae import WanVAECodec

    codec = WanVAECodec(_tiny_wan_vae())
    latents = torch.randn(1, 6, codec.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    dec = codec.stream_decoder()
    chunks = [dec.decode_chunk(latents[:, i : i + 2]) for i in range(0, 6, 2)]
    assert [c.shape[1] for c in chunks] == [1 + 4 * 1, 8, 8]
    full = codec.decode(latents)
    # Different temporal lengths, different conv kernels: equal to fp32 rounding (see tests/nn/test_encoders.py).
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-5)


def test_chunk_is_yielded_before_its_refresh():
    # Latency: the first chunk costs S forwards (not S + 1); its refresh runs when the next chunk is requested.
    den, noise, ctx, _, cache = mock_setup(6)
    calls = []
    model = den.model
    den.model = lambda *a, **k: calls.append(k["start_frame"]) or model(*a, **k)
    it = stream(den, noise, ctx, step_sigmas=SIGMAS, frames_per_chunk=2, kv_cache=cache())
    next(it)
    assert calls == [0, 0, 0, 0]
    next(it)
    assert calls == [0] * 5 + [2] * 4
    list(it)
    assert calls == [0] * 5 + [2] * 5 + [4] * 4  # no refresh after the final chunk (refresh_last=False)
