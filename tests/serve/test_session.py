"""The serving adapter: equal to ``streaming.stream`` chunk for chunk, flat memory, prompt validation, loading."""

import weakref

import pytest
import torch
from conftest import PROMPT_A, PROMPT_B, load_generator

from sfvideo.serve.session import PromptError, ServeError


def _cache_bytes(cache):
    return sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v] if t is not None)


def test_session_equals_stream_bit_for_bit_across_a_prompt_switch(generator):
    """Same noise, same re-noising generator, same switch point: the same latents as the fixed-schedule iterator.

    Six chunks of 2 over a 6-frame window: the switch at chunk 4 re-caches after evictions began (chunk 3).
    """
    from sfvideo.streaming import stream

    g, f, seed, switch_at, n = generator, generator.frames_per_chunk, 3, 4, 6
    a, b = g.encode_prompt(PROMPT_A), g.encode_prompt(PROMPT_B)
    session = g.new_session(seed)
    session.start(a)
    got = []
    for i in range(n):
        if i == switch_at:
            session.switch(b)
        got.append(session.next_chunk())

    noise_gen = torch.Generator().manual_seed(seed)
    noise = torch.cat([torch.randn(g.geometry.latent_shape(1, f), generator=noise_gen) for _ in range(n)], 1)
    cache = g.model.new_kv_cache(1, g.geometry.tokens_per_frame, g.capacity_frames, sink_frames=g.sink_frames,
                                 window_frames=g.window_frames, dtype=g.dtype, device=g.device)
    ref = list(stream(g.denoiser, noise, [(0, a.context), (switch_at * f, b.context)], step_sigmas=g.step_sigmas,
                      frames_per_chunk=f, kv_cache=cache, noise_generator=torch.Generator().manual_seed(seed + 1),
                      context_sigma=g.context_sigma))
    assert len(ref) == n
    for mine, theirs in zip(got, ref, strict=True):
        # Same kernels on the same shapes and values in the same order: bit-identical by construction.
        assert torch.equal(mine.latents, theirs.latents), mine.index
        assert (mine.segment, mine.recached, mine.start_frame) == (theirs.segment, theirs.recached,
                                                                   theirs.start_frame)
    assert [c.prompt for c in got] == [PROMPT_A] * switch_at + [PROMPT_B] * (n - switch_at)
    assert got[0].frames.shape == (f, g.frame_height, g.frame_width, 3) and got[0].frames.dtype.name == "uint8"


def test_long_stream_runs_on_the_rolling_cache_with_flat_memory(generator):
    g = generator
    session = g.new_session(0)
    session.start(g.encode_prompt(PROMPT_A))
    fill = g.capacity_frames // g.frames_per_chunk
    sizes, held = [], []
    for i in range(6 * fill):
        if i == 3 * fill:
            session.switch(g.encode_prompt(PROMPT_B))
        chunk = session.next_chunk()
        assert chunk.start_frame == i * g.frames_per_chunk
        if i >= fill:
            sizes.append(_cache_bytes(session.kv_cache))
            held.append((len(session.kv_cache.frame_ids), len(session._history.frames)))
    assert len(set(sizes)) == 1 and sizes[0] > 0  # the buffers never grow
    assert set(held) == {(g.capacity_frames, g.capacity_frames)}  # cache and clean history hold the window only
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--codec_args", '{"spatial_stride": 4}'], "48 latent channels, the generator 12"),
        (["--window_frames", "3"], "--window_frames=3 must be a positive multiple of the chunk size 2"),
        (["--sink_frames", "1"], "--sink_frames=1"),
        (["--text_encoder_args", '{"dim": 16}'], "16-dim embeddings but the generator expects text_dim=32"),
        (["--max_prompt_chars", "0"], "--max_prompt_chars"),
    ],
)
def test_loading_errors_are_one_line(generator_folder, extra, message):
    with pytest.raises(ServeError, match=message) as e:
        load_generator(generator_folder, *extra)
    assert "\n" not in str(e.value)


def test_describe_offers_the_toy_vocabulary_and_prompts(generator):
    info = generator.describe()
    assert info["frame_height"] == info["frame_width"] == 16 and info["max_words"] == 16
    assert "circle" in info["vocabulary"] and info["examples"]
    for p in info["examples"]:
        generator.check_prompt(p)


def test_only_the_adapter_imports_the_generation_code():
    """Re-pointing the server at another inference engine means rewriting session.py only."""
    import ast
    from pathlib import Path

    import sfvideo.serve

    generation = ("sfvideo.streaming", "sfvideo.generate", "sfvideo.diffusion", "sfvideo.nn", "sfvideo.training",
                  "sfvideo.toy", "sfvideo.inference", "sfvideo.bench")
    offenders = []
    for path in sorted(Path(sfvideo.serve.__file__).parent.glob("*.py")):
        if path.name == "session.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(generation)]
    assert not offenders, offenders
