"""KVCache: cached chunk-by-chunk generation equals the masked forward; eviction, windows, gradient modes,
activation checkpointing and the cross-attention cache."""

from __future__ import annotations

import pytest
import torch

from sfvideo.nn.kv_cache import KVCache
from sfvideo.nn.wan import FLAVORS, WanTransformer

H, W = 4, 6  # latent size: 2 x 3 = 6 tokens per frame with patch 2 x 2
TPF = (H // 2) * (W // 2)


def make(seed: int = 0, **overrides) -> WanTransformer:
    torch.manual_seed(seed)
    model = WanTransformer(**{**FLAVORS["debug"], **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def clip(model, frames, batch=2, steps=3, seed=1):
    """Inputs of a rollout: per-step noisy latents and per-frame timesteps, clean latents, text."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, frames, model.config.in_channels, H, W)
    noisy = [torch.randn(shape, generator=g) for _ in range(steps)]
    # Per-frame timesteps, decreasing over the steps and different for every frame.
    ts = [(1000 - 250 * s) - 40 * torch.rand(batch, frames, generator=g) for s in range(steps)]
    clean = torch.randn(shape, generator=g)
    ctx = torch.randn(batch, 5, model.config.text_dim, generator=g)
    return noisy, ts, clean, ctx


def cached_generation(model, noisy, ts, clean, ctx, fpc, cache, start_of=lambda lo: lo):
    """Like the rollout: per chunk, every denoising step overwrites the chunk's slot, then a clean refresh (t=0)."""
    outs = []
    batch, frames = clean.shape[:2]
    for lo in range(0, frames, fpc):
        hi = lo + fpc
        for x, t in zip(noisy, ts):
            out = model(x[:, lo:hi], t[:, lo:hi], ctx, attention="block_causal", frames_per_chunk=fpc,
                        kv_cache=cache, start_frame=start_of(lo))  # fmt: skip
        model(clean[:, lo:hi], torch.zeros(batch, fpc), ctx, kv_cache=cache, start_frame=start_of(lo))
        outs.append(out)
    return torch.cat(outs, dim=1)


def masked_reference(model, x_last, t_last, clean, ctx, fpc, window_frames=None):
    """Block-causal masked forward per chunk: earlier chunks clean at t=0, the chunk itself noisy."""
    outs = []
    frames = clean.shape[1]
    for lo in range(0, frames, fpc):
        hi = lo + fpc
        x, t = clean.clone(), torch.zeros_like(t_last)
        x[:, lo:hi], t[:, lo:hi] = x_last[:, lo:hi], t_last[:, lo:hi]
        out = model(x, t, ctx, attention="block_causal", frames_per_chunk=fpc, window_frames=window_frames)
        outs.append(out[:, lo:hi])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("fpc,frames", [(2, 6), (1, 3)], ids=["chunk2x3", "framewise"])
@torch.no_grad()
def test_cached_generation_matches_block_causal_forward(fpc, frames):
    model = make()
    noisy, ts, clean, ctx = clip(model, frames)
    cache = model.new_kv_cache(2, TPF, frames)
    got = cached_generation(model, noisy, ts, clean, ctx, fpc, cache)
    expected = masked_reference(model, noisy[-1], ts[-1], clean, ctx, fpc)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache.frame_ids == list(range(frames)) and cache.end_frame == frames
    # Teacher forcing is the same computation in one forward: noisy chunk b sees clean chunks < b.
    tf = model(noisy[-1], ts[-1], ctx, attention="teacher_forcing", frames_per_chunk=fpc, clean_x=clean)
    torch.testing.assert_close(tf, expected, rtol=1e-5, atol=1e-5)
    # Control: a wrong start_frame (chunk written over the previous one) must break the equality.
    bad = cached_generation(model, noisy, ts, clean, ctx, fpc, model.new_kv_cache(2, TPF, frames),
                            start_of=lambda lo: max(lo - fpc, 0))  # fmt: skip
    assert (bad[:, fpc:] - expected[:, fpc:]).abs().max() > 1e-3


@torch.no_grad()
def test_cached_window_matches_masked_window():
    model = make()
    frames, fpc, window = 8, 2, 4
    noisy, ts, clean, ctx = clip(model, frames, steps=2)
    cache = model.new_kv_cache(2, TPF, frames, window_frames=window)  # no eviction: the training trick
    got = cached_generation(model, noisy, ts, clean, ctx, fpc, cache)
    expected = masked_reference(model, noisy[-1], ts[-1], clean, ctx, fpc, window_frames=window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unwindowed = masked_reference(model, noisy[-1], ts[-1], clean, ctx, fpc)
    assert (got[:, 6:] - unwindowed[:, 6:]).abs().max() > 1e-4  # the window is in effect


def _const_kv(frames: list[int], value_offset: float = 0.0):
    """K/V of ``len(frames)`` frames (1 token each, 1 head x 2 channels) whose value is the frame id."""
    vals = torch.tensor(frames, dtype=torch.float32) + value_offset
    k = vals[None, :, None, None].expand(1, len(frames), 1, 2).clone()
    return k, -k


def test_rolling_eviction_keeps_sinks_and_recent_frames_in_order():
    cache = KVCache(1, 1, 2, batch_size=1, tokens_per_frame=1, capacity_frames=5, sink_frames=1)
    held = []
    for start in range(0, 10, 2):
        step = cache.begin_chunk(start, 2)
        k_view, v_view = cache.attend(0, *_const_kv([start, start + 1]), step)
        held.append(cache.frame_ids.copy())
        # The view is the held frames in order (the chunk's own K/V last), values = frame ids.
        assert k_view[0, :, 0, 0].tolist() == [float(f) for f in cache.frame_ids]
        torch.testing.assert_close(v_view, -k_view)
    assert held == [[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7], [0, 6, 7, 8, 9]]
    assert cache.k[0][0, :, 0, 0].tolist() == [0.0, 6.0, 7.0, 8.0, 9.0]  # buffer contents, in order
    # Overwrite the last chunk: no eviction, new values.
    step = cache.begin_chunk(8, 2)
    cache.attend(0, *_const_kv([8, 9], value_offset=0.5), step)
    assert cache.frame_ids == [0, 6, 7, 8, 9]
    assert cache.k[0][0, :, 0, 0].tolist() == [0.0, 6.0, 7.0, 8.5, 9.5]
    # A window limits what is attended: sinks + keys within the last 3 frames ending at the chunk end.
    step = cache.begin_chunk(10, 2, window_frames=3)
    k_view, _ = cache.attend(0, *_const_kv([10, 11]), step)
    assert k_view[0, :, 0, 0].tolist() == [0.0, 9.5, 10.0, 11.0]
    with pytest.raises(ValueError, match="evicted"):
        cache.begin_chunk(4, 2)
    with pytest.raises(ValueError, match="start_frame"):
        cache.begin_chunk(13, 2)


@torch.no_grad()
def test_long_stream_past_capacity():
    model = make()
    fpc, capacity, chunks = 2, 4, 20  # 40 frames = 10x the buffer
    cache = model.new_kv_cache(1, TPF, capacity, sink_frames=1)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 5, model.config.text_dim, generator=g)
    shapes = set()
    for i in range(chunks):
        x = torch.randn(1, fpc, model.config.in_channels, H, W, generator=g)
        out = model(x, torch.full((1,), 800.0), ctx, kv_cache=cache, start_frame=i * fpc)
        model(out, torch.zeros(1), ctx, kv_cache=cache, start_frame=i * fpc)
        assert torch.isfinite(out).all() and out.shape == x.shape
        shapes.add(tuple(cache.k[0].shape))
    assert shapes == {(1, capacity * TPF, 2, 16)}
    assert cache.frame_ids == [0, 37, 38, 39]


def grad_rollout(model, grad_mode, checkpointing=False, frames=6, fpc=2):
    """A Self-Forcing-like rollout with one no-grad step and a grad-enabled exit step per chunk."""
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.zero_grad()
    noisy, ts, _, ctx = clip(model, frames, steps=2, seed=3)
    inputs = noisy[-1].clone().requires_grad_(True)
    cache = model.new_kv_cache(2, TPF, frames, grad_mode=grad_mode)
    outs = []
    for lo in range(0, frames, fpc):
        hi = lo + fpc
        with torch.no_grad():
            model(noisy[0][:, lo:hi], ts[0][:, lo:hi], ctx, kv_cache=cache, start_frame=lo)
        out = model(inputs[:, lo:hi], ts[1][:, lo:hi], ctx, kv_cache=cache, start_frame=lo)
        with torch.no_grad():
            model(out.detach(), torch.zeros(2, fpc), ctx, kv_cache=cache, start_frame=lo)
        outs.append(out)
    model.disable_gradient_checkpointing()
    return inputs, outs


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradient_modes(checkpointing):
    model = make()
    x_t, outs_t = grad_rollout(model, "truncate", checkpointing)
    (outs_t[-1] ** 2).mean().backward()
    grad_t = x_t.grad.clone()
    x_s, outs_s = grad_rollout(model, "straight_through", checkpointing)
    (outs_s[-1] ** 2).mean().backward()
    grad_s = x_s.grad.clone()
    # Forward values are identical in both modes: straight-through adds (live - live.detach()) = 0 exactly to the
    # same buffer values, and both attend views of the same shapes.
    for a, b in zip(outs_t, outs_s):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grad_t[:, :4].abs().max() == 0  # truncate: no gradient into earlier chunks' inputs
    assert grad_s[:, :4].abs().amax(dim=(0, 2, 3, 4)).min() > 0  # straight-through: every earlier frame
    torch.testing.assert_close(grad_t[:, 4:], grad_s[:, 4:], rtol=1e-5, atol=1e-8)  # own chunk: same gradient


@pytest.mark.parametrize("grad_mode", ["truncate", "straight_through"])
def test_checkpointing_with_cache_matches(grad_mode):
    model = make()
    grads = []
    for checkpointing in (False, True):
        x, outs = grad_rollout(model, grad_mode, checkpointing)
        sum((o**2).mean() for o in outs).backward()
        grads.append((x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_recompute_after_eviction_raises():
    model = make().train()
    model.enable_gradient_checkpointing()
    _, ts, clean, ctx = clip(model, 6, steps=1)
    cache = model.new_kv_cache(2, TPF, 4)
    with torch.no_grad():
        model(clean[:, :2], ts[0][:, :2], ctx, kv_cache=cache, start_frame=0)
    out = model(clean[:, 2:4], ts[0][:, 2:4], ctx, kv_cache=cache, start_frame=2)  # attends frames 0, 1
    with torch.no_grad():
        model(clean[:, 4:6], ts[0][:, 4:6], ctx, kv_cache=cache, start_frame=4)  # evicts frames 0, 1
    with pytest.raises(RuntimeError, match="evicted"):
        out.sum().backward()


def test_cross_attention_cache():
    model = make()
    noisy, ts, _, ctx = clip(model, 2, steps=1)
    x, t = noisy[0], ts[0]
    other = torch.randn_like(ctx)
    cache = model.new_kv_cache(2, TPF, 4)
    with torch.no_grad():
        first = model(x, t, ctx, kv_cache=cache)  # computes and caches the text K/V
        assert cache.cross_ready()
        cached = model(x, t, ctx, kv_cache=cache)  # overwrite of the same chunk, text K/V reused
        uncached = model(x, t, ctx)
        stale = model(x, t, other, kv_cache=cache)  # without reset_cross the old prompt is used
        cache.reset_cross()
        switched = model(x, t, other, kv_cache=cache)
    # Overwriting the same chunk attends the same view shapes with the same (cached) text K/V: exact.
    torch.testing.assert_close(cached, first, rtol=0, atol=0)
    torch.testing.assert_close(cached, uncached, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stale, first, rtol=0, atol=0)
    torch.testing.assert_close(switched, model(x, t, other).detach(), rtol=1e-6, atol=1e-6)
    assert (switched - first).abs().max() > 1e-4
    # With grad enabled the text K/V are recomputed, so the cross-attention path gets gradient.
    model.train()
    out = model(x, t, other, kv_cache=cache)
    out.square().mean().backward()
    assert model.condition_embedder.text_embedder.linear_1.weight.grad.abs().max() > 0
    assert model.blocks[0].attn2.to_k.weight.grad.abs().max() > 0
    torch.testing.assert_close(out.detach(), switched, rtol=1e-6, atol=1e-6)
