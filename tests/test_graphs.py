"""The CUDA-graph path of the per-chunk step (``inference.graphs.StepGraphs``), tested on a CPU with
``EagerGraph`` standing in for a CUDA graph: the same latents as plain forwards (same kernels, same shapes: exact),
one graph per cache layout replayed for every later chunk, and the graphs reused by the next session and after a
prompt switch (the K/V and text K/V buffers keep their addresses). Plus the CPU fallback and a failed capture."""

import pytest
import torch

from sfvideo.config import InferenceSettings
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine
from sfvideo.inference.graphs import EagerGraph, StepGraphs
from sfvideo.nn.wan import WanTransformer
from sfvideo.toy.encoders import ToyTextEncoder

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
A = "a red circle moving left on a dark background"
B = "a blue square moving up on a light background"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer.from_flavor("debug").eval()


def _engine(model, graphs=False):
    return InferenceEngine(model, text_encoder=ToyTextEncoder(), settings=InferenceSettings(geometry=GEO),
                           step_graphs=graphs)


def _stream(engine, frames=12, schedule=None, seed=3):
    with engine.session(num_frames=frames, decode=False) as session:
        session.start(A, seed=seed, schedule=schedule)
        return torch.cat([c.chunk.latents for c in session], dim=1)


def test_graphed_stream_equals_the_plain_stream_and_replays_one_graph_per_layout(model):
    expected = _stream(_engine(model))
    graphs = StepGraphs(model, graph_factory=EagerGraph)
    engine = _engine(model, graphs)
    assert torch.equal(_stream(engine), expected)
    # 6 chunks of 2 frames, window 4 (the training clip): 4 steps + a refresh per chunk but the last = 29 forwards.
    # Layouts: the first call of the prompt (text K/V not cached) is eager; chunk 0 writes slot 0 and sees nothing;
    # from chunk 1 on (capacity 4 = two chunks) every chunk writes slot 2 and sees slots 0-1 (chunk 2 on after
    # evicting the oldest chunk): 2 layouts, each captured after 1 eager call.
    assert sum(graphs.counts.values()) == 29
    assert graphs.counts["captured"] == 2 and graphs.status == "on"
    assert graphs.counts["eager"] == 1 + 2 and graphs.counts["replayed"] == 29 - 3 - 2
    # The next session gets the dead cache's buffers: everything replays (but the first, text-caching call).
    before = graphs.counts.copy()
    assert torch.equal(_stream(engine), expected)
    assert graphs.counts["captured"] == before["captured"]
    assert graphs.counts["eager"] - before["eager"] == 1


def test_prompt_switch_replays_the_same_graphs(model):
    expected = _stream(_engine(model), schedule=[(6, B)])
    graphs = StepGraphs(model, graph_factory=EagerGraph)
    engine = _engine(model, graphs)
    _stream(engine)  # capture the layouts under prompt A
    before = graphs.counts.copy()
    # The switch re-caches under B: new text K/V are copied into the same buffers, so no new capture.
    assert torch.equal(_stream(engine, schedule=[(6, B)]), expected)
    assert graphs.counts["captured"] == before["captured"]


def test_cpu_fallback_and_a_failed_capture_run_eagerly(model):
    expected = _stream(_engine(model))
    graphs = StepGraphs(model)  # no factory: CUDA graphs for CUDA inputs only
    assert torch.equal(_stream(_engine(model, graphs)), expected)
    assert graphs.counts["captured"] == graphs.counts["replayed"] == 0

    class Broken(EagerGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(model, graph_factory=Broken)
    assert torch.equal(_stream(_engine(model, graphs)), expected)
    assert graphs.status.startswith("failed: RuntimeError: operation not permitted") and not graphs.enabled
    assert graphs.counts["replayed"] == 0


def test_engine_option_builds_the_wrapper(model):
    engine = _engine(model, True)
    assert isinstance(engine.graphs, StepGraphs) and engine.denoiser.model is engine.graphs
    assert _engine(model).graphs is None


def test_a_layout_decided_ahead_is_used_once_and_only_for_its_chunk(model):
    cache = model.new_kv_cache(1, 4, 8)
    step = cache.begin_chunk(0, 2)
    cache.next_step = step
    assert cache.begin_chunk(0, 2) is step and cache.next_step is None  # used once
    cache.next_step = cache.begin_chunk(2, 2)
    with pytest.raises(ValueError, match="decided ahead is for chunk \\(2, 2\\)"):
        cache.begin_chunk(4, 2)
