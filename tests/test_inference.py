"""The inference engine's session API: a switch asked for mid-stream equals the same switch scheduled (also from
another thread while a chunk is generated), endless streams in flat memory, prompts as embeddings, and the one-shot
``generate`` equals the stream (tiny debug transformer, toy text encoder, CPU)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sfvideo.config import InferenceSettings
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine, cache_capacity
from sfvideo.nn.wan import WanTransformer
from sfvideo.toy.encoders import ToyTextEncoder

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
A = "a red circle moving left on a dark background"
B = "a blue square moving up on a light background"


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    torch.manual_seed(0)
    model = WanTransformer.from_flavor("debug").eval()
    return InferenceEngine(model, text_encoder=ToyTextEncoder(), settings=InferenceSettings(geometry=GEO))


def _latents(session) -> torch.Tensor:
    return torch.cat([item.chunk.latents for item in session], dim=1)


def test_switch_prompt_mid_stream_equals_the_scheduled_switch(engine):
    scheduled = engine.session(num_frames=8, decode=False)
    scheduled.start(A, seed=3, schedule=[(4, B)])
    expected = _latents(scheduled)
    live = engine.session(num_frames=8, decode=False)
    live.start(A, seed=3)
    chunks = [live.next_chunk(), live.next_chunk()]
    live.switch_prompt(B)  # takes effect at the next chunk (frame 4)
    chunks += list(live)
    assert live.next_chunk() is None and live.done
    assert [c.chunk.recached for c in chunks] == [False, False, True, False]
    # Same calls on the same shapes in the same order: the same latents exactly.
    assert torch.equal(torch.cat([c.chunk.latents for c in chunks], 1), expected)


def test_generate_is_the_stream(engine):
    session = engine.session(decode=False)
    session.start([A, B], seed=1)
    assert torch.equal(engine.generate([A, B], seed=1), _latents(session))


def test_endless_stream_rolls_until_closed(engine):
    session = engine.session(endless=True, decode=False)
    assert session.window_frames == GEO.num_frames and session.num_chunks is None
    session.start(A, seed=0)
    frames = [session.next_chunk().chunk.start_frame for _ in range(5)]  # past the training clip
    assert frames == [0, 2, 4, 6, 8] and not session.done
    session.close()
    with pytest.raises(RuntimeError, match="before start"):
        session.next_chunk()


def test_cache_capacity_is_the_window_plus_sink_frames():
    assert cache_capacity(84, None) == 84
    assert cache_capacity(84, 12, 3) == 15
    assert cache_capacity(6, 12, 3) == 6


def test_a_switch_from_another_thread_while_a_chunk_is_generated_applies_to_the_next_chunk(engine):
    """A viewer types while chunk 2 is mid-forward: the switch returns at once, chunk 2 keeps the old prompt and
    chunk 3 switches, exactly as the same switch scheduled at chunk 3 of an endless stream of the same seed."""
    f = GEO.frames_per_chunk
    scheduled = engine.session(endless=True, decode=False)
    scheduled.start(A, seed=5, schedule=[(3 * f, B)])
    expected = [scheduled.next_chunk().chunk for _ in range(5)]

    live = engine.session(endless=True, decode=False)
    live.start(A, seed=5)
    chunks = [live.next_chunk().chunk for _ in range(2)]
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):  # the first forward of chunk 2 (the deferred refresh of chunk 1) waits for release
        if not entered.is_set():
            entered.set()
            assert release.wait(20), "the switch did not return while the chunk was held"

    handle = engine.model.register_forward_pre_hook(hold)
    try:
        with ThreadPoolExecutor(1) as worker:
            in_flight = worker.submit(live.next_chunk)
            assert entered.wait(20)
            segment = live.switch_prompt(B)
            release.set()
            chunks.append(in_flight.result(20).chunk)
    finally:
        release.set()
        handle.remove()
    chunks += [live.next_chunk().chunk for _ in range(2)]
    assert segment == 1
    assert [(c.segment, c.recached) for c in chunks] == [(0, False)] * 3 + [(1, True), (1, False)]
    for mine, theirs in zip(chunks, expected, strict=True):
        # Same calls on the same shapes in the same order: the same latents exactly.
        assert torch.equal(mine.latents, theirs.latents), mine.index


def test_prompts_as_embeddings_and_segment_numbers(engine):
    text = engine.session(num_frames=8, decode=False)
    text.start(A, seed=2, schedule=[(4, B)])
    embedded = engine.session(num_frames=8, decode=False)
    embedded.start(engine.encode(A), seed=2, schedule=[(4, engine.encode(B))])
    assert torch.equal(_latents(text), _latents(embedded))

    live = engine.session(num_frames=8, decode=False)
    live.start(A, seed=2, schedule=[(4, B)])
    first = live.next_chunk().chunk
    assert live.switch_prompt(engine.encode(B)) == 2  # replaces the scheduled switch at frame 4 ...
    assert live.switch_prompt(A) == 3  # ... and a second one before the next chunk replaces the first
    rest = [c.chunk for c in live]
    assert [first.segment, *(c.segment for c in rest)] == [0, 3, 3, 3]
    assert [c.recached for c in rest] == [True, False, False]
    with pytest.raises(ValueError, match="all generated"):
        live.switch_prompt(B)
    with pytest.raises(ValueError, match="2 prompt"):
        live.switch_prompt([A, B])
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        live.switch_prompt(torch.zeros(3))


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v] if t is not None)


def test_an_endless_stream_runs_in_flat_memory_across_switches(engine):
    """Cache buffers, held frames, the re-cache's clean history, the prompts kept and the per-chunk times stop
    growing once the window is full, over many windows and switches."""
    f = GEO.frames_per_chunk
    session = engine.session(endless=True, decode=False, window_frames=4, sink_frames=2)
    session.start(A, seed=0)
    capacity = cache_capacity(10**9, 4, 2)
    fill = capacity // f
    sizes = []
    for i in range(8 * fill):
        if i % 5 == 4:
            session.switch_prompt(B if i % 10 == 4 else A)
        chunk = session.next_chunk().chunk
        assert chunk.start_frame == i * f and chunk.recached == (i % 5 == 4)
        if i >= fill:
            cache = session.kv_cache
            sizes.append((_cache_bytes(cache), len(cache.frame_ids), len(session._stream.history.frames),
                          len(session._segments), len(session.stats.per_chunk_s)))
    assert set(sizes) == {(sizes[0][0], capacity, capacity, 1, fill)} and sizes[0][0] > 0
    assert session.kv_cache.frame_ids[:2] == [0, 1] and session.kv_cache.frame_ids[-1] == 8 * fill * f - 1
    session.close()
    assert session.kv_cache is None
