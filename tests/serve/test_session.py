"""The serving adapter over the inference engine: equal to the engine's own generation across a prompt switch,
flat memory, prompt validation, loading from what runs write (a Lightning checkpoint, its export, bare weights)."""

import shutil
import weakref

import numpy as np
import pytest
import torch
from conftest import PROMPT_A, PROMPT_B, load_generator

from sfvideo.serve.session import PromptError, ServeError


def _cache_bytes(cache):
    return sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v] if t is not None)


def _stream(generator, seed, n, switch_at=None):
    session = generator.new_session(seed)
    session.start(generator.encode_prompt(PROMPT_A))
    chunks = []
    for i in range(n):
        if i == switch_at:
            session.switch(generator.encode_prompt(PROMPT_B))
        chunks.append(session.next_chunk())
    session.close()
    return chunks


def test_session_equals_the_engines_scheduled_generation_across_a_prompt_switch(generator):
    """The viewer's switch at chunk 4 gives the same video as the engine generating the same switch from a
    schedule known in advance (an endless session of the same seed), decoded by the engine's own decode.

    Six chunks of 2 over a 6-frame window: the switch at chunk 4 re-caches after evictions began (chunk 3).
    """
    from sfvideo.video import to_uint8

    g, f, seed, switch_at, n = generator, generator.frames_per_chunk, 3, 4, 6
    got = _stream(g, seed, n, switch_at)

    engine = g.engine
    reference = engine.session(endless=True)
    reference.start(PROMPT_A, seed=seed, schedule=[(switch_at * f, PROMPT_B)])
    ref = [reference.next_chunk().chunk for _ in range(n)]
    for mine, theirs in zip(got, ref, strict=True):
        # Same kernels on the same shapes and values in the same order: bit-identical by construction.
        assert torch.equal(mine.latents, theirs.latents), mine.index
        assert (mine.index, mine.segment, mine.recached, mine.start_frame) == (
            theirs.index, theirs.segment, theirs.recached, theirs.start_frame)
    assert [c.prompt for c in got] == [PROMPT_A] * switch_at + [PROMPT_B] * (n - switch_at)
    assert [c.recached for c in got] == [i == switch_at for i in range(n)]
    # The streamed frames are the engine's full decode of the latents (the toy codec decodes chunk-wise exactly).
    video = to_uint8(engine.decode(torch.cat([c.latents for c in got], 1))[0])
    assert video.shape == (n * f, g.frame_height, g.frame_width, 3) and video.dtype.name == "uint8"
    assert np.array_equal(video, np.concatenate([c.frames for c in got]))
    assert all(c.transformer_s > 0 and c.decode_s >= 0 for c in got) and got[switch_at].recache_s > 0


def test_the_checkpoint_and_its_export_serve_the_same_stream(generator, generator_checkpoint):
    from_ckpt = load_generator(generator_checkpoint)
    assert from_ckpt.describe() | {"source": ""} == generator.describe() | {"source": ""}
    for mine, theirs in zip(_stream(from_ckpt, 1, 3, 2), _stream(generator, 1, 3, 2), strict=True):
        assert torch.equal(mine.latents, theirs.latents)  # same weights, same settings, same kernels


def test_long_stream_runs_on_the_rolling_cache_with_flat_memory(generator):
    g = generator
    session = g.new_session(0)
    session.start(g.encode_prompt(PROMPT_A))
    fill = g.capacity_frames // g.frames_per_chunk
    sizes = []
    for i in range(6 * fill):
        if i % (2 * fill) == fill:
            session.switch(g.encode_prompt(PROMPT_B if i % (4 * fill) == fill else PROMPT_A))
        chunk = session.next_chunk()
        assert chunk.start_frame == i * g.frames_per_chunk
        if i >= fill:
            sizes.append((_cache_bytes(session.kv_cache), len(session.kv_cache.frame_ids), len(session._texts)))
    assert set(sizes) == {(sizes[0][0], g.capacity_frames, 1)} and sizes[0][0] > 0  # nothing grows
    assert session.kv_cache.frame_ids[-1] == 6 * fill * g.frames_per_chunk - 1


def test_close_frees_the_cache_at_once(generator):
    session = generator.new_session(0)
    session.start(generator.encode_prompt(PROMPT_A))
    session.next_chunk()
    ref = weakref.ref(session.kv_cache)
    session.close()
    assert ref() is None
    with pytest.raises(RuntimeError, match="closed"):
        session.next_chunk()


