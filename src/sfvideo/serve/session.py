"""The serving adapter: the one module of ``sfvideo.serve`` that touches the generation code.

The server sees two objects, and only through the methods below, so pointing the server at another inference
engine means rewriting this file only:

- :class:`ServeGenerator`, loaded once per server and shared by every connection (weights, text encoder, codec,
  geometry, device): :meth:`~ServeGenerator.load`, :meth:`~ServeGenerator.describe`,
  :meth:`~ServeGenerator.check_prompt` (cheap, on the event loop), :meth:`~ServeGenerator.encode_prompt`
  (runs the text encoder, in a worker thread) and :meth:`~ServeGenerator.new_session`;
- :class:`StreamSession`, one per stream, owning its KV cache, clean-latent history, stream decoder and random
  generators: :meth:`~StreamSession.start`, :meth:`~StreamSession.switch` (takes effect at the next chunk),
  :meth:`~StreamSession.next_chunk` (blocking: the server calls it from a worker thread) and
  :meth:`~StreamSession.close`.

An interactive stream has no end and its prompt changes when the viewer types, so the fixed-schedule iterator
``sfvideo.streaming.stream`` cannot drive it. :meth:`StreamSession.next_chunk` is that iterator's loop body, one
chunk per call, with the context read at each call: the previous chunk's deferred clean refresh, then on a prompt
switch the LongLive re-cache (``streaming.recache``), then the chunk's few denoising steps
(``rollout.generate_latents``), then the codec's streaming decode. Given the same noise and the same switch
points the chunks equal ``stream``'s bit for bit (``tests/serve/test_session.py``). Each chunk's initial noise is
drawn when the chunk starts, so a stream of any length holds no noise tensor for its future; the cache rolls
(``window_frames`` recent frames plus ``sink_frames`` first frames) and the history keeps only the held frames,
so memory is flat.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ServeError(ValueError):
    """A user error at start-up (bad flag, missing file): printed as one line."""


class PromptError(ValueError):
    """A prompt the generator cannot take; the message is the reason shown on the page."""


@dataclass(frozen=True)
class Prompt:
    """A validated, encoded prompt."""

    text: str
    context: Tensor
    """Embeddings ``(1, L, D)`` on the generator's device and dtype."""


