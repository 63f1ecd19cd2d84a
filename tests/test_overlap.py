"""Decode overlapped with generation (``GenerationSession(overlap_decode=True)``): the same frames from the same
decoder calls, in order; the decode of a chunk really runs while the next is denoised; a stream's decoding ends
(queued decodes dropped, the worker idle and back with the engine) on close, on an error in the worker, on Ctrl-C
and when the session is dropped; the threads end with the engine (tiny debug transformer, tiny Wan VAE, CPU)."""

import _thread
import gc
import signal
import threading
import time

import pytest
import torch

from sfvideo.config import InferenceSettings
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine
from sfvideo.nn.wan import WanTransformer
from sfvideo.toy.encoders import ToyTextEncoder

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
A = "a red circle moving left on a dark background"
B = "a blue square moving up on a light background"


def _tiny_wan_codec():
    from diffusers import AutoencoderKLWan

    from sfvideo.nn.wan_vae import WanVAECodec

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return WanVAECodec(vae.eval())


class SpyDecoder:
    """Wraps a codec; records every ``decode_chunk`` input, the thread it ran on, and runs hooks per call."""

    def __init__(self, codec, hook=None):
        self.codec, self.hook = codec, hook
        self.latent_channels, self.spatial_stride = codec.latent_channels, codec.spatial_stride
        self.calls: list[torch.Tensor] = []
        self.threads: list[int] = []

    def num_pixel_frames(self, n):
        return self.codec.num_pixel_frames(n)

    def decode(self, latents):
        return self.codec.decode(latents)

    def stream_decoder(self):
        inner = self.codec.stream_decoder()
        spy = self

        class _Stream:
            def decode_chunk(self, latents):
                spy.calls.append(latents.clone())
                spy.threads.append(threading.get_ident())
                if spy.hook is not None:
                    spy.hook(len(spy.calls) - 1)
                return inner.decode_chunk(latents)

        return _Stream()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer.from_flavor("debug").eval()


def _engine(model, decoder):
    return InferenceEngine(model, text_encoder=ToyTextEncoder(), settings=InferenceSettings(geometry=GEO),
                           decoder=decoder)


def test_overlap_gives_the_same_frames_from_the_same_decoder_calls(model):
    codec = _tiny_wan_codec()
    runs = {}
    for overlap in (False, True):
        spy = SpyDecoder(codec)
        with _engine(model, spy).session(num_frames=10, overlap_decode=overlap) as session:
            session.start(A, seed=5, schedule=[(6, B)])
            items = list(session)
            assert session.overlap_decode is overlap
        runs[overlap] = (items, spy)
    (serial, spy_s), (overlapped, spy_o) = runs[False], runs[True]
    assert [i.chunk.index for i in overlapped] == [0, 1, 2, 3, 4]  # order kept
    assert [i.chunk.recached for i in overlapped] == [False, False, False, True, False]
    # Same transformer calls: the same latents exactly; the decoder got the same inputs in the same order.
    assert len(spy_s.calls) == len(spy_o.calls) == 5
    for a, b in zip(spy_s.calls, spy_o.calls):
        assert torch.equal(a, b)
    # The same decoder calls on the same inputs (same kernels, same shapes, same thread count): the same frames.
    for a, b in zip(serial, overlapped):
        assert torch.equal(a.frames, b.frames)
        assert a.frames.shape[1] == (1 + 4 * 1 if a.chunk.index == 0 else 8)
    main = threading.get_ident()
    assert set(spy_s.threads) == {main} and main not in spy_o.threads