@pytest.mark.parametrize(
    "prompt, reason",
    [
        ("", "empty"),
        ("   \t ", "empty"),
        ("a red circle\x00 moving left", "control"),
        ("a red circle \x1b[31m moving", "control"),
        ("a zebra moving left on a dark background", "'zebra'"),
        ("a red circle " * 6, "18 words; this generator reads at most 16"),
        ("x" * 501, "501 characters; at most 500"),
        (42, "must be text"),
    ],
)
def test_bad_prompts_are_rejected_with_the_reason(generator, prompt, reason):
    with pytest.raises(PromptError, match=reason.replace("[", r"\[")):
        generator.check_prompt(prompt)


def test_prompts_are_normalised_and_known_words_pass(generator):
    assert generator.check_prompt("  A red   circle moving\nleft on a dark background ") == (
        "A red circle moving left on a dark background")
    assert generator.encode_prompt(PROMPT_A).context.shape == (1, 16, 32)


TOY = "sfvideo.toy.encoders"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--codec", f"{TOY}.ToyCodec", "--codec.spatial_stride", "4"],
         "--geometry.channels=12 differs from the latent channels of --codec (or --decoder) (ToyCodec: 48)"),
        (["--decoder", f"{TOY}.ToyCodec", "--decoder.spatial_stride", "1"], "(ToyCodec: 3)"),
        (["--window_frames", "3"], "--window_frames=3 must be a positive multiple of the chunk size 2"),
        (["--sink_frames", "1"], "--sink_frames=1"),
        (["--frames_per_chunk", "0"], "--frames_per_chunk must be positive"),
        (["--text_encoder", f"{TOY}.ToyTextEncoder", "--text_encoder.dim", "16"],
         "--text_encoder gives 16-dim embeddings (ToyTextEncoder) but the generator expects text_dim=32"),
        (["--max_prompt_chars", "0"], "--max_prompt_chars"),
        (["--use_ema"], "no EMA weights"),
        (["--device", "cuda:7" if not torch.cuda.is_available() else "nope"], "--device"),
    ],
)
def test_loading_errors_are_one_line(generator_checkpoint, extra, message):
    with pytest.raises(ServeError) as e:
        load_generator(generator_checkpoint, *extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bare_diffusers_folder_serves_with_the_settings_and_encoders_as_flags(generator_folder, tmp_path):
    """Weights that record nothing (another tool's diffusers folder): the flags give what an export records."""
    bare = shutil.copytree(generator_folder, tmp_path / "bare")
    (bare / "sfvideo.json").unlink()
    with pytest.raises(ServeError, match="records no text encoder: give --text_encoder CLASS_PATH"):
        load_generator(bare)
    encoders = ["--text_encoder", f"{TOY}.ToyTextEncoder", "--codec", f"{TOY}.ToyCodec"]
    with pytest.raises(ServeError, match="--geometry.channels=16 differs from the latent channels of --codec"):
        load_generator(bare, *encoders)  # Wan2.1's defaults
    settings = ["--geometry.num_frames", "6", "--geometry.channels", "12", "--geometry.height", "8",
                "--geometry.width", "8", "--geometry.frames_per_chunk", "2", "--schedule.denoising_steps",
                "[1000, 500]"]
    served = load_generator(bare, *encoders, *settings)
    generator = load_generator(generator_folder)
    for mine, theirs in zip(_stream(served, 2, 2), _stream(generator, 2, 2), strict=True):
        assert torch.equal(mine.latents, theirs.latents)


def test_a_bidirectional_teacher_cannot_stream_endlessly(tmp_path):
    from sfvideo.training.networks import asset_path

    teacher = asset_path("toy_teacher")
    if teacher is None:
        pytest.skip("toy teacher asset not built")
    with pytest.raises(ServeError, match="bidirectional model .* cannot stream endlessly"):
        load_generator(teacher)


def test_describe_offers_the_toy_vocabulary_and_prompts(generator):
    info = generator.describe()
    assert info["frame_height"] == info["frame_width"] == 16 and info["max_words"] == 16
    assert (info["latent_frames_per_chunk"], info["window_frames"], info["sink_frames"]) == (2, 6, 0)
    assert "circle" in info["vocabulary"] and info["examples"]
    for p in info["examples"]:
        generator.check_prompt(p)


def test_only_the_adapter_imports_the_generation_code():
    """Re-pointing the server at another inference engine means rewriting session.py only."""
    import ast
    from pathlib import Path

    import sfvideo.serve

    generation = ("sfvideo.generate", "sfvideo.diffusion", "sfvideo.nn", "sfvideo.training", "sfvideo.toy",
                  "sfvideo.inference", "sfvideo.bench", "sfvideo.checkpoints", "sfvideo.config", "sfvideo.geometry")
    offenders = []
    for path in sorted(Path(sfvideo.serve.__file__).parent.glob("*.py")):
        if path.name == "session.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(generation)]
    assert not offenders, offenders
