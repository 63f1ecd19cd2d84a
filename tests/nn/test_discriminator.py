"""Block features of WanTransformer.forward and the GAN discriminator head (nn/discriminator.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfvideo.nn.discriminator import DiscriminatorHead
from sfvideo.nn.rope import rope_cos_sin
from sfvideo.nn.wan import FLAVORS, WanTransformer, _AttnPlan


def make(seed: int = 0, **overrides) -> WanTransformer:
    torch.manual_seed(seed)
    model = WanTransformer(**{**FLAVORS["debug"], "num_layers": 3, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs(model, frames=2, height=4, width=6, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, model.config.in_channels, height, width, generator=g)
    t = 1000 * torch.rand(batch, generator=g)
    ctx = torch.randn(batch, 5, model.config.text_dim, generator=g)
    return x, t, ctx


def manual_block_outputs(model, x, t, ctx):
    """Bidirectional forward written out block by block from the model's parts."""
    b, f, _, h, w = x.shape
    grid_h, grid_w = h // 2, w // 2
    tokens = model._embed(x)
    _, e0 = model.condition_embedder.time(t[:, None].expand(b, f).float())
    text = model.condition_embedder.text_embedder(ctx)
    plan = _AttnPlan("sdpa", rope_cos_sin(range(f), grid_h, grid_w, model.config.attention_head_dim))
    outs = []
    for layer, block in enumerate(model.blocks):
        tokens = block(tokens, text, e0, plan, layer, None)
        outs.append(tokens)
    return outs


@torch.no_grad()
def test_block_features_equal_a_manual_forward_and_default_output_is_unchanged():
    model = make()
    x, t, ctx = inputs(model)
    plain = model(x, t, ctx)
    out, feats = model(x, t, ctx, return_block_features=(2, 0))
    # Same kernels on the same shapes in the same order: bit-identical.
    assert torch.equal(out, plain)
    assert torch.equal(model(x, t, ctx, return_block_features=None), plain)
    manual = manual_block_outputs(model, x, t, ctx)
    assert [tuple(f.shape) for f in feats] == [(2, 2 * 6, model.dim)] * 2
    torch.testing.assert_close(feats[0], manual[2], rtol=0, atol=0)  # same ops, same shapes: exact
    torch.testing.assert_close(feats[1], manual[0], rtol=0, atol=0)
    assert not torch.equal(feats[0], feats[1])


@torch.no_grad()
def test_teacher_forcing_features_are_the_noisy_half():
    model = make()
    x, t, ctx = inputs(model)
    clean = torch.randn_like(x)
    captured = {}
    hook = model.blocks[1].register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    out, (feat,) = model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=1, clean_x=clean,
                         return_block_features=(1,))  # fmt: skip
    hook.remove()
    n = x.shape[1] * 6
    assert captured["tokens"].shape[1] == 2 * n
    assert torch.equal(feat, captured["tokens"][:, n:])
    assert torch.equal(out, model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=1, clean_x=clean))


def test_features_with_gradient_checkpointing_and_bad_indices():
    model = make()
    x, t, ctx = inputs(model)
    _, (ref,) = model(x, t, ctx, return_block_features=(1,))
    model.enable_gradient_checkpointing()
    _, (ckpt,) = model(x, t, ctx, return_block_features=(1,))
    torch.testing.assert_close(ckpt, ref, rtol=0, atol=0)  # recompute runs the same kernels
    for bad in [(3,), (-1,), ()]:
        with pytest.raises(ValueError, match="return_block_features"):
            model(x, t, ctx, return_block_features=bad)


def reference_head(head: DiscriminatorHead, features, temb=None):
    """The official head written with plain tensor ops (wan_wrapper.adding_cls_branch, GanAttentionBlock)."""
    d = head.dim
    regs = head.registers.tokens
    regs = regs * torch.rsqrt(regs.pow(2).mean(-1, keepdim=True) + 1e-6) * head.registers.norm.weight
    pooled = []
    for i, (blk, hid) in enumerate(zip(head.blocks, features)):
        a = blk.attn
        heads = a.heads
        tok = regs[i].expand(hid.shape[0], 1, d)
        hn = F.layer_norm(hid, (d,), blk.norm_hidden.weight, blk.norm_hidden.bias, 1e-6)

        def rms(z, weight):
            return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        q = rms(tok @ a.to_q.weight.T + a.to_q.bias, a.norm_q.weight).unflatten(2, (heads, -1)).transpose(1, 2)
        k = rms(hn @ a.to_k.weight.T + a.to_k.bias, a.norm_k.weight).unflatten(2, (heads, -1)).transpose(1, 2)
        v = (hn @ a.to_v.weight.T + a.to_v.bias).unflatten(2, (heads, -1)).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v  # (B, H, 1, Dh)
        t = tok + a.to_out[0](att.transpose(1, 2).flatten(2))
        u = t + blk.ffn(F.layer_norm(t, (d,), eps=1e-6))
        pooled.append(u)
    if temb is not None:
        pooled.append(10.0 * temb[:, None, :])
    return head.classifier(torch.cat(pooled, dim=1).flatten(1))


@pytest.mark.parametrize("concat_time", [False, True])
def test_head_matches_a_plain_reference_and_is_sized_from_the_config(concat_time):
    model = make()
    head = DiscriminatorHead.from_transformer(model, (0, 2), num_classes=3, concat_time_embedding=concat_time)
    with torch.no_grad():
        for p in head.parameters():  # move the affine norms off their identity init
            p.add_(0.1 * torch.randn_like(p))
    assert head.registers.tokens.shape == (2, model.dim)
    assert head.blocks[0].ffn[0].out_features == model.config.ffn_dim
    assert head.classifier[0].normalized_shape == ((2 + int(concat_time)) * model.dim,)
    x, t, ctx = inputs(model)
    with torch.no_grad():
        _, feats = model(x, t, ctx, return_block_features=head.feature_blocks)
        temb = model.time_embedding(t, x.shape[0], x.shape[1])[:, 0] if concat_time else None
        logits = head(feats, temb)
        expected = reference_head(head, feats, temb)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)  # fp32, different op order
    # Cross-attention without positions: the head is invariant to permuting a block's tokens.
    perm = torch.randperm(feats[0].shape[1])
    with torch.no_grad():
        permuted = head([feats[0][:, perm], feats[1]], temb)
    torch.testing.assert_close(permuted, logits, rtol=1e-5, atol=1e-6)


def test_logit_gradient_stops_at_the_last_feature_block():
    model = make()
    head = DiscriminatorHead.from_transformer(model, (0,), ffn_dim=32)
    x, t, ctx = inputs(model)
    _, feats = model(x, t, ctx, return_block_features=head.feature_blocks)
    head(feats).sum().backward()
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert model.patch_embedding.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn1.to_q.weight.grad is None and model.proj_out.weight.grad is None
    assert head.registers.tokens.grad.abs().sum() > 0


def test_head_validation():
    model = make()
    with pytest.raises(ValueError, match="num_layers=3"):
        DiscriminatorHead.from_transformer(model, (0, 3))
    with pytest.raises(ValueError, match="duplicates"):
        DiscriminatorHead.from_transformer(model, (1, 1))
    head = DiscriminatorHead.from_transformer(model, (0, 1), concat_time_embedding=True)
    feats = [torch.randn(2, 6, model.dim)] * 2
    with pytest.raises(ValueError, match="temb"):
        head(feats)
    with pytest.raises(ValueError, match="got 1 feature tensors"):
        head(feats[:1], torch.zeros(2, model.dim))
