"""The causal stream: chunks denoised one after another on a KV cache, prompt switches, streaming decode, timing.

A :class:`ChunkSampler` denoises one chunk and writes it to its cache(s); :class:`ChunkStream` drives one along a
video: per chunk it runs the previous chunk's deferred cache refresh, switches the prompt when the segment
changed, and denoises the chunk. :class:`FewStepChunks` is the few-step generator's sampler: each chunk is
:func:`~sfvideo.diffusion.rollout.generate_latents` on that chunk's noise at its absolute ``start_frame`` (the
rollout's own loop: steps along the trained list, fresh re-noising between steps) with ``refresh_last=False``;
the chunk is returned as soon as its last step is done and its clean cache refresh
(:func:`~sfvideo.diffusion.rollout.refresh_chunk`, the rollout's step 3: same call, same random draws in the same
order) runs when the next chunk is asked for, so the first chunk arrives one forward earlier. For the same noise
and noise generator the concatenated stream equals a single ``generate_latents`` call bit for bit (same kernels,
same shapes, same order). A many-step causal sampler with classifier-free guidance on two caches (cond and
uncond) is another :class:`ChunkSampler`.

Length is unbounded by the training window: the KV cache rolls (``window_frames`` recent frames plus
``sink_frames`` first frames, keys cached before RoPE; see ``sfvideo.nn.kv_cache``).

Prompt switches (LongLive's KV re-cache, notes §2.4, §9): at a chunk boundary where the prompt changes, the
cross-attention cache is reset (``kv_cache.reset_cross()``) and the self-attention K/V of the frames the cache holds
are recomputed under the new prompt by re-running the generator on their clean latents at the context noise level,
chunk by chunk in stream order, as the refresh after each chunk wrote them (:func:`recache`). Without re-caching
the old prompt lingers in the cached keys and values; with it the scene stays continuous (the latents are kept)
while the new prompt takes over.

Timing: every chunk reports its transformer wall time (its steps, the previous chunk's refresh, any re-cache);
:func:`decode_stream` adds the decoder's streaming-decode time. With ``synchronize=True`` the device is synchronised
around each timed region, so asynchronous CUDA work is charged to the right region.

:func:`stream` is the whole loop as one iterator for a fixed prompt schedule.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import generate_latents, refresh_chunk

ContextSchedule = Sequence[tuple[int, Tensor]]
"""``[(start_frame, context (B, L, D)), ...]``: prompt embeddings by latent frame, the first at frame 0."""


@dataclass
class StreamChunk:
    """One denoised chunk of a stream."""

    index: int
    """Chunk number in the stream (0-based)."""
    start_frame: int
    """Absolute latent frame of ``latents[:, 0]``."""
    latents: Tensor
    """Clean latents ``(B, f, C, H, W)``."""
    segment: int
    """Number of the prompt this chunk was generated under: its entry in the context schedule (a
    ``GenerationSession`` numbers live switches on from there); a change of segment is a prompt switch."""
    recached: bool
    """A prompt switch (cross reset + self-attention re-cache) happened right before this chunk."""
    transformer_s: float
    """Transformer wall time spent producing this chunk: its denoising steps, the deferred cache refresh of the
    previous chunk and the re-cache on a prompt switch (seconds)."""
    recache_s: float = 0.0
    """Part of ``transformer_s`` spent re-caching after a prompt switch."""
    refresh_s: float = 0.0
    """Part of ``transformer_s`` spent on the previous chunk's deferred cache refresh (one forward)."""


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on the calling thread's current stream (CUDA), or the device's (MPS); a no-op on
    the CPU.

    The current stream only: a decode overlapped on another stream (``GenerationSession``) keeps running, and the
    timings of each region stay its own.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def check_context_schedule(schedule: ContextSchedule, frames_per_chunk: int, num_frames: int | None) -> None:
    """Raise a one-line ``ValueError`` unless the schedule starts at 0, increases, and switches on chunk boundaries."""
    if not schedule:
        raise ValueError("the prompt schedule is empty")
    frames = [int(f) for f, _ in schedule]
    if frames[0] != 0:
        raise ValueError(f"the prompt schedule must start at frame 0, got {frames[0]}")
    for a, b in zip(frames, frames[1:]):
        if b <= a:
            raise ValueError(f"prompt schedule frames must increase strictly, got {frames}")
    for f in frames:
        if f % frames_per_chunk:
            raise ValueError(
                f"prompt switch at latent frame {f} is not on a chunk boundary (multiple of {frames_per_chunk})"
            )
        if num_frames is not None and f >= num_frames:
            raise ValueError(f"prompt switch at latent frame {f} is past the video's {num_frames} latent frames")


