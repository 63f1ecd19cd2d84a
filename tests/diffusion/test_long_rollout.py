"""Rollouts longer than the teacher window (diffusion/long_rollout.py): length draws, the re-encoded first frame
through the toy codec and a tiny Wan VAE, and the gradient mask."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.long_rollout import sample_rollout_chunks, teacher_window, window_frame_mask
from sfvideo.losses.dmd import dmd_loss
from sfvideo.nn.wan_vae import WanVAECodec
from sfvideo.toy.encoders import ToyCodec


def test_rollout_length_is_uniform_in_whole_chunks_and_rank_shared():
    draws = [sample_rollout_chunks(21, 30, 3, torch.Generator().manual_seed(s)) for s in range(400)]
    assert set(draws) == {7, 8, 9, 10}  # [21/3, 30/3] inclusive
    counts = [draws.count(k) for k in (7, 8, 9, 10)]
    assert min(counts) > 60  # 100 expected each
    # Two "ranks" with generators seeded alike agree without communication.
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert [sample_rollout_chunks(21, 42, 3, a) for _ in range(5)] == [
        sample_rollout_chunks(21, 42, 3, b) for _ in range(5)
    ]
    assert sample_rollout_chunks(21, 21, 3, None) == 7
    with pytest.raises(ValueError, match="multiples of frames_per_chunk=3"):
        sample_rollout_chunks(21, 31, 3, None)
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        sample_rollout_chunks(24, 21, 3, None)


def test_toy_codec_window_keeps_the_replaced_latent_and_the_tail_graph():
    codec = ToyCodec(spatial_stride=2, scale=[0.5, 2.0, 1.0], shift=0.1)
    latents = torch.randn(2, 12, codec.latent_channels, 3, 4).requires_grad_(True)
    window = teacher_window(latents, codec, 6)
    assert window.shape == (2, 6, codec.latent_channels, 3, 4)
    assert torch.equal(window[:, 1:], latents[:, 7:])
    # Toy time is 1:1 and encode inverts decode: the re-encoded latent is latent F - W (fp32 rounding of scale/shift).
    torch.testing.assert_close(window[:, 0], latents[:, 6].detach(), rtol=1e-6, atol=1e-6)
    window.sum().backward()
    assert torch.all(latents.grad[:, 7:] == 1) and torch.all(latents.grad[:, :7] == 0)  # first frame: no gradient
    short = torch.randn(2, 6, codec.latent_channels, 3, 4)
    assert teacher_window(short, codec, 6) is short


@pytest.fixture(scope="module")
def wan_codec() -> WanVAECodec:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=[0.3, -0.2, 0.1, 0.5],
                           latents_std=[1.5, 0.5, 2.0, 0.8])  # fmt: skip
    return WanVAECodec(vae)


def test_wan_vae_window_first_latent_is_the_last_prefix_pixel_frame_encoded_alone(wan_codec):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 7, 4, 2, 2, generator=g)
    window = teacher_window(latents, wan_codec, 4)  # prefix = latents[:, :4], tail = latents[:, 4:]
    assert window.shape == (1, 4, 4, 2, 2)
    assert torch.equal(window[:, 1:], latents[:, 4:])
    # Independent path: decode the whole rollout; the causal decoder's frame 1 + 4 (4 - 1) - 1 = 12 is the prefix's
    # last frame. Encoding that single frame alone is the first-frame encoder path (1 pixel frame -> 1 latent).
    pixels = wan_codec.decode(latents)
    t_prefix = wan_codec.num_pixel_frames(4)
    assert (pixels.shape[1], t_prefix) == (wan_codec.num_pixel_frames(7), 13)
    expected = wan_codec.encode(pixels[:, t_prefix - 1 : t_prefix])
    assert expected.shape[1] == 1
    # diffusers decodes one latent frame at a time with a causal cache, so decoding the prefix runs the same kernels
    # on the same shapes as the first part of the full decode: exact.
    torch.testing.assert_close(window[:, :1], expected, rtol=0, atol=0)
    # Control: it is not the latent it replaces, nor the encoding of the frame after the prefix.
    assert (window[:, 0] - latents[:, 3]).abs().max() > 0.1
    assert (window[:, :1] - wan_codec.encode(pixels[:, t_prefix : t_prefix + 1])).abs().max() > 1e-3


def test_window_mask_drops_the_first_chunk_only_for_longer_rollouts():
    assert window_frame_mask(21, min_frames=21, window_frames=21, frames_per_chunk=3) is None
    mask = window_frame_mask(27, min_frames=21, window_frames=21, frames_per_chunk=3)
    assert mask.shape == (21,) and not mask[:3].any() and mask[3:].all()
    with pytest.raises(ValueError, match="leaves no frame"):
        window_frame_mask(6, min_frames=3, window_frames=3, frames_per_chunk=3)


class Scaled(torch.nn.Module):
    """Flow ``c x``: x0 = (1 - sigma c) x, a different clean estimate per constant."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, timestep, context, **kw):
        return self.c * x


def test_mask_plugs_into_dmd_loss():
    x = torch.randn(2, 6, 1, 2, 2).requires_grad_(True)
    mask = window_frame_mask(9, min_frames=6, window_frames=6, frames_per_chunk=2)
    ctx = torch.zeros(2, 1, 1)
    loss, _ = dmd_loss(
        x, teacher=Denoiser(Scaled(0.0)), critic=Denoiser(Scaled(0.5)), cond=ctx, uncond=ctx,
        sigma=torch.full((2,), 0.5), noise=torch.randn_like(x), guidance_scale=0.0, mask=mask,
    )  # fmt: skip
    loss.backward()
    assert torch.all(x.grad[:, :2] == 0) and torch.all(x.grad[:, 2:] != 0)