@dataclass
class ChunkFrames:
    """One streamed chunk, decoded."""

    index: int
    """Chunk number in the stream (0-based)."""
    start_frame: int
    """Absolute latent frame of the chunk's first frame."""
    frames: np.ndarray
    """Pixel frames ``(t, H, W, 3)`` uint8 (t may be 0 while a causal decoder warms up)."""
    latents: Tensor
    """Clean latents ``(1, f, C, h, w)`` (kept for tests; the server drops them)."""
    segment: int
    """How many prompt switches happened before this chunk (0 = the starting prompt)."""
    prompt: str
    """The prompt this chunk was generated under."""
    recached: bool
    """A prompt switch (cross reset + self-attention re-cache) happened right before this chunk."""
    transformer_s: float
    """Transformer seconds: this chunk's steps, the previous chunk's refresh, any re-cache."""
    recache_s: float
    decode_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ServeGenerator:
    """A generator ready to serve: model, encoders, geometry and streaming settings (shared by all sessions).

    Build it with :meth:`load` from the ``sfvideo serve`` arguments. The model is only read: every session passes
    its own KV cache to ``forward``, so sessions may run in parallel threads.
    """

    def __init__(self, *, loaded: Any, model: torch.nn.Module, text_encoder: Any, codec: Any, device: torch.device,
                 dtype: torch.dtype, frames_per_chunk: int, window_frames: int, sink_frames: int,
                 recache_on_switch: bool, max_prompt_chars: int) -> None:
        from sfvideo.diffusion.denoiser import Denoiser

        self.source = loaded.source
        self.geometry = loaded.geometry
        self.model = model
        self.denoiser = Denoiser(model)
        self.step_sigmas = loaded.step_sigmas.to(device)
        self.context_sigma = float(loaded.context_sigma)
        self.text_encoder = text_encoder
        self.codec = codec
        self.device = device
        self.dtype = dtype
        self.frames_per_chunk = frames_per_chunk
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.capacity_frames = window_frames + sink_frames
        self.recache_on_switch = recache_on_switch
        self.max_prompt_chars = max_prompt_chars
        vocab = getattr(text_encoder, "vocab", None)
        # A word-table encoder (the toy world's) knows a closed vocabulary: check words before encoding.
        self.vocabulary: list[str] | None = sorted(vocab) if isinstance(vocab, Mapping) else None
        self.max_words: int | None = int(text_encoder.text_len) if self.vocabulary is not None else None
        stride = int(getattr(codec, "spatial_stride", 1))
        self.frame_height = self.geometry.height * stride
        self.frame_width = self.geometry.width * stride

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, args: Any) -> ServeGenerator:
        """Load from the ``sfvideo serve`` arguments (the ``sfvideo generate`` loading path and flag names).

        ``args.checkpoint`` is a Lightning ``.ckpt`` of ``SelfForcingDMD`` or anything
        ``sfvideo.nn.checkpoint.load_transformer`` reads (a diffusers folder first of all).
        """
        from sfvideo.generate import GenerateError, _device, _dtype, build_encoder, cast_model, load_generator

        try:
            device = _device(args.device)
            dtype = _dtype(args.dtype, device)
            loaded = load_generator(args)
            checkpoint = Path(args.checkpoint)
            text_encoder = build_encoder("text_encoder", args.text_encoder, args.text_encoder_args, checkpoint,
                                         loaded)
            codec = build_encoder("codec", args.codec, args.codec_args, checkpoint, loaded)
        except GenerateError as e:
            raise ServeError(str(e)) from None
        if text_encoder is None:
            raise ServeError("--text_encoder none: serving needs a text encoder")
        if codec is None:
            raise ServeError("--codec none: serving needs a codec to show frames")
        geo = loaded.geometry
        f = args.frames_per_chunk or geo.frames_per_chunk
        if f <= 0:
            raise ServeError(f"--frames_per_chunk must be positive, got {f}")
        model_cfg = getattr(loaded.model, "config", None)
        text_dim = model_cfg.get("text_dim") if hasattr(model_cfg, "get") else None
        if text_dim is not None and getattr(text_encoder, "dim", text_dim) != text_dim:
            raise ServeError(f"text encoder {type(text_encoder).__name__} gives {text_encoder.dim}-dim embeddings "
                             f"but the generator expects text_dim={text_dim} (choose --text_encoder)")
        if getattr(codec, "latent_channels", geo.channels) != geo.channels:
            raise ServeError(f"codec {type(codec).__name__} has {codec.latent_channels} latent channels, the "
                             f"generator {geo.channels} (choose --codec / --codec_args)")
        # A stream is unbounded: the cache always rolls, over the training window (or the training clip).
        window = args.window_frames if args.window_frames is not None else (loaded.window_frames or geo.num_frames)
        if window < f or window % f:
            raise ServeError(f"--window_frames={window} must be a positive multiple of the chunk size {f}")
        if args.sink_frames < 0 or args.sink_frames % f:
            raise ServeError(f"--sink_frames={args.sink_frames} must be a non-negative multiple of the chunk size {f}")
        if args.max_prompt_chars <= 0:
            raise ServeError(f"--max_prompt_chars must be positive, got {args.max_prompt_chars}")
        # Encoders stay where their init args put them (as in `sfvideo generate`): umT5 may be offloaded.
        model = cast_model(loaded.model, dtype).to(device).eval()
        return cls(loaded=loaded, model=model, text_encoder=text_encoder, codec=codec, device=device, dtype=dtype,
                   frames_per_chunk=f, window_frames=window, sink_frames=args.sink_frames,
                   recache_on_switch=not args.no_recache, max_prompt_chars=args.max_prompt_chars)

    def describe(self) -> dict[str, Any]:
        """What the page shows about the generator (JSON-serialisable)."""
        examples: list[str] = []
        if self.vocabulary is not None:
            from sfvideo.toy.world import VOCABULARY, train_prompts

            if set(self.vocabulary) == set(VOCABULARY):  # the toy world's encoder: offer its prompts
                prompts = train_prompts()
                examples = prompts[:: max(1, len(prompts) // 8)][:8]
        return {
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "frame_height": self.frame_height,
            "frame_width": self.frame_width,
            "latent_frames_per_chunk": self.frames_per_chunk,
            "window_frames": self.window_frames,
            "sink_frames": self.sink_frames,
            "max_prompt_chars": self.max_prompt_chars,
            "max_words": self.max_words,
            "vocabulary": self.vocabulary,
            "examples": examples,
        }

    # -------------------------------------------------------------- prompts
    def check_prompt(self, text: Any) -> str:
        """The normalised prompt (whitespace collapsed), or :class:`PromptError` with the reason. Cheap."""
        if not isinstance(text, str):
            raise PromptError("the prompt must be text")
        bad = sorted({c for c in text if unicodedata.category(c).startswith("C") and c not in "\t\n\r"})
        if bad:
            raise PromptError(f"the prompt contains control or unprintable characters ({', '.join(map(ascii, bad))})")
        norm = " ".join(text.split())
        if not norm:
            raise PromptError("the prompt is empty")
        if len(norm) > self.max_prompt_chars:
            raise PromptError(f"the prompt has {len(norm)} characters; at most {self.max_prompt_chars} are allowed")
        if self.vocabulary is not None:
            words = norm.lower().split()
            known = set(self.vocabulary)
            unknown = [w for w in dict.fromkeys(words) if w not in known]
            if unknown:
                listed = ", ".join(repr(w) for w in unknown[:5])
                raise PromptError(f"unknown word{'s' if len(unknown) > 1 else ''} {listed}: this generator's text "
                                  f"encoder knows only the words listed under the prompt box")
            if self.max_words is not None and len(words) > self.max_words:
                raise PromptError(f"the prompt has {len(words)} words; this generator reads at most {self.max_words}")
        return norm

    def encode_prompt(self, text: str) -> Prompt:
        """Check and encode a prompt (runs the text encoder: call it off the event loop)."""
        norm = self.check_prompt(text)
        try:
            with torch.no_grad():
                context = self.text_encoder.encode([norm])
        except ValueError as e:
            raise PromptError(str(e).splitlines()[0] if str(e) else "the text encoder rejected the prompt") from None
        return Prompt(norm, context.to(device=self.device, dtype=self.dtype))

    # -------------------------------------------------------------- sessions
    def new_session(self, seed: int) -> StreamSession:
        return StreamSession(self, seed=seed)


class StreamSession:
    """One viewer's stream: its own KV cache, clean-latent history, stream decoder and random generators.

    Not thread-safe except :meth:`switch`, which may be called from another thread while :meth:`next_chunk` runs
    (the switch is picked up when the next chunk starts).
    """

    def __init__(self, generator: ServeGenerator, *, seed: int) -> None:
        from sfvideo.streaming import _CleanHistory

        g = generator
        self.generator = g
        self.seed = seed
        # Two streams of random numbers: the chunks' initial noise and the re-noising between steps (and context
        # noise). One call to next_chunk draws the same amounts whatever the other stream did.
        self._noise_gen = torch.Generator(device=g.device).manual_seed(seed)
        self._step_gen = torch.Generator(device=g.device).manual_seed(seed + 1)
        self.kv_cache = g.model.new_kv_cache(1, g.geometry.tokens_per_frame, g.capacity_frames,
                                             sink_frames=g.sink_frames, window_frames=g.window_frames,
                                             dtype=g.dtype, device=g.device)
        self._history = _CleanHistory()
        self._decoder = g.codec.stream_decoder()
        self._lock = threading.Lock()
        self._prompt: Prompt | None = None
        self._pending: Prompt | None = None
        self._deferred: tuple[int, Tensor, Tensor] | None = None  # (start, latents, context) awaiting refresh
        self._index = 0
        self._segment = 0
        self.closed = False

    @property
    def chunks_done(self) -> int:
        return self._index

    def start(self, prompt: Prompt) -> None:
        """Set the prompt of the first chunk."""
        if self._index:
            raise RuntimeError("StreamSession.start: the stream has already started")
        self._prompt = prompt

    def switch(self, prompt: Prompt) -> None:
        """Use ``prompt`` from the next chunk on (re-caching the held frames under it)."""
        with self._lock:
            self._pending = prompt

    def next_chunk(self) -> ChunkFrames:
        """Denoise, cache and decode the next chunk (blocking; seconds on a CPU, milliseconds on a GPU)."""
        from sfvideo.diffusion.rollout import generate_latents
        from sfvideo.streaming import recache, refresh
        from sfvideo.video import to_uint8

        if self.closed:
            raise RuntimeError("StreamSession.next_chunk: the session is closed")
        if self._prompt is None:
            raise RuntimeError("StreamSession.next_chunk: call start(prompt) first")
        g = self.generator
        f = g.frames_per_chunk
        start = self._index * f
        with self._lock:
            pending, self._pending = self._pending, None
        with torch.no_grad():
            _sync(g.device)
            t0 = time.perf_counter()
            if self._deferred is not None:
                # The previous chunk's clean refresh under its own prompt, deferred so it was shown one forward
                # earlier (as in streaming.stream).
                d_start, d_latents, d_context = self._deferred
                refresh(g.denoiser, d_latents, d_context, kv_cache=self.kv_cache, start_frame=d_start,
                        context_sigma=g.context_sigma, noise_generator=self._step_gen)
                self._deferred = None
            recached, recache_s = False, 0.0
            if pending is not None:
                if self._index == 0:
                    self._prompt = pending  # nothing generated yet: just a different first prompt
                else:
                    t_switch = time.perf_counter()
                    self._prompt = pending
                    self._segment += 1
                    if g.recache_on_switch:
                        recache(g.denoiser, self.kv_cache, self._history.frames, pending.context,
                                frames_per_chunk=f, context_sigma=g.context_sigma, noise_generator=self._step_gen)
                    else:
                        self.kv_cache.reset_cross()
                    recached = True
                    _sync(g.device)
                    recache_s = time.perf_counter() - t_switch
            context = self._prompt.context
            noise = torch.randn(g.geometry.latent_shape(1, f), generator=self._noise_gen, device=g.device,
                                dtype=g.dtype)
            latents = generate_latents(g.denoiser, noise, context, step_sigmas=g.step_sigmas, frames_per_chunk=f,
                                       kv_cache=self.kv_cache, context_sigma=g.context_sigma,
                                       noise_generator=self._step_gen, start_frame=start, refresh_last=False)
            _sync(g.device)
            transformer_s = time.perf_counter() - t0
            self._history.add(start, latents, self.kv_cache)
            self._deferred = (start, latents, context)
            t1 = time.perf_counter()
            pixels = self._decoder.decode_chunk(latents)
            frames = to_uint8(pixels[0])
            decode_s = time.perf_counter() - t1
        chunk = ChunkFrames(index=self._index, start_frame=start, frames=frames, latents=latents,
                            segment=self._segment, prompt=self._prompt.text, recached=recached,
                            transformer_s=transformer_s, recache_s=recache_s, decode_s=decode_s)
        self._index += 1
        return chunk

    def close(self) -> None:
        """Free the cache, the history and the decoder state at once (idempotent)."""
        self.closed = True
        self.kv_cache = None
        self._history = None
        self._decoder = None
        self._deferred = None
        self._prompt = self._pending = None
