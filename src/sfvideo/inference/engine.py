"""The inference engine: one way to sample every sfvideo network (see ``sfvideo.inference`` for the API)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sfvideo.config import InferenceSettings, check_encoders
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import euler_sample, sample_sigmas
from sfvideo.geometry import VideoGeometry
from sfvideo.inference.causal_cfg import CausalCFGChunks, check_many_step_settings
from sfvideo.inference.graphs import StepGraphs
from sfvideo.inference.overlap import DecodeWorker, DecodeWorkerPool, overlap_pays
from sfvideo.inference.stream import (
    ChunkSampler,
    ChunkStream,
    ChunkTiming,
    DecodedChunk,
    FewStepChunks,
    StreamChunk,
    StreamStats,
    check_context_schedule,
    decode_chunk,
)
from sfvideo.nn.precision import cast_model, compute_dtype, model_device

Prompts = str | Sequence[str]
"""One prompt, or one per sample of the batch."""

PromptsOrEmbeddings = Prompts | Tensor
"""Prompts, or their embeddings ``(B, L, D)`` from :meth:`InferenceEngine.encode` (e.g. encoded on another
thread, so a switch costs the caller nothing)."""


def cache_capacity(num_frames: int, window_frames: int | None, sink_frames: int = 0) -> int:
    """Frames a stream's KV cache holds: the whole video, or its rolling window plus the sink frames.

    The window includes the chunk being denoised (``nn.kv_cache``), so ``window + sink`` frames suffice.
    """
    return num_frames if window_frames is None else min(num_frames, window_frames + sink_frames)


def stream_cache(
    model: nn.Module,
    geometry: VideoGeometry,
    batch_size: int,
    num_frames: int,
    *,
    window_frames: int | None = None,
    sink_frames: int = 0,
    grad_mode: str = "truncate",
    rolling: bool = True,
) -> Any:
    """A fresh KV cache of ``model`` for a stream of ``num_frames`` latent frames, in the model's dtype and device.

    ``rolling`` sizes it by :func:`cache_capacity`; False keeps every frame (the training rollout, whose gradient
    may reach every cached chunk).
    """
    capacity = cache_capacity(num_frames, window_frames, sink_frames) if rolling else num_frames
    return model.new_kv_cache(batch_size, geometry.tokens_per_frame, capacity, sink_frames=sink_frames,
                              window_frames=window_frames, grad_mode=grad_mode, dtype=compute_dtype(model),
                              device=model_device(model))


def _batch(prompts: Prompts) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _embeddings(engine: InferenceEngine, prompts: PromptsOrEmbeddings) -> Tensor:
    """``prompts`` encoded, or given embeddings ``(B, L, D)`` on the model's device and dtype."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 3:
            raise ValueError(f"prompt embeddings must be (B, L, D), got shape {tuple(prompts.shape)}")
        return prompts.to(device=engine.device, dtype=engine.dtype)
    return engine.encode(prompts)


