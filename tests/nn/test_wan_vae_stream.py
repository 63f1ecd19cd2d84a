"""Options of the Wan VAE streaming decode (``WanVAECodec(frames_per_call=..., channels_last=...)``): same frames
as a full decode, to fp32 rounding (tiny random VAE on CPU)."""

import copy

import pytest
import torch
from diffusers import AutoencoderKLWan

from sfvideo.nn.wan_vae import WanVAECodec

Z_DIM = 4


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.3, -0.2, 0.1, 0.5],
        latents_std=[1.5, 0.5, 2.0, 0.8],
    ).eval()


def test_cpu_defaults(vae: AutoencoderKLWan):
    codec = WanVAECodec(copy.deepcopy(vae).to(torch.bfloat16))
    # "auto" on CPU: fp32, one latent frame per decoder call, contiguous (NCDHW) weights
    assert codec.dtype == torch.float32 and codec.frames_per_call == 1 and not codec.channels_last
    assert codec.vae.decoder.conv_in.weight.is_contiguous()
    assert WanVAECodec(copy.deepcopy(vae), dtype=None).dtype == torch.float32
    mean, std = codec._stats(codec.device)
    assert codec._stats(codec.device)[0] is mean  # moved once per device, not per call
    with pytest.raises(ValueError, match="frames_per_call"):
        WanVAECodec(vae, frames_per_call=0)


@pytest.mark.parametrize(
    "options, chunks",
    [
        ({"frames_per_call": 3}, [2, 2, 1]),
        ({"frames_per_call": 2}, [1, 3, 1]),
        ({"channels_last": True}, [2, 2, 1]),
        ({"channels_last": True, "frames_per_call": 4}, [3, 2]),
    ],
)
def test_stream_options_equal_full_decode(vae: AutoencoderKLWan, options: dict, chunks: list[int]):
    reference = WanVAECodec(vae)
    codec = WanVAECodec(copy.deepcopy(vae), **options)
    if options.get("channels_last"):
        assert codec.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, sum(chunks), Z_DIM, 2, 2, generator=g)
    full = reference.decode(latents)
    stream = codec.stream_decoder()
    pieces, start = [], 0
    for n in chunks:
        pieces.append(stream.decode_chunk(latents[:, start : start + n]))
        start += n
    assert [p.shape[1] for p in pieces] == [codec.num_pixel_frames(chunks[0])] + [4 * n for n in chunks[1:]]
    # several frames per conv call, or NDHWC layout: other oneDNN kernels, so fp32 rounding, not bit equality
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # the carried cache matters with several frames per call too
    fresh = codec.stream_decoder().decode_chunk(latents[:, -chunks[-1] :])
    assert (fresh[:, -1] - full[:, -1]).abs().max() > 1e-3


@pytest.mark.gpu
def test_cuda_defaults_stream_matches_fp32_reference(vae: AutoencoderKLWan):
    codec = WanVAECodec(copy.deepcopy(vae), device="cuda")
    assert codec.dtype == torch.bfloat16 and codec.channels_last and codec.frames_per_call == 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 5, Z_DIM, 4, 4, generator=g)
    full = WanVAECodec(vae).decode(latents)  # fp32 on CPU
    dec = codec.stream_decoder()
    streamed = torch.cat([dec.decode_chunk(latents[:, :2].cuda()), dec.decode_chunk(latents[:, 2:].cuda())], dim=1)
    # bf16 weights and activations: agreement to bf16 rounding accumulated over the decoder, not fp32
    assert (streamed.float().cpu() - full).abs().max() < 0.1
