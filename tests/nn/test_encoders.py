"""umT5 text encoder, prompt-embedding files and the Wan VAE codec, on tiny random models built here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from sfvideo.files import read_prompt_file as read_prompts
from sfvideo.nn.interfaces import TextEncoder, VideoCodec, freeze
from sfvideo.nn.prompt_embeddings import load_prompt_embeddings, precompute_prompt_embeddings
from sfvideo.nn.umt5 import UMT5TextEncoder
from sfvideo.nn.wan_vae import WanVAECodec

TEXT_LEN = 8
WORDS = "a cat dog runs on the beach at sunset bright tones overexposed static blurry".split()


# ----------------------------------------------------------------------------------------------------------------
# umT5
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A diffusers-Wan-like folder with text_encoder/ (random tiny umT5) and tokenizer/ (word-level, EOS appended)."""
    root = tmp_path_factory.mktemp("wan")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=len(vocab),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def text_encoder(wan_folder) -> UMT5TextEncoder:
    return UMT5TextEncoder(wan_folder, text_len=TEXT_LEN, dtype="fp32", negative_prompt="static blurry")


def test_encode_zeroes_padding_and_matches_masked_reference(text_encoder: UMT5TextEncoder):
    assert isinstance(text_encoder, TextEncoder)
    assert text_encoder.dim == 16
    prompts = ["a cat", "dog runs on the beach"]
    emb, lengths = text_encoder.encode_with_lengths(prompts)
    assert emb.shape == (2, TEXT_LEN, 16)
    assert lengths.tolist() == [3, 6]  # words + EOS
    for row, n in zip(emb, lengths.tolist(), strict=True):
        assert (row[n:] == 0).all()
        assert (row[:n].abs().sum(-1) > 0).all()
    # Reference: the HF model on the same tokens with the attention mask, truncated to each length.
    tok = text_encoder.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    with torch.no_grad():
        ref = text_encoder.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    # Same tokens, mask and batch shape as our encoder's own call: exact.
    torch.testing.assert_close(emb[0, :3], ref[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(emb[1, :6], ref[1, :6], rtol=0, atol=0)
    assert ref[0, 3:].abs().sum() > 0  # the model's own padding rows are not zero: zeroing is ours
    # Masking makes a prompt's embedding independent of its batch neighbours; cleaning collapses whitespace.
    # Batch of 1 vs 2: different GEMM shapes, so fp32 rounding (assert_close's default tolerance), not exact.
    torch.testing.assert_close(text_encoder.encode(["  a \t cat  "])[0], emb[0])
    assert not emb.requires_grad


def test_truncation_to_text_len(text_encoder: UMT5TextEncoder):
    emb, lengths = text_encoder.encode_with_lengths([" ".join(WORDS)])
    assert emb.shape == (1, TEXT_LEN, 16) and lengths.tolist() == [TEXT_LEN]


def test_negative_prompt_is_encoded_once(text_encoder: UMT5TextEncoder):
    calls = []
    handle = text_encoder.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        text_encoder.clear_cache()
        first = text_encoder.encode_negative()
        second = text_encoder.encode_negative(batch_size=3)
        other = text_encoder.encode_negative("a cat")
    finally:
        handle.remove()
    assert len(calls) == 2  # the default negative prompt once, "a cat" once
    assert second.shape == (3, TEXT_LEN, 16) and torch.equal(second[2], first[0])
    torch.testing.assert_close(first, text_encoder.encode(["static blurry"]))
    assert not torch.equal(first, other)


def test_frozen_and_dtype(wan_folder: Path, text_encoder: UMT5TextEncoder):
    assert not text_encoder.model.training
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    m = torch.nn.Linear(2, 2)
    assert freeze(m) is m and not m.training and not m.weight.requires_grad
    bf16 = UMT5TextEncoder(
        text_encoder=wan_folder / "text_encoder", tokenizer=wan_folder / "tokenizer", text_len=TEXT_LEN, offload=True
    )
    assert bf16.encode(["a cat"]).dtype == torch.bfloat16
    assert all(p.device.type == "cpu" for p in bf16.model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Prompt-embedding files
# ----------------------------------------------------------------------------------------------------------------


def test_precompute_round_trip(tmp_path: Path, text_encoder: UMT5TextEncoder):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n\n  dog runs on the beach \nbright tones at sunset\n\n", encoding="utf-8")
    out = precompute_prompt_embeddings(
        text_encoder, prompts_file, tmp_path / "emb" / "p.safetensors", batch_size=2, progress=False
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.safetensors"]  # no temporary left behind
    loaded = load_prompt_embeddings(out)
    assert loaded.prompts == ["a cat", "dog runs on the beach", "bright tones at sunset"]
    assert len(loaded) == 3 and loaded.text_len == TEXT_LEN and loaded.dim == 16
    assert [loaded[i].shape[0] for i in range(3)] == [3, 6, 5]  # stored trimmed
    assert loaded.embeddings.shape == (14, 16)
    expected = text_encoder.encode(loaded.prompts)
    torch.testing.assert_close(loaded.padded(), expected)
    torch.testing.assert_close(loaded.padded([2, 0]), expected[[2, 0]])

    # A generic TextEncoder without encode_with_lengths: lengths come from the zeroed padding.
    class Plain:
        text_len, dim = TEXT_LEN, 16

        def encode(self, prompts):
            return text_encoder.encode(prompts)

    again = load_prompt_embeddings(
        precompute_prompt_embeddings(Plain(), prompts_file, tmp_path / "q.safetensors", progress=False)
    )
    assert torch.equal(again.offsets, loaded.offsets)


def test_prompt_file_errors(tmp_path: Path, text_encoder: UMT5TextEncoder):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        precompute_prompt_embeddings(text_encoder, missing, tmp_path / "o.safetensors", progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=re.escape(str(blank)) + ".*no prompts"):
        read_prompts(blank)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat\n\ndog \xff\xfe runs\nbeach\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3:") + " not valid UTF-8"):
        precompute_prompt_embeddings(text_encoder, bad, tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="o.safetensors"):
        load_prompt_embeddings(tmp_path / "o.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_prompt_embeddings(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Wan VAE
# ----------------------------------------------------------------------------------------------------------------

Z_DIM = 4


@pytest.fixture(scope="module")
def codec() -> WanVAECodec:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.3, -0.2, 0.1, 0.5],
        latents_std=[1.5, 0.5, 2.0, 0.8],
    )
    return WanVAECodec(vae)


def test_codec_geometry(codec: WanVAECodec):
    assert isinstance(codec, VideoCodec)
    assert (codec.latent_channels, codec.spatial_stride, codec.temporal_stride) == (Z_DIM, 8, 4)
    assert [codec.num_pixel_frames(f) for f in (1, 2, 5, 21)] == [1, 5, 17, 81]
    assert codec.num_latent_frames(81) == 21
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.num_latent_frames(80)


# Streaming and full decodes run the same convolutions on inputs of different temporal length, and oneDNN picks
# kernels (and reduction orders) by shape, thread count and CPU: they agree to fp32 rounding, not bit for bit
# (seen: 3e-6 on AMD EPYC with 1 thread). Bound: outputs are O(1); each of the decoder's ~15 sequential convolutions
# (reductions of <= 27 * 32 products) adds a few ulps (2^-23 ~ 1.2e-7) of relative error, so 1e-5 (~80 ulps) covers
# any summation order, while a wrong cache (below) moves frames by > 1e-2.
VAE_FP32_ATOL = 1e-5


@pytest.mark.parametrize("chunks", [[2, 2, 1], [1, 3, 1]])
def test_stream_decode_equals_full_decode_to_fp32_rounding(codec: WanVAECodec, chunks: list[int]):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, sum(chunks), Z_DIM, 2, 2, generator=g)
    full = codec.decode(latents)
    assert full.shape == (2, codec.num_pixel_frames(sum(chunks)), 3, 16, 16)
    assert ((full > -1) & (full < 1)).float().mean() > 0.5 and full.std() > 0  # not saturated or constant

    stream, other = codec.stream_decoder(), codec.stream_decoder()
    other_latents = torch.randn_like(latents)
    pieces, other_pieces, start = [], [], 0
    for n in chunks:  # two interleaved streams: each decoder owns its cache
        pieces.append(stream.decode_chunk(latents[:, start : start + n]))
        other_pieces.append(other.decode_chunk(other_latents[:, start : start + n]))
        start += n
    expected_lengths = [codec.num_pixel_frames(chunks[0])] + [codec.temporal_stride * n for n in chunks[1:]]
    assert [p.shape[1] for p in pieces] == expected_lengths
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=VAE_FP32_ATOL)
    torch.testing.assert_close(torch.cat(other_pieces, dim=1), codec.decode(other_latents), rtol=0, atol=VAE_FP32_ATOL)

    # Without the carried cache (a fresh decoder for the last chunk) the last frame differs: the cache matters.
    fresh = codec.stream_decoder().decode_chunk(latents[:, -chunks[-1] :])
    assert (fresh[:, -1] - full[:, -1]).abs().max() > 1000 * VAE_FP32_ATOL


def test_normalisation(codec: WanVAECodec):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 5, 3, 16, 16, generator=g) * 2 - 1
    latents = codec.encode(video)
    assert latents.shape == (1, 2, Z_DIM, 2, 2) and latents.dtype == torch.float32
    mean = torch.tensor(codec.vae.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(codec.vae.config.latents_std).view(1, 1, -1, 1, 1)
    with torch.no_grad():
        raw = codec.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # decode applies the inverse map before the VAE: decode(normalised) == vae.decode(raw)
    with torch.no_grad():
        ref = codec.vae.decode(raw.permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(codec.decode(latents), ref)
    torch.testing.assert_close(codec._denormalise(latents).permute(0, 2, 1, 3, 4), raw)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.encode(torch.zeros(1, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 2, Z_DIM + 1, 2, 2))


def test_codec_from_folder(tmp_path: Path, codec: WanVAECodec):
    codec.vae.save_pretrained(tmp_path / "wan" / "vae")
    loaded = WanVAECodec(tmp_path / "wan", dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and not loaded.vae.training
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert loaded.decode(torch.zeros(1, 1, Z_DIM, 2, 2)).shape == (1, 1, 3, 16, 16)