class InferenceEngine:
    """Samples one network with its text encoder and decoder, as its checkpoint describes (``settings``).

    The engine owns what every caller used to set up: the Gaussian noise (from a seed), the KV cache (sized by
    :func:`cache_capacity`), dtype and device (the model's: cast and move the model first), prompt encoding and
    the negative prompt (classifier-free guidance), the prompt schedule and prompt switches, and decoding chunk by
    chunk through the decoder's stream decoder.

    Args:
        model: The network (``WanTransformer``-like: ``forward`` on Wan timesteps, ``new_kv_cache`` for causal
            samplers), in its inference dtype and on its device.
        text_encoder: A ``TextEncoder``.
        settings: How to sample it (``InferenceSettings``: geometry, sampler, steps, context noise, window).
        decoder: A ``VideoDecoder`` (the run's codec, or a decoder-only model such as a tiny preview decoder); None
            generates latents only.
        keys: Names of the pieces for error messages (e.g. command-line flags); see ``config.check_encoders``.
        step_graphs: Replay the generator's cached forwards as CUDA graphs (``inference.graphs.StepGraphs``; CUDA
            only, other devices run eagerly), or a ``StepGraphs`` to use.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        text_encoder: Any,
        settings: InferenceSettings,
        decoder: Any = None,
        keys: Mapping[str, str] | None = None,
        step_graphs: bool | StepGraphs = False,
    ) -> None:
        check_many_step_settings(settings)
        config = getattr(model, "config", None)
        check_encoders(geometry=settings.geometry, network=dict(config) if config is not None else None,
                       text_encoder=text_encoder, codec=decoder, keys=keys)
        self.model = model
        self.text_encoder = text_encoder
        self.settings = settings
        self.decoder = decoder
        self.device = model_device(model)
        self.dtype = compute_dtype(model)
        self.graphs = step_graphs if isinstance(step_graphs, StepGraphs) else StepGraphs(model) if step_graphs else None
        """The CUDA-graph wrapper of the generator's forwards (None: plain forwards)."""
        forward = self.graphs if self.graphs is not None else model
        self.denoiser = Denoiser(forward, num_train_timesteps=settings.schedule.num_train_timesteps)
        self._negative: Tensor | None = None
        self._decode_workers: DecodeWorkerPool | None = None

    @property
    def decode_workers(self) -> DecodeWorkerPool:
        """The decode threads sessions borrow for an overlapped decode (kept, so a thread's kernel set-up is paid
        once; ``inference.overlap``); they stop when the engine is collected."""
        if self._decode_workers is None:
            self._decode_workers = DecodeWorkerPool(self.device)
            weakref.finalize(self, self._decode_workers.close)
        return self._decode_workers

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        network: str | None = None,
        use_ema: bool = False,
        settings: InferenceSettings | None = None,
        text_encoder: Any = None,
        decoder: Any = None,
        keys: Mapping[str, str] | None = None,
    ) -> InferenceEngine:
        """Everything from what a checkpoint records (``sfvideo.checkpoints.read_checkpoint``); any piece given
        replaces the recorded one.

        Args:
            checkpoint: A ``checkpoints.Checkpoint``.
            device / dtype: Where and in which precision the network runs (default fp32; fp32 islands kept).
            network: Which network (default: the one the checkpoint samples).
            use_ema: Its EMA weights.
            settings / text_encoder / decoder: Replace the recorded ones (needed for bare weights).
            keys: Names of the pieces for error messages.
        """
        names = {"settings": "settings", "text_encoder": "text_encoder", **(keys or {})}
        settings = settings if settings is not None else checkpoint.settings
        if settings is None:
            raise ValueError(f"{checkpoint.path} records no inference settings: give {names['settings']}")
        text_encoder = text_encoder if text_encoder is not None else checkpoint.build_text_encoder()
        if text_encoder is None:
            raise ValueError(f"{checkpoint.path} records no text encoder: give {names['text_encoder']} CLASS_PATH")
        decoder = decoder if decoder is not None else checkpoint.build_codec()
        model = checkpoint.load_network(network, ema=use_ema)
        if dtype is not None:
            cast_model(model, dtype)
        return cls(model.to(device).eval(), text_encoder=text_encoder, settings=settings, decoder=decoder, keys=keys)

    @property
    def geometry(self) -> VideoGeometry:
        return self.settings.geometry

    # ------------------------------------------------------------------ prompts and noise
    def encode(self, prompts: Prompts) -> Tensor:
        """Prompt embeddings ``(B, L, D)`` in the model's dtype, on its device."""
        return self.text_encoder.encode(_batch(prompts)).to(device=self.device, dtype=self.dtype)

    def negative(self, batch_size: int) -> Tensor:
        """Embeddings of the negative prompt ``(B, L, D)`` (encoded once)."""
        if self._negative is None:
            self._negative = self.encode([self.settings.negative_prompt])
        return self._negative.expand(batch_size, -1, -1)

    def noise(self, batch_size: int, num_frames: int, seed: int) -> tuple[Tensor, torch.Generator]:
        """Initial noise ``(B, F, C, H, W)`` of a video and the generator it came from (which re-noises next)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape = self.geometry.latent_shape(batch_size, num_frames)
        return torch.randn(shape, generator=g, device=self.device, dtype=self.dtype), g

    # ------------------------------------------------------------------ sampling
    def session(self, **kwargs: Any) -> GenerationSession:
        """A :class:`GenerationSession` of this engine (keyword arguments: see there)."""
        return GenerationSession(self, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: Prompts, *, num_frames: int | None = None, seed: int = 0) -> Tensor:
        """Latents ``(B, F, C, H, W)`` of one video per prompt (default length: the training clip)."""
        session = self.session(num_frames=num_frames, decode=False)
        session.start(prompts, seed=seed)
        return torch.cat([c.chunk.latents for c in session], dim=1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """A whole video ``(B, T, 3, H, W)`` in [-1, 1] from latents (the decoder's full decode)."""
        if self.decoder is None:
            raise ValueError("this engine has no decoder (codec): it generates latents only")
        return self.decoder.decode(latents)

    @torch.no_grad()
    def sample_clip(self, prompts: PromptsOrEmbeddings, noise: Tensor) -> Tensor:
        """A bidirectional model's whole clip: many-step Euler from ``noise`` with classifier-free guidance."""
        s = self.settings.sampling
        cond = _embeddings(self, prompts)
        out = euler_sample(self.denoiser, noise, cond, sigmas=sample_sigmas(s.schedule, s.num_steps),
                           uncond=self.negative(cond.shape[0]), guidance_scale=s.guidance_scale,
                           guidance=s.guidance)
        return out.x0


_NO_SWITCH = "a bidirectional model samples the whole clip at once: it cannot switch prompts mid-video"


class _ClipChunks:
    """The chunk sampler of a bidirectional model: the clip is sampled whole at the first chunk, then sliced."""

    def __init__(self, engine: InferenceEngine, noise: Tensor, frames_per_chunk: int) -> None:
        self.engine, self.noise, self.f = engine, noise, frames_per_chunk
        self.clip: Tensor | None = None

    def denoise(self, noise: Tensor, context: Tensor, start_frame: int) -> Tensor:
        if self.clip is None:  # one prompt for the whole clip (no switches): the first chunk's embeddings
            self.clip = self.engine.sample_clip(context, self.noise)
        return self.clip[:, start_frame : start_frame + self.f]

    def refresh(self, latents: Tensor, context: Tensor, start_frame: int) -> None:
        pass  # no cache

    def switch(self, history: Mapping[int, Tensor], context: Tensor, *, full: bool) -> None:
        raise ValueError(_NO_SWITCH)

    def held_frames(self) -> list[int]:
        return []


class GenerationSession:
    """One video stream: :meth:`start` it, take chunks (:meth:`next_chunk`, or iterate), switch prompts, close.

    A session serves one consumer (a ``generate`` call, a benchmark run, a browser connection): it holds the KV
    cache, the noise generator, the prompt embeddings in force and the decoder's causal state. Chunks are denoised
    on demand; each is decoded through the decoder's stream decoder before it is returned.

    Prompts come as segments numbered from 0 (the ``start`` prompt), one more per scheduled or live switch; a
    chunk's ``StreamChunk.segment`` is the number it was generated under. Only the segment in force and later
    ones are kept, and the cache, the clean history of the re-cache and ``stats.per_chunk_s`` are bounded by the
    rolling window, so an endless stream runs in flat memory.

    Threads: :meth:`switch_prompt` may be called from any thread, also while :meth:`next_chunk` runs (a viewer
    typing while a chunk is generated); the other methods belong to one thread at a time.

    Overlapped decode (``overlap_decode``): chunk ``i`` is decoded on a worker thread (on CUDA, its own stream,
    ``inference.overlap``) while chunk ``i + 1`` is denoised, and is returned when both are done; the next chunk's
    decode starts before the call returns, so it also overlaps the caller's own work. The frames are those of the
    same decoder calls on the same inputs, in order; at most one decode is in flight and one chunk waits denoised
    (flat memory). The stream's first chunk is not overlapped (its latency stays denoise + decode). A chunk is
    *begun* when its denoising starts, so with overlap :meth:`switch_prompt` between two calls lands one chunk
    later than without (the next chunk is already denoised); scheduled switches (``start(schedule=...)``) are
    exact either way. Use the session as a context manager, or :meth:`close` it, to hand the
    worker back to the engine (``engine.decode_workers``).

    Args:
        engine: The engine (network, encoders, settings).
        num_frames: Latent frames of the video (a multiple of the chunk size; default: the training clip).
        frames_per_chunk: Chunk size (default: the training chunking; 1 = frame-wise).
        window_frames: Rolling KV-cache window in latent frames (default: the training window, or the training
            clip length when generating longer or endlessly).
        sink_frames: First frames kept in the cache forever (a multiple of the chunk size).
        recache_on_switch: On a prompt switch re-cache the held frames under the new prompt (else reset only the
            cross-attention cache).
        decode: Decode each chunk (needs the engine's decoder); False returns latents only.
        endless: No length: chunks come until :meth:`close` (each chunk's noise is drawn when it is denoised,
            so an endless stream is not the same video as a fixed-length one of the same seed).
        overlap_decode: Decode on a worker while the next chunk is denoised (above). None: where it pays
            (``inference.overlap.overlap_pays``: CUDA, or a CPU with cores for two sets of torch threads).
    """

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        num_frames: int | None = None,
        frames_per_chunk: int | None = None,
        window_frames: int | None = None,
        sink_frames: int = 0,
        recache_on_switch: bool = True,
        decode: bool = True,
        endless: bool = False,
        overlap_decode: bool | None = None,
    ) -> None:
        geo = engine.geometry
        f = geo.frames_per_chunk if frames_per_chunk is None else frames_per_chunk
        if f <= 0:
            raise ValueError(f"frames_per_chunk must be positive, got {f}")
        frames = None if endless else geo.num_frames if num_frames is None else num_frames
        if frames is not None and (frames <= 0 or frames % f):
            raise ValueError(
                f"num_frames={frames} is not a positive multiple of the chunk size {f} latent frames "
                f"(nearest: {max(f, frames // f * f)})"
            )
        if endless and engine.settings.sampler == "euler":
            raise ValueError("a bidirectional model samples a clip of fixed length: it cannot stream endlessly")
        window = engine.settings.window_frames if window_frames is None else window_frames
        if window is None and (frames is None or frames > geo.num_frames):
            window = geo.num_frames  # beyond the training clip: roll over the training length
        if window is not None and (window < f or window % f):
            raise ValueError(f"window_frames={window} must be a positive multiple of the chunk size {f}")
        if sink_frames < 0 or sink_frames % f:
            raise ValueError(f"sink_frames={sink_frames} must be a non-negative multiple of the chunk size {f}")
        if decode and engine.decoder is None:
            raise ValueError("decode=True needs a decoder (codec); pass decode=False for latents only")
        self.engine = engine
        self.num_frames, self.frames_per_chunk = frames, f
        self.window_frames, self.sink_frames = window, sink_frames
        self.recache_on_switch, self.decode = recache_on_switch, decode
        self.synchronize = engine.device.type == "cuda"
        self.stats = self._new_stats()
        self.text_encode_s = 0.0
        self._stream: ChunkStream | None = None
        self._decoder: Any = None
        # (start frame, segment number, embeddings) of the prompt in force and any later ones, in frame order.
        self._segments: list[tuple[int, int, Tensor]] = []
        self._next_frame = 0  # first frame of the next chunk not yet begun: where a live switch takes effect
        self._lock = threading.Lock()  # guards _segments and _next_frame (switch_prompt comes from any thread)
        self.overlap_decode = decode and (overlap_pays(engine.device) if overlap_decode is None else overlap_decode)
        """Whether chunks decode on a worker while the next one is denoised (resolved from the argument)."""
        self._worker: DecodeWorker | None = None
        self._inflight: Any = None  # the worker's job of the chunk the next call returns
        self._ahead: StreamChunk | None = None  # a chunk denoised during the previous call, not yet submitted
        self._returned = 0  # chunks handed to the caller
        self._work = [0.0, 0.0, 0.0]  # denoise / refresh / recache seconds of the current call

    @property
    def num_chunks(self) -> int | None:
        return None if self.num_frames is None else self.num_frames // self.frames_per_chunk

    @property
    def num_pixel_frames(self) -> int | None:
        """Pixel frames of the whole video once decoded (None without decoding or length)."""
        if not self.decode or self.num_frames is None:
            return None
        return self.engine.decoder.num_pixel_frames(self.num_frames)

    @property
    def kv_cache(self) -> Any:
        """The stream's KV cache (None for a bidirectional model, before :meth:`start` and after :meth:`close`)."""
        return getattr(self._stream.sampler, "kv_cache", None) if self._stream is not None else None

    def _new_stats(self) -> StreamStats:
        # An endless stream keeps the per-chunk times of the chunks one cache window holds.
        keep = None if self.num_frames is not None else (self.window_frames + self.sink_frames) // self.frames_per_chunk
        return StreamStats(keep_chunks=keep)

    def _encode(self, frame: int, prompts: PromptsOrEmbeddings, batch: int | None = None) -> Tensor:
        try:
            context = _embeddings(self.engine, prompts)
        except ValueError as e:  # e.g. a word outside the toy vocabulary
            raise ValueError(f"prompt at latent frame {frame}: {e}") from None
        if batch is not None and context.shape[0] != batch:
            raise ValueError(f"prompt at latent frame {frame}: {context.shape[0]} prompt(s) for a batch of {batch}")
        return context

    def start(
        self,
        prompts: PromptsOrEmbeddings,
        *,
        seed: int = 0,
        schedule: Sequence[tuple[int, PromptsOrEmbeddings]] | None = None,
    ) -> None:
        """Begin the video under ``prompts`` (a batch of one video per prompt), with optional scheduled switches.

        Args:
            prompts: The prompt(s) from frame 0, or their embeddings ``(B, L, D)``.
            seed: Seed of the initial noise and of the re-noising between steps.
            schedule: Later switches ``[(start_frame, prompts), ...]`` on chunk boundaries (segments 1, 2, ...).
        """
        engine = self.engine
        entries = [(0, prompts), *[(int(frame), p) for frame, p in (schedule or [])]]
        check_context_schedule(entries, self.frames_per_chunk, self.num_frames)
        if len(entries) > 1 and engine.settings.sampler == "euler":
            raise ValueError(_NO_SWITCH)
        t0 = time.perf_counter()
        first = self._encode(0, prompts)
        batch = first.shape[0]
        segments = [(0, 0, first)] + [(frame, i, self._encode(frame, p, batch))
                                      for i, (frame, p) in enumerate(entries[1:], start=1)]
        self.text_encode_s = time.perf_counter() - t0
        if self.num_frames is None:
            self._generator = torch.Generator(device=engine.device).manual_seed(seed)
            self._noise = None
        else:
            self._noise, self._generator = engine.noise(batch, self.num_frames, seed)
        sampler: ChunkSampler
        length = self.num_frames if self.num_frames is not None else self.window_frames + self.sink_frames
        if engine.settings.sampler == "euler":
            sampler = _ClipChunks(engine, self._noise, self.frames_per_chunk)
        elif engine.settings.sampler == "causal_cfg":
            sampler = CausalCFGChunks.for_engine(
                engine, batch, frames_per_chunk=self.frames_per_chunk,
                new_cache=lambda: stream_cache(engine.model, engine.geometry, batch, length,
                                               window_frames=self.window_frames, sink_frames=self.sink_frames),
            )  # fmt: skip
        else:
            cache = stream_cache(engine.model, engine.geometry, batch, length, window_frames=self.window_frames,
                                 sink_frames=self.sink_frames)
            steps = engine.settings.schedule
            sampler = FewStepChunks(engine.denoiser, cache, step_sigmas=steps.generator_sigmas().to(engine.device),
                                    frames_per_chunk=self.frames_per_chunk,
                                    context_sigma=engine.settings.context_noise / steps.num_train_timesteps,
                                    noise_generator=self._generator)
        self._stream = ChunkStream(sampler, frames_per_chunk=self.frames_per_chunk,
                                   recache_on_switch=self.recache_on_switch, synchronize=self.synchronize,
                                   device=engine.device)
        self._stop_worker()
        self._decoder = engine.decoder.stream_decoder() if self.decode else None
        self._inflight, self._ahead, self._returned = None, None, 0
        if self._decoder is not None and self.overlap_decode:
            pool = engine.decode_workers
            self._worker = pool.take()
            # Also when the session is dropped without close(): no decode of this stream runs on.
            self._finalizer = weakref.finalize(self, pool.give_back, self._worker)
        with self._lock:
            self._segments, self._next_frame = segments, 0
        self.stats = self._new_stats()

    def switch_prompt(self, prompts: PromptsOrEmbeddings) -> int:
        """Generate under ``prompts`` from the next chunk not yet begun on (replacing any later switch).

        Thread-safe: called while :meth:`next_chunk` runs on another thread, the chunk in flight keeps its prompt
        and the one after it switches (LongLive re-cache). Text is encoded on the calling thread; pass
        embeddings from :meth:`InferenceEngine.encode` to encode elsewhere (the switch then costs nothing).

        Returns:
            The number of the new prompt segment (``StreamChunk.segment`` of the chunks generated under it).
        """
        if self.engine.settings.sampler == "euler":
            raise ValueError(_NO_SWITCH)
        with self._lock:
            self._check_started("switch_prompt")
            frame, batch = self._next_frame, self._segments[0][2].shape[0]
        context = self._encode(frame, prompts, batch)  # outside the lock: a text encoder takes a while
        with self._lock:
            self._check_started("switch_prompt")
            frame = self._next_frame  # a chunk may have begun meanwhile
            if self.num_frames is not None and frame >= self.num_frames:
                raise ValueError(f"the video's {self.num_frames} latent frames are all generated: no chunk to switch")
            number = self._segments[-1][1] + 1
            self._segments = [s for s in self._segments if s[0] < frame] + [(frame, number, context)]
        return number

    def _check_started(self, method: str) -> None:
        if not self._segments:
            raise RuntimeError(f"GenerationSession.{method} before start() (or after close())")

    @property
    def done(self) -> bool:
        """All chunks of a fixed-length video are out (never for an endless one)."""
        return self._stream is not None and self.num_chunks is not None and self._returned >= self.num_chunks

    def _all_begun(self) -> bool:
        return self.num_chunks is not None and self._stream.index >= self.num_chunks

    def _begin_chunk(self) -> StreamChunk:
        """Denoise the next chunk not yet begun (under the prompt in force at its first frame)."""
        f = self.frames_per_chunk
        with self._lock:  # claim the chunk: from now on a live switch applies to the one after it
            start = self._stream.index * f
            while len(self._segments) > 1 and self._segments[1][0] <= start:
                del self._segments[0]  # a prompt no chunk will use again
            _, segment, context = self._segments[0]
            self._next_frame = start + f
        if self._noise is not None:
            noise = self._noise[:, start : start + f]
        else:
            shape = self.engine.geometry.latent_shape(context.shape[0], f)
            noise = torch.randn(shape, generator=self._generator, device=self.engine.device, dtype=self.engine.dtype)
        chunk: StreamChunk = self._stream.next(noise, context, segment=segment)
        work = self._work
        work[0] += chunk.transformer_s - chunk.refresh_s - chunk.recache_s
        work[1] += chunk.refresh_s
        work[2] += chunk.recache_s
        return chunk

    @torch.no_grad()
    def next_chunk(self) -> DecodedChunk | None:
        """The next chunk (latents, decoded frames when decoding, timings), or None at the end of the video."""
        if self._stream is None:
            raise RuntimeError("GenerationSession.next_chunk before start() (or after close())")
        if self.done:
            return None
        t0 = time.perf_counter()
        self._work = [0.0, 0.0, 0.0]
        if self._worker is None:
            chunk = self._begin_chunk()
            if self._decoder is not None:
                item = decode_chunk(chunk, self._decoder, synchronize=self.synchronize)
            else:
                item = DecodedChunk(chunk=chunk, frames=None, decode_s=0.0)
            wait = item.decode_s
        else:
            try:
                item, wait = self._next_overlapped()
            except BaseException:  # also KeyboardInterrupt: stop the worker, the stream cannot go on
                self.close()
                raise
        self._returned += 1
        timing = ChunkTiming(index=item.chunk.index, wall_s=time.perf_counter() - t0, denoise_s=self._work[0],
                             refresh_s=self._work[1], recache_s=self._work[2], decode_s=item.decode_s,
                             decode_wait_s=wait)
        self.stats.update(item.chunk, pixel_frames=item.frames.shape[1] if item.frames is not None else 0,
                          decode_s=item.decode_s, decode_wait_s=wait, timing=timing)
        return item

    def _next_overlapped(self) -> tuple[DecodedChunk, float]:
        """Decode chunk i on the worker while chunk i + 1 is denoised here; submit i + 1 before returning i."""
        worker = self._worker
        if self._inflight is None:  # the first call (or the stream's chunks were all returned)
            chunk = self._ahead if self._ahead is not None else self._begin_chunk()
            self._ahead = None
            self._inflight = worker.submit(self._decoder, chunk)
        job = self._inflight
        # Denoise the next chunk meanwhile -- not after the stream's first chunk, whose latency stays T + D.
        if self._ahead is None and job.chunk.index > 0 and not self._all_begun():
            self._ahead = self._begin_chunk()
        item, wait = worker.result(job)
        self._inflight = None
        if self._ahead is not None:
            self._inflight, self._ahead = worker.submit(self._decoder, self._ahead), None
        return item, wait

    def __iter__(self) -> Iterator[DecodedChunk]:
        while (item := self.next_chunk()) is not None:
            yield item

    def _stop_worker(self) -> None:
        """Hand the decode worker back to the engine (its queued decodes dropped, the one in flight finished)."""
        if self._worker is not None:
            self._worker, worker = None, self._worker
            self._finalizer.detach()
            self.engine.decode_workers.give_back(worker)
        self._inflight, self._ahead = None, None

    def __enter__(self) -> GenerationSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the stream and release the cache, the noise and the decoder state (stops the decode worker)."""
        self._stop_worker()
        self._stream = None
        self._decoder = None
        self._noise = None
        with self._lock:
            self._segments = []
