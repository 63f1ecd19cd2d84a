"""The inference engine's session API: a switch asked for mid-stream equals the same switch scheduled, endless
streams, and the one-shot ``generate`` equals the stream (tiny debug transformer, toy text encoder, CPU)."""

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
