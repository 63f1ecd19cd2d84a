"""WanTransformer: parity with diffusers, per-frame timesteps, masks, checkpointing, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from sfvideo.nn.attention import frame_visibility
from sfvideo.nn.wan import FLAVORS, WanTransformer

# A second tiny config unlike "debug": 3 heads x 12 (odd head count, RoPE split 4/4/4), no cross-attn norm,
# out_channels != in_channels.
OTHER = dict(
    num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=6, text_dim=20, freq_dim=16,
    ffn_dim=40, num_layers=3, cross_attn_norm=False,
)  # fmt: skip


def make(config: dict | str = "debug", seed: int = 0) -> WanTransformer:
    torch.manual_seed(seed)
    cfg = FLAVORS[config] if isinstance(config, str) else config
    model = WanTransformer(**cfg).eval()
    # Non-trivial biases everywhere so every parameter matters in the comparisons.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs(model: WanTransformer, frames=3, height=6, width=10, batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize(
    "config,frames,height,width", [("debug", 3, 6, 10), (OTHER, 5, 8, 4)], ids=["debug_6x10", "other_8x4"]
)
def test_bidirectional_matches_diffusers(config, frames, height, width):
    ours = make(config)
    ref = WanTransformer3DModel(**(FLAVORS[config] if isinstance(config, str) else config)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # 1:1 key names and shapes
    assert set(ref.state_dict()) == set(ours.state_dict())
    x, t, ctx = inputs(ours, frames, height, width)
    with torch.no_grad():
        expected = ref(x.transpose(1, 2), t, ctx, return_dict=False)[0].transpose(1, 2)  # (B,C,F,H,W) -> (B,F,C,H,W)
        got = ours(x, t, ctx)
    assert got.shape == (x.shape[0], frames, ours.config.out_channels, height, width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_per_frame_timesteps_equal_per_sample():
    model = make()
    x, t, ctx = inputs(model, frames=4)
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t[:, None].expand(-1, 4).contiguous(), ctx)
        t_varied = t[:, None].repeat(1, 4)
        t_varied[:, 2] = 10.0
        c = model(x, t_varied, ctx)
    # (B,) timesteps are expanded to (B, F) before the time MLP, so both calls run the same shapes: exact.
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)  # per-frame timesteps really act per frame
    # Modulation is per frame: frame 2's new timestep changes frame 2's adaLN; bidirectional attention spreads it.
    assert (a[:, 2] - c[:, 2]).abs().max() > (a[:, 0] - c[:, 0]).abs().max()


def test_block_causal_chunks_do_not_see_the_future():
    model = make()
    x, t, ctx = inputs(model, frames=6, height=4, width=4)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change the last chunk (chunks of 2)
    with torch.no_grad():
        a = model(x, t, ctx, attention="block_causal", frames_per_chunk=2)
        b = model(x2, t, ctx, attention="block_causal", frames_per_chunk=2)
        bi = model(x, t, ctx)
    # Same shapes and kernels; the changed frames enter earlier queries only through masked (zero-weight) keys.
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert not torch.allclose(a[:, :4], bi[:, :4])  # the mask is in effect


def test_window_mask_limits_keys_to_the_last_frames():
    table = frame_visibility("block_causal", 6, 2, 4)
    # Chunk 2 (frames 4, 5) ends at 6: sees frames 2..5 only; chunk 1 sees 0..3.
    assert table[4].tolist() == [False, False, True, True, True, True]
    assert table[2].tolist() == [True, True, True, True, False, False]
    # One layer: with more, chunk 0 reaches chunk 2 indirectly through chunk 1 (the window limits direct keys).
    model = make({**FLAVORS["debug"], "num_layers": 1})
    x, t, ctx = inputs(model, frames=6, height=4, width=4)
    x2 = x.clone()
    x2[:, :2] += 1.0  # change chunk 0: invisible to chunk 2 with a 4-frame window
    with torch.no_grad():
        a = model(x, t, ctx, attention="block_causal", frames_per_chunk=2, window_frames=4)
        b = model(x2, t, ctx, attention="block_causal", frames_per_chunk=2, window_frames=4)
    torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=0, atol=0)  # masked keys only, same shapes: exact
    assert not torch.allclose(a[:, 2:4], b[:, 2:4])


def test_teacher_forcing_mask_semantics():
    model = make()
    frames, fpc = 6, 2
    x, t, ctx = inputs(model, frames=frames, height=4, width=4)
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(x.shape, generator=g)
    t_frames = torch.rand(x.shape[0], frames, generator=g) * 1000

    def run(noisy, clean_x):
        with torch.no_grad():
            return model(noisy, t_frames, ctx, attention="teacher_forcing", frames_per_chunk=fpc, clean_x=clean_x)

    base = run(x, clean)
    assert base.shape == x.shape[:2] + (model.config.out_channels,) + x.shape[3:]
    b = 1  # chunk under test: frames 2, 3
    later_clean, later_noisy, earlier_clean, earlier_noisy, own_clean = (clean.clone(), x.clone(), clean.clone(),
                                                                        x.clone(), clean.clone())  # fmt: skip
    later_clean[:, 4:] += 1.0
    later_noisy[:, 4:] += 1.0
    earlier_clean[:, :2] += 1.0
    earlier_noisy[:, :2] += 1.0
    own_clean[:, 2:4] += 1.0
    chunk = slice(2, 4)
    # Every run has the same shapes; the changed tokens reach the chunk only through masked keys: exact.
    torch.testing.assert_close(run(x, later_clean)[:, chunk], base[:, chunk], rtol=0, atol=0)
    torch.testing.assert_close(run(later_noisy, clean)[:, chunk], base[:, chunk], rtol=0, atol=0)
    # Noisy chunk b does not see noisy chunks < b, nor its own clean copy.
    torch.testing.assert_close(run(earlier_noisy, clean)[:, chunk], base[:, chunk], rtol=0, atol=0)
    torch.testing.assert_close(run(x, own_clean)[:, chunk], base[:, chunk], rtol=0, atol=0)
    # ... but it does see the earlier clean chunks.
    assert not torch.allclose(run(x, earlier_clean)[:, chunk], base[:, chunk])
    assert b == chunk.start // fpc


def test_teacher_forcing_clean_timestep_default_is_zero():
    model = make()
    x, t, ctx = inputs(model, frames=4, height=4, width=4)
    clean = torch.randn_like(x)
    with torch.no_grad():
        a = model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=2, clean_x=clean)
        b = model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=2, clean_x=clean,
                  clean_timestep=torch.zeros(2))  # fmt: skip
        c = model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=2, clean_x=clean,
                  clean_timestep=torch.full((2,), 500.0))  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the default is the same zeros tensor: same computation
    torch.testing.assert_close(a[:, :2], c[:, :2], rtol=0, atol=0)  # chunk 0 sees no clean tokens (masked)
    assert not torch.allclose(a[:, 2:], c[:, 2:])


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal", "teacher_forcing"])
def test_gradient_checkpointing_matches(mode):
    model = make()
    model.train()
    x, t, ctx = inputs(model, frames=4, height=4, width=4)
    kwargs = dict(attention=mode, frames_per_chunk=2)
    if mode == "teacher_forcing":
        kwargs["clean_x"] = torch.randn_like(x)

    def run():
        model.zero_grad()
        out = model(x, t, ctx, **kwargs)
        (out**2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_a, grads_a = run()
    model.enable_gradient_checkpointing()
    out_b, grads_b = run()
    model.disable_gradient_checkpointing()
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)  # checkpointing reruns the same forward: exact
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_sdpa_forward():
    model = make()
    x, t, ctx = inputs(model, frames=4, height=4, width=4, batch=1)
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        a = model(x, t, ctx, attention="block_causal", frames_per_chunk=2)
        model.set_attention_backend("flex")  # eager flex on CPU: forward only
        b = model(x, t, ctx, attention="block_causal", frames_per_chunk=2)
    with pytest.raises(ValueError, match="attention_backend"):
        model.set_attention_backend("xformers")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_diffusers_folder(tmp_path):
    model = make()
    x, t, ctx = inputs(model)
    with torch.no_grad():
        expected = model(x, t, ctx)
    model.save_pretrained(tmp_path / "ours")
    loaded = WanTransformer.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():  # same weights, inputs and shapes: exact
        torch.testing.assert_close(loaded(x, t, ctx), expected, rtol=0, atol=0)
    # A diffusers `transformer/` folder loads into ours, and ours into diffusers.
    ref = WanTransformer3DModel(**FLAVORS["debug"])
    ref.load_state_dict(model.state_dict())
    ref.save_pretrained(tmp_path / "diffusers")
    from_diffusers = WanTransformer.from_pretrained(tmp_path / "diffusers").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_diffusers(x, t, ctx), expected, rtol=0, atol=0)
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(back.state_dict()["proj_out.weight"], model.state_dict()["proj_out.weight"])


def test_load_wrong_shape_names_the_parameter(tmp_path):
    make().save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    state = load_file(weights)
    state["blocks.1.attn1.to_q.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1\.to_q\.weight"):  # diffusers names the key
        WanTransformer.from_pretrained(tmp_path)


def test_bad_frame_count_raises_naming_frames_per_chunk():
    model = make()
    x, t, ctx = inputs(model, frames=5, height=4, width=4)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        model(x, t, ctx, attention="block_causal", frames_per_chunk=2)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=3, clean_x=x)


def test_bad_inputs_raise_one_line_errors():
    model = make()
    x, t, ctx = inputs(model, frames=2, height=4, width=4)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(2, 3), ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :-1])
    with pytest.raises(ValueError, match="clean_x"):
        model(x, t, ctx, attention="teacher_forcing", frames_per_chunk=1)
    with pytest.raises(NotImplementedError, match="text-to-video"):
        WanTransformer.from_flavor("debug", image_dim=8)
    with pytest.raises(ValueError, match="flavor"):
        WanTransformer.from_flavor("7B")


def test_flavors_have_the_published_sizes():
    with torch.device("meta"):
        small = WanTransformer.from_flavor("1.3B")
    assert small.dim == 1536 and len(small.blocks) == 30
    assert small.blocks[0].ffn.net[0].proj.out_features == 8960
    assert FLAVORS["14B"]["num_attention_heads"] * FLAVORS["14B"]["attention_head_dim"] == 5120
    assert FLAVORS["14B"]["ffn_dim"] == 13824 and FLAVORS["14B"]["num_layers"] == 40