class _CleanHistory:
    """Clean latents ``(B, 1, C, H, W)`` by absolute frame, pruned to the frames the cache holds."""

    def __init__(self) -> None:
        self.frames: dict[int, Tensor] = {}

    def add(self, start_frame: int, latents: Tensor, held: Iterable[int]) -> None:
        for j in range(latents.shape[1]):
            self.frames[start_frame + j] = latents[:, j : j + 1]
        keep = set(held)
        for k in [k for k in self.frames if k not in keep]:
            del self.frames[k]


def _replay_groups(frames: Sequence[int], frames_per_chunk: int) -> list[list[int]]:
    """Consecutive held frames grouped by chunk (a chunk cut by eviction gives a shorter group)."""
    groups: list[list[int]] = []
    for k in frames:
        if groups and groups[-1][-1] + 1 == k and k // frames_per_chunk == groups[-1][0] // frames_per_chunk:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def recache(
    denoiser: Denoiser,
    kv_cache: Any,
    history: Mapping[int, Tensor],
    context: Tensor,
    *,
    frames_per_chunk: int,
    context_sigma: float = 0.0,
    noise_generator: torch.Generator | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """LongLive's KV re-cache on a prompt switch: reset cross-attention, rewrite self-attention under ``context``.

    ``kv_cache.reset_cross()`` drops the old prompt's text K/V (the next call caches the new ones); then the
    generator is re-run on the clean latents of the frames the cache holds, chunk by chunk in stream order at
    their absolute start frames and at the context noise level, which is how the refresh after each chunk wrote
    them. Rewriting at a start frame drops the held frames after it, so the replay rebuilds the cache in order.

    Which frames: all held frames while nothing was evicted (the cache holds frames ``0..end-1``); after
    evictions, the frames from the oldest held non-sink frame on. The sink frames then keep the K/V of the
    prompt they were generated under (the cache cannot append past a gap after a rewind to frame 0): they anchor
    the scene, the window carries the new prompt.

    Args:
        denoiser: The generator.
        kv_cache: The stream's cache (``frame_ids``, ``sink_frames``, ``reset_cross``), modified in place.
        history: Clean latents ``(B, 1, C, H, W)`` by absolute frame, covering the held frames.
        context: The new prompt embeddings ``(B, L, D)``.
        frames_per_chunk: Latent frames per chunk.
        context_sigma: Noise level of the cached context (0 = clean, the release).
        noise_generator: Source of the context noise when ``context_sigma > 0``.
        model_kwargs: Extra keyword arguments of every generator call.

    Returns:
        The re-cached absolute frames.
    """
    kv_cache.reset_cross()
    held = list(kv_cache.frame_ids)
    if not held:
        return []
    sink = min(int(getattr(kv_cache, "sink_frames", 0) or 0), len(held))
    evicted = held != list(range(len(held)))
    frames = held[sink:] if evicted else held
    missing = [k for k in frames if k not in history]
    if missing:
        raise RuntimeError(f"recache: no clean latents for held frames {missing[:4]}")
    for group in _replay_groups(frames, frames_per_chunk):
        clean = torch.cat([history[k] for k in group], 1)
        refresh_chunk(denoiser, clean, context, kv_cache=kv_cache, start_frame=group[0], context_sigma=context_sigma,
                      noise_generator=noise_generator, model_kwargs=model_kwargs)
    return frames


