"""TAEHV tiny decoder (``sfvideo.nn.taehv``): weight-file layout of ``taew2_1.pth``, streaming vs full decode,
frame counts and strides of the Wan VAE, determinism, selection in ``sfvideo generate`` (random weights only)."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sfvideo.nn.interfaces import StreamDecoder, VideoCodec
from sfvideo.nn.taehv import (
    TAEHV,
    MemBlock,
    TAEHVCodec,
    TAEHVConfig,
    TGrow,
    load_taehv,
    taehv_state_dict_shapes,
)

TINY = TAEHVConfig(latent_channels=4, encoder_width=8, decoder_widths=(16, 8, 8, 8))


def taew2_1_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``taew2_1.pth``, spelled out from upstream's two ``nn.Sequential`` (madebyollin/taehv,
    ``taehv.py``; the same in Self Forcing's ``demo_utils/taehv.py``), independently of the library."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix, n_in, n_out, k=3, bias=True):
        shapes[f"{prefix}.weight"] = (n_out, n_in, k, k)
        if bias:
            shapes[f"{prefix}.bias"] = (n_out,)

    def mem(prefix, n):  # MemBlock(n, n): conv.0 on cat[x, past], ReLU, conv.2, ReLU, conv.4; skip is Identity
        conv(f"{prefix}.conv.0", 2 * n, n)
        conv(f"{prefix}.conv.2", n, n)
        conv(f"{prefix}.conv.4", n, n)

    # encoder: 0 conv(3, 64), 1 ReLU, then per stage TPool(64, s), conv stride 2 (no bias), 3 MemBlocks; 17 conv
    conv("encoder.0", 3, 64)
    i = 2
    for stride in (2, 2, 1):
        shapes[f"encoder.{i}.conv.weight"] = (64, 64 * stride, 1, 1)
        conv(f"encoder.{i + 1}", 64, 64, bias=False)
        for j in range(3):
            mem(f"encoder.{i + 2 + j}", 64)
        i += 5
    conv(f"encoder.{i}", 64, 16)
    # decoder: 0 Clamp, 1 conv(16, 256), 2 ReLU, then per stage 3 MemBlocks, Upsample, TGrow, conv (no bias);
    # 21 ReLU, 22 conv(64, 3)
    conv("decoder.1", 16, 256)
    widths, i = (256, 128, 64, 64), 3
    for s, stride in enumerate((1, 2, 2)):
        for j in range(3):
            mem(f"decoder.{i + j}", widths[s])
        shapes[f"decoder.{i + 4}.conv.weight"] = (widths[s] * stride, widths[s], 1, 1)
        conv(f"decoder.{i + 5}", widths[s], widths[s + 1], bias=False)
        i += 6
    conv(f"decoder.{i + 1}", 64, 3)
    return shapes


def random_taehv(config: TAEHVConfig = TINY, seed: int = 0) -> TAEHV:
    """Random weights scaled so activations neither vanish nor saturate (outputs spread over [0, 1])."""
    torch.manual_seed(seed)
    model = TAEHV(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
        model.decoder[-1].bias.fill_(0.5)
    return model.eval()


def reference_decode(model: TAEHV, latents: torch.Tensor) -> torch.Tensor:
    """Frame-by-frame decode written independently of the library (upstream's sequential semantics): one frame
    at a time visits the blocks in order; a MemBlock sees its own previous input frame (zeros before the first),
    a TGrow turns a frame into ``stride`` consecutive frames; the first ``upscale - 1`` frames are dropped."""
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def visit(i: int, x: torch.Tensor) -> None:
        if i == len(model.decoder):
            out.append(x)
            return
        block = model.decoder[i]
        if isinstance(block, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            visit(i + 1, block(x, past))
        elif isinstance(block, TGrow):
            for sub in block.conv(x).chunk(block.stride, dim=1):
                visit(i + 1, sub)
        else:
            visit(i + 1, block(x))

    with torch.no_grad():
        for t in range(latents.shape[1]):
            visit(0, latents[:, t])
    return torch.stack(out, dim=1).clamp(0, 1)[:, model.config.temporal_upscale - 1 :]


@pytest.fixture(scope="module")
def codec() -> TAEHVCodec:
    return TAEHVCodec(model=random_taehv())


# ----------------------------------------------------------------------------------------------------------------
# weight files
# ----------------------------------------------------------------------------------------------------------------


def test_key_layout_is_taew2_1():
    expected = taew2_1_layout()
    assert len(expected) == 128
    assert taehv_state_dict_shapes() == expected
    assert list(TAEHV().state_dict()) == list(expected)  # same order too (nn.Sequential indices)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_loads_a_file_with_the_real_layout(tmp_path: Path, fmt: str):
    g = torch.Generator().manual_seed(0)
    # fp16 on disk: the codec casts to its own dtype (fp32 on CPU under "auto")
    sd = {k: torch.randn(shape, generator=g).half() for k, shape in taew2_1_layout().items()}
    path = tmp_path / f"taew2_1.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    codec = TAEHVCodec(path)
    assert codec.dtype == torch.float32 and codec.device.type == "cpu"
    assert (codec.latent_channels, codec.spatial_stride, codec.temporal_stride) == (16, 8, 4)
    loaded = codec.model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in sd.items())
    assert not any(p.requires_grad for p in codec.model.parameters())
    frames = codec.decode(torch.randn(1, 2, 16, 2, 3, generator=g))
    assert frames.shape == (1, 5, 3, 16, 24) and frames.dtype == torch.float32


def test_tgrow_with_more_rows_is_cut_to_the_last_ones(tmp_path: Path):
    # A file trained with temporal upscaling served without it: upstream keeps the last sub-frame's channels.
    cfg = TAEHVConfig(**{**TINY.__dict__, "decoder_time_upscale": (False, False, True)})
    full = random_taehv(TINY).state_dict()
    torch.save(full, tmp_path / "t.pth")
    model = load_taehv(tmp_path / "t.pth", cfg)
    key = "decoder.13.conv.weight"  # TGrow of stage 2: stride 2 in the file, 1 in cfg
    assert torch.equal(model.state_dict()[key], full[key][-TINY.decoder_widths[1] :])


def _one_line(excinfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path: Path):
    sd = random_taehv(TINY).state_dict()
    missing = tmp_path / "missing_key.pth"
    torch.save({k: v for k, v in sd.items() if k != "decoder.7.conv.weight"}, missing)
    with pytest.raises(ValueError) as e:
        load_taehv(missing, TINY)
    assert "missing keys decoder.7.conv.weight" in _one_line(e, missing)

    extra = tmp_path / "extra_key.pth"
    torch.save({**sd, "decoder.23.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError) as e:
        load_taehv(extra, TINY)
    assert "unexpected keys decoder.23.weight" in _one_line(e, extra)

    # The real layout read with the tiny config: many keys differ in shape, the first is named.
    shaped = tmp_path / "taew2_1.pth"
    torch.save({k: torch.zeros(s) for k, s in taew2_1_layout().items()}, shaped)
    with pytest.raises(ValueError) as e:
        load_taehv(shaped, TINY)
    assert re.search(r"encoder\.0\.weight has shape \(64, 3, 3, 3\), expected \(8, 3, 3, 3\)", _one_line(e, shaped))

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError) as e:
        load_taehv(junk)
    assert "cannot read TAEHV weights" in _one_line(e, junk)

    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(ValueError) as e:
        load_taehv(not_sd)
    _one_line(e, not_sd)

    with pytest.raises(FileNotFoundError) as e:
        TAEHVCodec(tmp_path / "nope.pth")
    _one_line(e, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="exactly one of"):
        TAEHVCodec()


# ----------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------


def test_protocols_and_geometry(codec: TAEHVCodec):
    assert isinstance(codec, VideoCodec) and isinstance(codec.stream_decoder(), StreamDecoder)
    assert (codec.latent_channels, codec.spatial_stride, codec.temporal_stride) == (4, 8, 4)
    # the Wan VAE's frame count: 1 + 4 (F - 1)
    assert [codec.num_pixel_frames(f) for f in (1, 2, 5, 21)] == [1, 5, 17, 81]
    assert codec.num_latent_frames(81) == 21
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.num_latent_frames(80)


def test_full_decode_matches_frame_by_frame_reference(codec: TAEHVCodec):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 5, 4, 3, 2, generator=g)
    full = codec.decode(latents)
    assert full.shape == (2, codec.num_pixel_frames(5), 3, 24, 16)
    assert ((full > -1) & (full < 1)).float().mean() > 0.5 and full.std() > 0.1  # neither saturated nor constant
    ref = reference_decode(codec.model, latents) * 2 - 1
    # all frames at once vs one frame per conv call: different batch sizes, so kernels may differ (fp32 rounding)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [[3, 3, 3], [1, 2, 4, 1], [9]])
def test_stream_decode_equals_full_decode(codec: TAEHVCodec, chunks: list[int]):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, sum(chunks), 4, 2, 3, generator=g)
    other_latents = torch.randn(latents.shape, generator=g)
    full, other_full = codec.decode(latents), codec.decode(other_latents)
    stream, other = codec.stream_decoder(), codec.stream_decoder()
    pieces, other_pieces, start = [], [], 0
    for n in chunks:  # two interleaved streams on one model: each decoder owns its state
        pieces.append(stream.decode_chunk(latents[:, start : start + n]))
        other_pieces.append(other.decode_chunk(other_latents[:, start : start + n]))
        start += n
    assert [p.shape[1] for p in pieces] == [codec.num_pixel_frames(chunks[0])] + [4 * n for n in chunks[1:]]
    # same operations on fewer frames per conv call: equal up to fp32 rounding
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(other_pieces, dim=1), other_full, rtol=1e-5, atol=1e-5)
    if len(chunks) > 1:
        # Without the carried state (a fresh decoder for the last chunk) the frames differ: the state matters.
        fresh = codec.stream_decoder().decode_chunk(latents[:, -chunks[-1] :])
        assert (fresh[:, -1] - full[:, -1]).abs().max() > 1e-2


def test_state_is_passed_in_and_out_not_stored(codec: TAEHVCodec):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 6, 4, 2, 2, generator=g)
    model = codec.model
    with torch.no_grad():
        first, state = model.decode_stream(latents[:, :3])
        second, state2 = model.decode_stream(latents[:, 3:], state)
        again, _ = model.decode_stream(latents[:, 3:], state)  # the state is immutable: replaying gives the same
    assert torch.equal(second, again)
    assert state.frames_out == 12 and state2.frames_out == 24 and first.shape[1] == 9
    mem_slots = [i for i, m in enumerate(state.memory) if m is not None]
    assert mem_slots == [i for i, b in enumerate(model.decoder) if isinstance(b, MemBlock)]
    assert not any(isinstance(v, torch.Tensor) for v in vars(model).values())  # nothing stashed on the module
    with pytest.raises(ValueError, match="batch or latent size changed"):
        model.decode_stream(torch.randn(2, 1, 4, 2, 2), state)
    with pytest.raises(ValueError, match="latents"):
        codec.stream_decoder().decode_chunk(torch.randn(1, 1, 5, 2, 2))


def test_frames_per_call_and_determinism():
    model = random_taehv()
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 7, 4, 2, 3, generator=g)
    whole = TAEHVCodec(model=model)
    split = TAEHVCodec(model=model, frames_per_call=2)
    a = whole.decode(latents)
    torch.testing.assert_close(split.decode(latents), a, rtol=1e-5, atol=1e-5)  # passes of 2 vs 7 frames
    assert torch.equal(whole.decode(latents), a)  # same shapes, same kernels: bit-identical
    dec = split.stream_decoder()
    assert dec.decode_chunk(latents[:, :3]).shape[1] == 9
    dec.reset()
    assert dec.state.frames_out == 0 and dec.decode_chunk(latents[:, :1]).shape[1] == 1


def test_channels_last_equals_contiguous():
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(2, 4, 4, 3, 2, generator=g)
    video = torch.rand(1, 5, 3, 16, 24, generator=g) * 2 - 1
    plain, cl = TAEHVCodec(model=random_taehv()), TAEHVCodec(model=random_taehv(), channels_last=True)
    assert not plain.channels_last and cl.model.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    # NHWC vs NCHW kernels: fp32 rounding
    torch.testing.assert_close(cl.decode(latents), plain.decode(latents), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cl.encode(video), plain.encode(video), rtol=1e-5, atol=1e-5)
    dec = cl.stream_decoder()
    streamed = torch.cat([dec.decode_chunk(latents[:, :1]), dec.decode_chunk(latents[:, 1:])], dim=1)
    torch.testing.assert_close(streamed, plain.decode(latents), rtol=1e-5, atol=1e-5)


def test_encode_shapes_and_range():
    codec = TAEHVCodec(model=random_taehv())
    g = torch.Generator().manual_seed(5)
    video = torch.rand(2, 9, 3, 16, 24, generator=g) * 2 - 1
    latents = codec.encode(video)
    assert latents.shape == (2, codec.num_latent_frames(9), 4, 2, 3) and latents.dtype == torch.float32
    assert codec.decode(latents).shape == video.shape
    # upstream's padding: the end repeats the last frame up to a multiple of 4 frames
    padded = torch.cat([video, video[:, -1:].expand(-1, 3, -1, -1, -1)], dim=1)
    with torch.no_grad():
        direct = codec.model.encode_video((padded + 1) / 2)
    assert torch.equal(latents, direct)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.encode(video[:, :8])
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(video[..., :12])


def test_dtype_and_config_options(tmp_path: Path):
    model = random_taehv()
    assert TAEHVCodec(model=random_taehv(), dtype="bf16").dtype == torch.bfloat16
    assert TAEHVCodec(model=model, dtype=None).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        TAEHVCodec(model=random_taehv(), dtype="int8")
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    as_json = json.loads(json.dumps(TINY.__dict__))  # lists instead of tuples, as JSON on the command line gives
    assert TAEHVCodec(tmp_path / "tiny.pth", config=as_json).model.config == TINY
    with pytest.raises(ValueError, match="unknown fields"):
        TAEHVConfig.from_mapping({"latent_chans": 4})
    with pytest.raises(ValueError, match="decoder_widths"):
        TAEHVConfig(decoder_widths=(8, 8))
    preview = TAEHVConfig(**{**TINY.__dict__, "decoder_space_upscale": (True, True, False)})
    with pytest.raises(ValueError, match="full decoder"):
        TAEHVCodec(model=TAEHV(preview))


# ----------------------------------------------------------------------------------------------------------------
# selection in sfvideo generate (no change to generate.py: --codec takes a class path)
# ----------------------------------------------------------------------------------------------------------------


def test_selectable_in_generate(tmp_path: Path):
    from sfvideo.geometry import VideoGeometry
    from sfvideo.training.module import SelfForcingDMD
    from sfvideo.video import read_mp4

    torch.set_num_threads(1)
    geo = VideoGeometry(num_frames=4, channels=12, height=2, width=2, frames_per_chunk=2)
    from sfvideo.toy.encoders import ToyTextEncoder

    module = SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12}, geometry=geo,
                            text_encoder=ToyTextEncoder())
    module.configure_model()
    state = {"state_dict": dict(module.state_dict()), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)  # what Lightning saves: weights plus the run's record (no codec here)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save(state, ckpt)
    cfg = TAEHVConfig(**{**TINY.__dict__, "latent_channels": 12})
    torch.save(random_taehv(cfg).state_dict(), tmp_path / "taehv12.pth")

    from sfvideo.generate import main

    decoder = json.dumps({"class_path": "sfvideo.nn.taehv.TAEHVCodec",
                          "init_args": {"path": str(tmp_path / "taehv12.pth"), "config": cfg.__dict__}})
    out = tmp_path / "t.mp4"
    res = main([str(ckpt), "--prompt", "a red circle moving left on a dark background", "-o", str(out),
                "--decoder", decoder, "--quiet"])
    assert res["pixel_frames"] == 1 + 4 * 3 and res["chunks"] == 2
    assert read_mp4(out).shape == (13, 16, 16, 3)


@pytest.mark.gpu
def test_cuda_defaults_stream_matches_fp32_reference():
    model = random_taehv()
    cpu = TAEHVCodec(model=random_taehv())
    codec = TAEHVCodec(model=model, device="cuda")
    assert codec.dtype == torch.float16 and codec.channels_last
    latents = torch.randn(1, 5, 4, 3, 2, generator=torch.Generator().manual_seed(7))
    dec = codec.stream_decoder()
    streamed = torch.cat([dec.decode_chunk(latents[:, :2].cuda()), dec.decode_chunk(latents[:, 2:].cuda())], dim=1)
    # fp16 weights and activations: agreement to fp16 rounding accumulated over the decoder
    assert (streamed.float().cpu() - cpu.decode(latents)).abs().max() < 0.05
