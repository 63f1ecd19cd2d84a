"""``sfvideo generate``, the mp4/PNG writers and the prediction writer (tiny CPU configs)."""

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from sfvideo.geometry import VideoGeometry
from sfvideo.video import Mp4Writer, contact_sheet, encode_png, read_mp4, to_uint8, write_mp4

PROMPT_A = "a red circle moving left on a dark background"
PROMPT_B = "a blue square moving up on a light background"
GEO = VideoGeometry(num_frames=6, channels=12, height=4, width=4, frames_per_chunk=2)


# ---------------------------------------------------------------------------------------------- fixtures
def _module(**kw):
    from sfvideo.toy.encoders import ToyTextEncoder
    from sfvideo.training.module import SelfForcingDMD

    m = SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12}, geometry=GEO,
                       text_encoder=ToyTextEncoder(), **kw)
    m.configure_model()
    return m


def _save_ckpt(module, path, ema=None):
    ckpt = {"state_dict": dict(module.state_dict()), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # what Lightning saves: the record of networks, settings and encoders
    ckpt["rank_local"] = {} if ema is None else {"generator_ema": {"shadow": ema, "replicated": True}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SelfForcingDMD checkpoint (debug transformer, toy encoders) and its module."""
    root = tmp_path_factory.mktemp("run")
    module = _module()
    return module, _save_ckpt(module, root / "checkpoints" / "last.ckpt")


def gen(argv):
    from sfvideo.generate import main

    # The runs here train without a codec (it records none): the toy codec (12 channels at stride 2) decodes.
    return main([*map(str, argv[:1]), "--codec", "sfvideo.toy.encoders.ToyCodec", *map(str, argv[1:]), "--quiet"])


# ---------------------------------------------------------------------------------------------- generate
def test_generate_equals_module_generate_and_writes_all_frames(trained, tmp_path):
    module, ckpt = trained
    out = tmp_path / "a.mp4"
    res = gen([ckpt, "--prompt", PROMPT_A, "-o", out, "--save_latents", tmp_path / "lat.pt", "--seed", 3])
    ref = module.generate([PROMPT_A], seed=3)
    # Streaming == the non-streaming rollout, exactly: the same model calls on the same shapes in the same order.
    assert torch.equal(torch.load(tmp_path / "lat.pt"), ref)
    frames = read_mp4(out)
    assert frames.shape == (6, 8, 8, 3)  # toy codec: 1 pixel frame per latent frame, 2x spatial
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("first_chunk_s", "fps", "transformer_s", "decode_s", "pixel_frames", "latent_frames"):
        assert key in res
    assert res["pixel_frames"] == 6 and res["chunks"] == 3 and not res["interrupted"]
    # The mp4 holds the decoded latents (lossy H.264/mpeg4 on an 8x8 video: compare loosely).
    video = module.codec.decode(ref) if module.codec is not None else None
    if video is not None:
        assert np.abs(frames.astype(float) - to_uint8(video[0]).astype(float)).mean() < 40


def test_generate_long_rolling_and_prompt_schedule(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / "long.mp4"
    res = gen([ckpt, "--prompt_schedule", f"0:{PROMPT_A};12:{PROMPT_B}", "--num_frames", 24, "--window_frames", 4,
               "--sink_frames", 2, "-o", out])
    assert read_mp4(out).shape[0] == 24 and res["latent_frames"] == 24
    assert res["recache_s"] > 0


def test_generate_frame_wise_and_prompts_file(trained, tmp_path):
    _, ckpt = trained
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{PROMPT_A}\n{PROMPT_B}\n")
    res = gen([ckpt, "--prompts_file", pf, "--frames_per_chunk", 1, "--num_frames", 4, "-o", tmp_path / "fw.mp4"])
    assert res["chunks"] == 4 and read_mp4(tmp_path / "fw.mp4").shape[0] == 4


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_prompt", "empty"),
        ("bad_length", "multiple of the chunk size"),
        ("missing", "not found"),
        ("unknown", "is not a checkpoint"),
        ("not_sfvideo", "not a Lightning checkpoint"),
        ("mismatch", "do not match the architecture"),
        ("out_dir_missing", "does not exist"),
        ("out_is_dir", "is a directory"),
        ("switch_off_chunk", "chunk boundary"),
        ("no_ema", "no EMA"),
        ("unknown_word", "zebra"),
        ("not_mp4", "expected a .mp4"),
    ],
)
def test_generate_bad_input_one_line_error(trained, tmp_path, case, message):
    module, ckpt = trained
    out = tmp_path / "o.mp4"
    argv = [ckpt, "--prompt", PROMPT_A, "-o", out]
    if case == "empty_prompt":
        argv[2] = "  "
    elif case == "bad_length":
        argv += ["--num_frames", 7]
    elif case == "missing":
        argv[0] = tmp_path / "nope.ckpt"
    elif case == "unknown":
        argv[0] = tmp_path / "junk.ckpt"
        argv[0].write_bytes(b"not a checkpoint")
    elif case == "not_sfvideo":
        argv[0] = tmp_path / "other.ckpt"
        torch.save({"weights": torch.zeros(2)}, argv[0])
    elif case == "mismatch":
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        configs = state["sfvideo"]["configs"]
        configs["generator"] = {**configs["generator"], "in_channels": 4}  # says 4 channels, weights have 12
        argv[0] = tmp_path / "mis.ckpt"
        torch.save(state, argv[0])
    elif case == "out_dir_missing":
        out = tmp_path / "no" / "such" / "dir" / "o.mp4"
        argv[4] = out
    elif case == "out_is_dir":
        out = tmp_path / "d.mp4"
        out.mkdir()
        argv[4] = out
    elif case == "switch_off_chunk":
        argv[1:3] = ["--prompt_schedule", f"0:{PROMPT_A};3:{PROMPT_B}"]
    elif case == "no_ema":
        argv.append("--use_ema")
    elif case == "unknown_word":
        argv[2] = "a zebra moving left on a dark background"
    elif case == "not_mp4":
        out = tmp_path / "o.avi"
        argv[4] = out
    with pytest.raises(SystemExit) as e:
        gen(argv)
    text = str(e.value.code)
    assert text.startswith("sfvideo generate: error:") and message in text and "\n" not in text
    if case != "out_is_dir":
        assert not out.exists()
    assert not list(tmp_path.glob(".*.partial"))


def test_generate_error_has_no_traceback_subprocess(tmp_path):
    code = "import sys; from sfvideo.generate import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.ckpt"), "--prompt", "x",
                        "-o", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "checkpoint not found" in r.stderr


def test_generate_use_ema(trained, tmp_path):
    module, _ = trained
    ema = {k: p.detach() + 0.05 for k, p in module.generator.named_parameters()}
    ckpt = _save_ckpt(module, tmp_path / "ema.ckpt", ema=ema)
    a = gen([ckpt, "--prompt", PROMPT_A, "-o", tmp_path / "a.mp4", "--save_latents", tmp_path / "a.pt"])
    b = gen([ckpt, "--prompt", PROMPT_A, "-o", tmp_path / "b.mp4", "--save_latents", tmp_path / "b.pt", "--use_ema"])
    assert a["chunks"] == b["chunks"] == 3
    assert not torch.allclose(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))


class _Boom:
    """Replace the toy stream decoder's decode_chunk: raise ``exc`` on call ``k`` (0-based)."""

    def __init__(self, monkeypatch, k, exc):
        from sfvideo.toy.encoders import ToyStreamDecoder

        original = ToyStreamDecoder.decode_chunk
        calls = {"n": 0}

        def decode_chunk(dec, latents):
            if calls["n"] == k:
                raise exc
            calls["n"] += 1
            return original(dec, latents)

        monkeypatch.setattr(ToyStreamDecoder, "decode_chunk", decode_chunk)


def test_ctrl_c_mid_stream_leaves_valid_mp4(trained, tmp_path, monkeypatch):
    _, ckpt = trained
    out = tmp_path / "int.mp4"
    _Boom(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        gen([ckpt, "--prompt", PROMPT_A, "-o", out, "--num_frames", 12])
    assert e.value.code == 130
    assert read_mp4(out).shape[0] == 4  # the 2 chunks done, 2 frames each
    assert not list(tmp_path.glob(".*.partial"))


def test_failure_mid_stream_leaves_nothing(trained, tmp_path, monkeypatch):
    _, ckpt = trained
    out = tmp_path / "fail.mp4"
    _Boom(monkeypatch, 1, RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        gen([ckpt, "--prompt", PROMPT_A, "-o", out])
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------------------------------- video.py
def _video(t=5, h=10, w=14, seed=0):
    return torch.rand(t, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_mp4_writer_appends_frames(tmp_path, codec):
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, codec=codec) as w:
        assert not path.exists()  # only the temporary exists while writing
        w.write(_video(3))
        w.write(_video(4, seed=1))
        assert w.frames_written == 7
    frames = read_mp4(path)
    assert frames.shape == (7, 10, 14, 3)
    # A flat grey video survives lossy coding closely.
    write_mp4(tmp_path / "g.mp4", torch.zeros(2, 3, 16, 16))
    assert np.abs(read_mp4(tmp_path / "g.mp4").astype(int) - 128).max() <= 3


def test_mp4_writer_interrupt_keeps_frames_failure_keeps_previous(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(path) as w:
            w.write(_video(3))
            raise KeyboardInterrupt
    assert read_mp4(path).shape[0] == 3
    with pytest.raises(ValueError, match="boom"):
        with Mp4Writer(path) as w:
            w.write(_video(5))
            raise ValueError("boom")
    assert read_mp4(path).shape[0] == 3  # the previous complete file is untouched
    assert not list(tmp_path.glob(".*.partial"))
    with pytest.raises(ValueError, match="differs"):
        with Mp4Writer(tmp_path / "x.mp4") as w:
            w.write(_video(1))
            w.write(_video(1, h=12))
    assert not (tmp_path / "x.mp4").exists()


def test_mp4_writer_unwritable(tmp_path):
    with pytest.raises(OSError, match="cannot write video"):
        Mp4Writer(tmp_path / "missing" / "v.mp4")


def _decode_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 2)
    # The scanlines are filtered (Pillow picks a PNG filter per line), so Pillow reverses the filters.
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(data)))
    assert pixels.shape == (h, w, 3) and len(zlib.decompress(chunks[b"IDAT"])) == h * (1 + 3 * w)
    return pixels


def test_png_and_contact_sheet_layout():
    video = _video(10, 6, 7).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    sheet = contact_sheet(video, columns=4, pad=2)
    assert sheet.shape == (2 * 6 + 3 * 2, 4 * 7 + 5 * 2, 3)
    # Tile (row 1, column 3) is the last frame; column 1 is frame round(1 * 9 / 3) = 3.
    tiles = to_uint8(video[1])
    assert (sheet[2 + 8 : 2 + 8 + 6, 2 + 3 * 9 : 2 + 3 * 9 + 7] == tiles[9]).all()
    assert (sheet[2:8, 2 + 9 : 2 + 9 + 7] == tiles[3]).all()
    assert (_decode_png(encode_png(sheet)) == sheet).all()


# ---------------------------------------------------------------------------------------------- prediction writer
def test_prediction_writer(tmp_path):
    from types import SimpleNamespace

    from sfvideo.training.writers import VideoPredictionWriter

    trainer = SimpleNamespace(global_rank=0, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    w = VideoPredictionWriter()
    pred = {"prompts": [PROMPT_A, PROMPT_B], "latents": torch.zeros(2, 4, 12, 3, 3),
            "video": torch.rand(2, 4, 3, 6, 6) * 2 - 1}
    w.write_on_batch_end(trainer, None, pred, None, None, 7, 0)
    folder = tmp_path / "predictions"
    mp4s = sorted(folder.glob("*.mp4"))
    assert len(mp4s) == 2 and len(list(folder.glob("*.png"))) == 2
    assert all(read_mp4(p).shape == (4, 6, 6, 3) for p in mp4s)
    assert "b00007" in mp4s[0].name and "red_circle" in mp4s[0].name
    # Without a codec: latents only.
    w.write_prediction(trainer, {**pred, "video": None}, 8)
    assert len(list(folder.glob("*b00008*.pt"))) == 2
    assert len((folder / "prompts.r0.jsonl").read_text().splitlines()) == 4


def test_generate_with_wan_vae_codec_frame_count(trained, tmp_path):
    from diffusers import AutoencoderKLWan

    _, ckpt = trained
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=12, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 12, latents_std=[1.0] * 12)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "wan.mp4"
    res = gen([ckpt, "--prompt", PROMPT_A, "-o", out, "--codec", "sfvideo.nn.wan_vae.WanVAECodec", "--codec.vae",
               tmp_path / "vae"])
    # Streaming Wan VAE decode: 1 + 4 (F - 1) pixel frames (first chunk 1 + 4 (f - 1), then 4 f), 8x spatial.
    assert read_mp4(out).shape == (1 + 4 * (GEO.num_frames - 1), 32, 32, 3)
    assert res["pixel_frames"] == 21