class ChunkSampler(Protocol):
    """How one chunk is denoised and written to the sampler's KV cache(s): the plug point of causal samplers."""

    def denoise(self, noise: Tensor, context: Tensor, start_frame: int) -> Tensor:
        """Clean latents ``(B, f, C, H, W)`` of the chunk starting at absolute frame ``start_frame``."""
        ...

    def refresh(self, latents: Tensor, context: Tensor, start_frame: int) -> None:
        """Rewrite the chunk's cache slot from its clean latents (run before the next chunk)."""
        ...

    def switch(self, history: Mapping[int, Tensor], context: Tensor, *, full: bool) -> None:
        """A new prompt from the next chunk on: reset the cross-attention cache, and with ``full`` also rewrite
        the self-attention cache of the held frames (``history``: their clean latents) under ``context``."""
        ...

    def held_frames(self) -> list[int]:
        """Absolute frames the cache holds (their clean latents are kept for a re-cache)."""
        ...


class FewStepChunks:
    """The few-step causal generator on one KV cache (Algorithm 1 at inference: every exit at the last step).

    Args:
        denoiser: The generator.
        kv_cache: A fresh cache (``model.new_kv_cache``), written in place.
        step_sigmas: The generator's step sigmas ``(S,)``.
        frames_per_chunk: Latent frames per chunk.
        context_sigma: Noise level of the cache refresh (0 = clean context).
        noise_generator: Source of the re-noising between steps and of the context noise.
        model_kwargs: Extra keyword arguments of every generator call.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        kv_cache: Any,
        *,
        step_sigmas: Tensor,
        frames_per_chunk: int,
        context_sigma: float = 0.0,
        noise_generator: torch.Generator | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.denoiser, self.kv_cache, self.step_sigmas = denoiser, kv_cache, step_sigmas
        self.frames_per_chunk, self.context_sigma = frames_per_chunk, context_sigma
        self.noise_generator, self.model_kwargs = noise_generator, model_kwargs

    def denoise(self, noise: Tensor, context: Tensor, start_frame: int) -> Tensor:
        return generate_latents(
            self.denoiser,
            noise,
            context,
            step_sigmas=self.step_sigmas,
            frames_per_chunk=self.frames_per_chunk,
            kv_cache=self.kv_cache,
            context_sigma=self.context_sigma,
            noise_generator=self.noise_generator,
            start_frame=start_frame,
            refresh_last=False,
            model_kwargs=self.model_kwargs,
        )

    def refresh(self, latents: Tensor, context: Tensor, start_frame: int) -> None:
        refresh_chunk(self.denoiser, latents, context, kv_cache=self.kv_cache, start_frame=start_frame,
                      context_sigma=self.context_sigma, noise_generator=self.noise_generator,
                      model_kwargs=self.model_kwargs)

    def switch(self, history: Mapping[int, Tensor], context: Tensor, *, full: bool) -> None:
        if not full:
            self.kv_cache.reset_cross()
            return
        recache(self.denoiser, self.kv_cache, history, context, frames_per_chunk=self.frames_per_chunk,
                context_sigma=self.context_sigma, noise_generator=self.noise_generator, model_kwargs=self.model_kwargs)

    def held_frames(self) -> list[int]:
        return list(self.kv_cache.frame_ids)


class ChunkStream:
    """A stream of chunks from a :class:`ChunkSampler`, with deferred refreshes, prompt switches and timing.

    Call :meth:`next` once per chunk with that chunk's noise and prompt embeddings (and the index of its prompt
    segment: a new segment is a prompt switch); :meth:`finish` runs the last deferred refresh (only needed to
    continue the cache later).

    Args:
        sampler: The chunk sampler (it owns the caches).
        frames_per_chunk: Latent frames per chunk.
        recache_on_switch: Re-cache the self-attention K/V under a new prompt (LongLive); False only resets the
            cross-attention cache.
        synchronize: Synchronise ``device`` around timed regions (accurate timings on CUDA).
        device: Where the chunks are computed (noise is moved there chunk by chunk).
    """

    def __init__(
        self,
        sampler: ChunkSampler,
        *,
        frames_per_chunk: int,
        recache_on_switch: bool = True,
        synchronize: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.sampler, self.frames_per_chunk = sampler, frames_per_chunk
        self.recache_on_switch, self.synchronize = recache_on_switch, synchronize
        self.device = device
        self.index = 0
        self.segment = 0
        self.history = _CleanHistory()
        self._pending: tuple[int, Tensor, Tensor] | None = None  # (start, latents, context) awaiting refresh

    def _sync(self) -> None:
        if self.synchronize and self.device is not None:
            sync_device(self.device)

    def _refresh_pending(self) -> None:
        if self._pending is not None:
            start, latents, context = self._pending
            self._pending = None
            self.sampler.refresh(latents, context, start)

    def next(self, noise: Tensor, context: Tensor, *, segment: int = 0) -> StreamChunk:
        """Denoise the next chunk from ``noise`` ``(B, f, C, H, W)`` under ``context`` ``(B, L, D)``."""
        start = self.index * self.frames_per_chunk
        self._sync()
        t0 = time.perf_counter()
        # The previous chunk's cache refresh, deferred so that chunk was returned one forward earlier.
        refresh_s = 0.0
        if self._pending is not None:
            self._refresh_pending()
            self._sync()
            refresh_s = time.perf_counter() - t0
        recached, recache_s = False, 0.0
        if self.index > 0 and segment != self.segment:
            t_switch = time.perf_counter()
            self.sampler.switch(self.history.frames, context, full=self.recache_on_switch)
            recached = True
            self._sync()
            recache_s = time.perf_counter() - t_switch
        self.segment = segment
        latents = self.sampler.denoise(noise.to(self.device) if self.device is not None else noise, context, start)
        self._sync()
        elapsed = time.perf_counter() - t0
        self.history.add(start, latents, self.sampler.held_frames())
        self._pending = (start, latents, context)
        chunk = StreamChunk(index=self.index, start_frame=start, latents=latents, segment=segment,
                            recached=recached, transformer_s=elapsed, recache_s=recache_s, refresh_s=refresh_s)
        self.index += 1
        return chunk

    def finish(self) -> None:
        """Run the deferred refresh of the last chunk (the cache then holds it, as after the training rollout)."""
        self._refresh_pending()


def stream(
    denoiser: Denoiser,
    noise: Tensor,
    context: Tensor | ContextSchedule,
    *,
    step_sigmas: Tensor,
    frames_per_chunk: int,
    kv_cache: Any,
    noise_generator: torch.Generator | None = None,
    context_sigma: float = 0.0,
    recache_on_switch: bool = True,
    refresh_last: bool = False,
    synchronize: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[StreamChunk]:
    """Generate a video chunk by chunk with the few-step generator, yielding each chunk's clean latents at once.

    Args:
        denoiser: The causal generator as a :class:`~sfvideo.diffusion.denoiser.Denoiser`.
        noise: Initial noise ``(B, F, C, H, W)`` for the whole stream (any ``F`` that is a multiple of
            ``frames_per_chunk``); chunk ``i`` starts from ``noise[:, i f:(i + 1) f]`` (moved to the cache's device
            chunk by chunk, so a long stream's noise may live on the CPU).
        context: Prompt embeddings ``(B, L, D)``, or a schedule ``[(start_frame, (B, L, D)), ...]`` starting at 0
            with switches on chunk boundaries.
        step_sigmas: The generator's step sigmas ``(S,)`` (``StepSchedule.sigmas``).
        frames_per_chunk: Latent frames per chunk (3 chunk-wise, 1 frame-wise).
        kv_cache: A fresh cache from ``model.new_kv_cache(...)`` (rolls past its capacity); the re-cache on a
            prompt switch reads its ``frame_ids`` and ``sink_frames``.
        noise_generator: Source of the re-noising between steps (and of context noise).
        context_sigma: Noise level of the cache refresh (0 = clean context, the release).
        recache_on_switch: Re-cache the self-attention K/V under a new prompt (LongLive); False only resets the
            cross-attention cache.
        refresh_last: Refresh the cache after the final chunk too (only needed to continue the cache later).
        synchronize: Synchronise the device around timed regions (accurate timings on CUDA).
        model_kwargs: Extra keyword arguments of every generator call.

    Yields:
        :class:`StreamChunk` per chunk, in order.
    """
    f = frames_per_chunk
    num_frames = noise.shape[1]
    if f <= 0 or num_frames % f:
        raise ValueError(f"noise has {num_frames} latent frames, not a positive multiple of frames_per_chunk={f}")
    schedule: list[tuple[int, Tensor]] = [(0, context)] if isinstance(context, Tensor) else list(context)
    check_context_schedule(schedule, f, num_frames)
    switches = {int(frame): i for i, (frame, _) in enumerate(schedule)}
    sampler = FewStepChunks(denoiser, kv_cache, step_sigmas=step_sigmas, frames_per_chunk=f,
                            context_sigma=context_sigma, noise_generator=noise_generator, model_kwargs=model_kwargs)
    chunks = ChunkStream(sampler, frames_per_chunk=f, recache_on_switch=recache_on_switch, synchronize=synchronize,
                         device=step_sigmas.device)
    segment = 0
    for start in range(0, num_frames, f):
        segment = switches.get(start, segment)
        yield chunks.next(noise[:, start : start + f], schedule[segment][1], segment=segment)
    if refresh_last:
        chunks.finish()


@dataclass
class DecodedChunk:
    """A streamed chunk with its pixel frames."""

    chunk: StreamChunk
    frames: Tensor | None
    """Pixel frames ``(B, t, 3, H, W)`` in [-1, 1] (t may be 0 while a decoder warms up); None when not decoded."""
    decode_s: float
    """Streaming-decode wall time of this chunk (seconds)."""
    decode_wait_s: float | None = None
    """Seconds the caller waited for this chunk's decode after its own work: the part of ``decode_s`` an overlapped
    decode did not hide (None: not overlapped, so all of ``decode_s``)."""


def decode_chunk(chunk: StreamChunk, decoder: Any, *, synchronize: bool = False) -> DecodedChunk:
    """Decode one chunk with a stream decoder (``codec.stream_decoder()``), timed."""
    device = chunk.latents.device
    if synchronize:
        sync_device(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        frames = decoder.decode_chunk(chunk.latents)
    if synchronize:
        sync_device(device)
    return DecodedChunk(chunk=chunk, frames=frames, decode_s=time.perf_counter() - t0)


def decode_stream(chunks: Iterable[StreamChunk], decoder: Any, *, synchronize: bool = False) -> Iterator[DecodedChunk]:
    """Decode each chunk with a codec's stream decoder (``codec.stream_decoder()``) as it arrives."""
    for chunk in chunks:
        yield decode_chunk(chunk, decoder, synchronize=synchronize)


@dataclass
class ChunkTiming:
    """Where the time of one :meth:`GenerationSession.next_chunk` call went (seconds).

    The transformer fields are the work done *during this call*: without overlap that is the returned chunk's own
    (and the previous chunk's deferred refresh); with an overlapped decode the next chunk is denoised while this
    one decodes, so the call holds the next chunk's transformer work. Over a stream the sums are the same.
    """

    index: int
    """The returned chunk."""
    wall_s: float
    """Duration of the call (from the caller's side)."""
    denoise_s: float
    """Denoising forwards (the few steps of a chunk)."""
    refresh_s: float
    """The deferred clean cache refresh of the chunk before (one forward)."""
    recache_s: float
    """Re-caching the held frames after a prompt switch."""
    decode_s: float
    """Decoding the returned chunk (on the worker when overlapped)."""
    decode_wait_s: float
    """Waiting for the decode after this call's transformer work (all of ``decode_s`` without overlap)."""

    @property
    def host_s(self) -> float:
        """The rest of the call: noise, bookkeeping, hand-offs (on CUDA also launch gaps at the timed regions)."""
        return max(0.0, self.wall_s - self.denoise_s - self.refresh_s - self.recache_s - self.decode_wait_s)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "wall_s": self.wall_s, "denoise_s": self.denoise_s, "refresh_s": self.refresh_s,
                "recache_s": self.recache_s, "decode_s": self.decode_s, "decode_wait_s": self.decode_wait_s,
                "host_s": self.host_s}


