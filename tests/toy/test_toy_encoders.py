"""Toy encoders: exact codec, zero-padded deterministic text embeddings, protocol conformance."""

import pytest
import torch

from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder, toy_geometry
from sfvideo.toy.world import ToyWorldConfig, render_batch, train_prompts

PROMPTS = [
    "a red circle moving left on a dark background",
    "a red circle moving left and a blue square moving up on a light background",
    "",
]


def test_codec_round_trip_is_exact_and_streams():
    codec = ToyCodec()
    assert isinstance(codec, VideoCodec)
    video = render_batch(train_prompts()[:2], [0, 1])
    z = codec.encode(video)
    assert z.shape == (2, 21, 12, 16, 16) and codec.latent_channels == 12 and codec.spatial_stride == 2
    assert torch.equal(codec.decode(z), video)
    # Latent channel c s² + i s + j is colour c at sub-pixel (i, j).
    assert torch.equal(z[:, :, 1 * 4 + 1 * 2 + 0], video[:, :, 1, 1::2, 0::2])
    dec = codec.stream_decoder()
    chunks = torch.cat([dec.decode_chunk(z[:, f : f + 3]) for f in range(0, 21, 3)], dim=1)
    assert torch.equal(chunks, video)
    assert codec.num_pixel_frames(21) == 21


def test_codec_normalisation_and_errors():
    codec = ToyCodec(spatial_stride=4, scale=[0.5, 0.25, 2.0], shift=0.5)
    video = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 3, 48, 2, 2)
    torch.testing.assert_close(codec.decode(z), video)
    torch.testing.assert_close(z[:, :, 16:32], (ToyCodec(4).encode(video)[:, :, 16:32] - 0.5) / 0.25)
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.zeros(1, 1, 3, 6, 8))
    with pytest.raises(ValueError, match="scale"):
        ToyCodec(scale=[1.0, 2.0])


def test_text_encoder_pads_with_zeros_and_is_deterministic():
    enc = ToyTextEncoder()
    assert isinstance(enc, TextEncoder)
    e = enc.encode(PROMPTS)
    assert e.shape == (3, 16, 32)
    n_words = [len(p.split()) for p in PROMPTS]
    for b, n in enumerate(n_words):
        assert (e[b, n:] == 0).all() and (e[b, :n].norm(dim=-1) > 0).all()
    assert (e[2] == 0).all()  # the negative / unconditional prompt
    assert torch.equal(e, ToyTextEncoder().encode(PROMPTS))
    assert not torch.equal(e, ToyTextEncoder(seed=1).encode(PROMPTS))
    # Position-aware: swapping the two objects changes the embedding, not just its order.
    swapped = "a blue square moving up and a red circle moving left on a light background"
    assert not torch.equal(enc.encode([swapped])[0].sum(0), e[1].sum(0))
    assert ToyTextEncoder(dim=8, text_len=20).encode(PROMPTS[:1]).shape == (1, 20, 8)


def test_text_encoder_unknown_words():
    with pytest.raises(ValueError, match="'purple'"):
        ToyTextEncoder().encode(["a purple circle moving left on a dark background"])
    unk = ToyTextEncoder(unknown="unk")
    a, b = unk.encode(["a purple circle", "a violet circle"])
    assert torch.equal(a, b) and (a[:3] != 0).any()
    with pytest.raises(ValueError, match="text_len"):
        ToyTextEncoder(text_len=4).encode(PROMPTS[:1])


def test_toy_geometry():
    geo = toy_geometry(ToyWorldConfig(), ToyCodec())
    assert (geo.num_frames, geo.channels, geo.height, geo.width, geo.frames_per_chunk) == (21, 12, 16, 16, 3)