def test_chunk_decodes_while_the_next_is_denoised(model):
    # The decode of chunk 1 blocks until the transformer has begun chunk 2: it can only finish if the two overlap.
    codec = _tiny_wan_codec()
    begun_chunk_2 = threading.Event()

    def hook(call):
        if call == 1:
            assert begun_chunk_2.wait(timeout=30), "chunk 2 was not denoised while chunk 1 decoded"

    def forward_pre_hook(module, args, kwargs):
        if kwargs.get("start_frame") == 4:
            begun_chunk_2.set()

    handle = model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True)
    try:
        with _engine(model, SpyDecoder(codec, hook)).session(num_frames=8, overlap_decode=True) as session:
            session.start(A, seed=0)
            items = list(session)
    finally:
        handle.remove()
    assert [i.chunk.index for i in items] == [0, 1, 2, 3]
    t = session.stats.timings
    # Call 1 returned chunk 1 and did chunk 2's denoising (the overlapped work is attributed to the call).
    assert [x.index for x in t] == [0, 1, 2, 3] and t[1].denoise_s > 0 and t[3].denoise_s == 0
    assert all(x.decode_wait_s <= x.wall_s for x in t)


def _idle(engine):
    """The engine's decode workers are all idle (nothing queued, nothing in flight) and back in its pool."""
    return all(not w.busy for w in engine.decode_workers.idle)


def test_worker_error_ends_the_stream_and_the_worker_serves_the_next_one(model):
    def hook(call):
        if call == 2:
            raise ValueError("decoder broke")

    spy = SpyDecoder(_tiny_wan_codec(), hook)
    engine = _engine(model, spy)
    session = engine.session(num_frames=8, overlap_decode=True)
    session.start(A, seed=0)
    session.next_chunk()
    with pytest.raises(ValueError, match="decoder broke"):
        while session.next_chunk() is not None:
            pass
    assert _idle(engine) and len(engine.decode_workers.idle) == 1
    with pytest.raises(RuntimeError, match="before start"):
        session.next_chunk()
    spy.hook = None
    with engine.session(num_frames=8, overlap_decode=True) as again:  # the same thread decodes the next stream
        again.start(A, seed=0)
        assert len(list(again)) == 4
    assert len(set(spy.threads)) == 1


@pytest.fixture
def default_sigint():
    """interrupt_main() runs the installed SIGINT handler; an earlier test (a command's Ctrl-C handling) may have
    left its own, so install Python's default, which raises KeyboardInterrupt, and restore the previous after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_waiting_for_a_decode_ends_the_stream(model, default_sigint):
    def hook(call):
        if call == 1:
            # This decode is submitted during the first next_chunk; hold it so that the main thread is inside
            # the second one, waiting for it, when the interrupt arrives (on a loaded machine the first call can
            # otherwise still be running, and the interrupt lands outside the pytest.raises block).
            time.sleep(0.5)
            _thread.interrupt_main()  # KeyboardInterrupt in the main thread, waiting for this decode

    spy = SpyDecoder(_tiny_wan_codec(), hook)
    engine = _engine(model, spy)
    session = engine.session(num_frames=8, overlap_decode=True)
    session.start(A, seed=0)
    session.next_chunk()
    with pytest.raises(KeyboardInterrupt):
        session.next_chunk()
    # Handed back after the decode in flight finished: nothing of this stream runs on.
    calls = len(spy.calls)
    assert _idle(engine) and calls == 2
    with pytest.raises(RuntimeError, match="before start"):
        session.next_chunk()


def test_close_mid_stream_drops_queued_decodes_and_threads_end_with_the_engine(model):
    spy = SpyDecoder(_tiny_wan_codec())
    engine = _engine(model, spy)
    session = engine.session(num_frames=8, overlap_decode=True)
    session.start(A, seed=0)
    session.next_chunk()
    session.next_chunk()  # chunk 2 was submitted to the worker before this call returned
    session.close()
    assert _idle(engine) and len(spy.calls) <= 3
    session.start(A, seed=0)  # a session can start again after close
    session.next_chunk()
    session.next_chunk()
    del session  # dropped without close: the worker is handed back
    gc.collect()
    assert _idle(engine) and len(engine.decode_workers.idle) == 1
    threads = [w.thread for w in engine.decode_workers.idle]
    del engine
    gc.collect()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_overlap_default_follows_the_cores():
    from sfvideo.inference.overlap import available_cores, overlap_pays

    cpu = torch.device("cpu")
    assert overlap_pays(cpu) == (available_cores() >= 2 * torch.get_num_threads())
    assert overlap_pays(torch.device("meta")) is False