@dataclass
class StreamStats:
    """Latency and throughput of a stream (fill with :meth:`update`, one call per chunk)."""

    start_time: float = field(default_factory=time.perf_counter)
    """``perf_counter`` when generation started (after model loading and prompt encoding)."""
    first_chunk_s: float | None = None
    """Seconds from start until the first chunk's frames were available (decoded if a codec is used)."""
    chunks: int = 0
    latent_frames: int = 0
    pixel_frames: int = 0
    transformer_s: float = 0.0
    recache_s: float = 0.0
    decode_s: float = 0.0
    per_chunk_s: list[float] = field(default_factory=list)
    """Transformer + decode seconds of each chunk (the last ``keep_chunks`` of them)."""
    keep_chunks: int | None = None
    """Length of ``per_chunk_s`` and ``timings`` (None: every chunk); bounded on an endless stream, so its memory
    stays flat."""
    refresh_s: float = 0.0
    """Part of ``transformer_s`` spent on deferred cache refreshes."""
    decode_wait_s: float = 0.0
    """Part of ``decode_s`` the caller waited for (all of it without an overlapped decode)."""
    elapsed_s: float = 0.0
    """Summed duration of the timed calls (``timing`` given to :meth:`update`): what the caller waited in all."""
    timings: list[ChunkTiming] = field(default_factory=list)
    """Per call, where its time went (when :meth:`update` is given a ``timing``; the last ``keep_chunks``)."""
    totals: dict[str, float] = field(default_factory=dict)
    """:meth:`breakdown`'s running sums over every timed call."""

    def update(self, chunk: StreamChunk, pixel_frames: int = 0, decode_s: float = 0.0, *,
               decode_wait_s: float | None = None, timing: ChunkTiming | None = None) -> None:
        now = time.perf_counter()
        if self.first_chunk_s is None:
            self.first_chunk_s = now - self.start_time
        self.chunks += 1
        self.latent_frames += chunk.latents.shape[1]
        self.pixel_frames += pixel_frames
        self.transformer_s += chunk.transformer_s
        self.recache_s += chunk.recache_s
        self.refresh_s += chunk.refresh_s
        self.decode_s += decode_s
        self.decode_wait_s += decode_s if decode_wait_s is None else decode_wait_s
        self.per_chunk_s.append(chunk.transformer_s + decode_s)
        if timing is not None:
            self.elapsed_s += timing.wall_s
            self.timings.append(timing)
            for key, value in timing.as_dict().items():
                if key != "index":
                    self.totals[key] = self.totals.get(key, 0.0) + value
        if self.keep_chunks is not None:
            for kept in (self.per_chunk_s, self.timings):
                del kept[: max(0, len(kept) - self.keep_chunks)]

    @property
    def wall_s(self) -> float:
        """Seconds the stream took: the timed calls' durations, else transformer + decode (serial work)."""
        return self.elapsed_s if self.elapsed_s > 0 else self.transformer_s + self.decode_s

    def fps(self, frames: int | None = None) -> float:
        """Frames per second over :attr:`wall_s` (pixel frames if decoded, else latent frames)."""
        n = frames if frames is not None else (self.pixel_frames or self.latent_frames)
        return n / self.wall_s if self.wall_s > 0 else float("nan")

    def breakdown(self) -> dict[str, float]:
        """Seconds by kind over every timed call: wall, denoise, refresh, recache, decode, decode_wait, host."""
        keys = ("wall_s", "denoise_s", "refresh_s", "recache_s", "decode_s", "decode_wait_s", "host_s")
        return {k: self.totals.get(k, 0.0) for k in keys}

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_chunk_s": self.first_chunk_s,
            "chunks": self.chunks,
            "latent_frames": self.latent_frames,
            "pixel_frames": self.pixel_frames,
            "transformer_s": self.transformer_s,
            "recache_s": self.recache_s,
            "refresh_s": self.refresh_s,
            "decode_s": self.decode_s,
            "decode_wait_s": self.decode_wait_s,
            "wall_s": self.wall_s,
            "fps": self.fps(),
            "transformer_fps": (self.pixel_frames or self.latent_frames) / self.transformer_s
            if self.transformer_s > 0 else float("nan"),
        }
