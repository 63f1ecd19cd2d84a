"""The serving adapter: the one module of ``sfvideo.serve`` that touches the generation code.

It is a thin layer over the inference engine (``sfvideo.inference``): the generator is read with
``checkpoints.read_checkpoint`` and built with ``InferenceEngine.from_checkpoint`` (a Lightning checkpoint or an
``sfvideo export`` folder records its geometry, steps, text encoder and codec, so its path is enough), and every
stream is one ``GenerationSession(endless=True)``: the engine's chunk loop, rolling KV cache, prompt switch with
LongLive re-cache, streaming decode and per-chunk timings. The server sees two objects, and only through the
methods below:

- :class:`ServeGenerator`, loaded once per server and shared by every connection (the engine: weights, text
  encoder, decoder, settings, device): :meth:`~ServeGenerator.load`, :meth:`~ServeGenerator.describe`,
  :meth:`~ServeGenerator.check_prompt` (cheap, on the event loop), :meth:`~ServeGenerator.encode_prompt` (runs
  the text encoder, in a worker thread) and :meth:`~ServeGenerator.new_session`;
- :class:`StreamSession`, one per stream (its own engine session: KV cache, clean-latent history, stream
  decoder, noise generator): :meth:`~StreamSession.start`, :meth:`~StreamSession.switch` (takes effect at the
  next chunk; safe while a chunk is generated), :meth:`~StreamSession.next_chunk` (blocking: the server calls it
  from a worker thread) and :meth:`~StreamSession.close`.

What is left here is what only a server needs: prompt validation with reasons for the page, the prompt text of
each chunk, uint8 frames, and the page's description of the generator.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ServeError(ValueError):
    """A user error at start-up (bad flag, missing file): printed as one line."""


class PromptError(ValueError):
    """A prompt the generator cannot take; the message is the reason shown on the page."""


KEYS = {"geometry": "--geometry", "text_encoder": "--text_encoder", "codec": "--codec (or --decoder)",
        "network": "the generator"}
"""The pieces of the generator by their ``sfvideo serve`` flags, for the engine's error messages."""

SESSION_FLAGS = ("frames_per_chunk", "window_frames", "sink_frames")
"""Stream options whose engine errors name the parameter: shown as the flag."""


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
    """Number of the prompt the chunk was generated under (0 = the starting prompt, one more per switch)."""
    prompt: str
    """The prompt this chunk was generated under."""
    recached: bool
    """A prompt switch (cross reset + self-attention re-cache) happened right before this chunk."""
    transformer_s: float
    """Transformer seconds: this chunk's steps, the previous chunk's refresh, any re-cache."""
    recache_s: float
    decode_s: float


def add_generator_arguments(parser: Any) -> None:
    """The flags of the generator and its streams (names and types of ``sfvideo generate``'s), on a jsonargparse
    parser; :meth:`ServeGenerator.load` reads them once instantiated."""
    from sfvideo.config import StepSchedule
    from sfvideo.geometry import VideoGeometry
    from sfvideo.nn.interfaces import TextEncoder, VideoCodec, VideoDecoder

    p = parser
    p.add_argument("--max_prompt_chars", type=int, default=500, help="Longest prompt accepted.")
    p.add_argument("--frames_per_chunk", type=int | None, default=None,
                   help="Latent frames per chunk (default: the checkpoint's; 1 = frame-wise).")
    p.add_argument("--window_frames", type=int | None, default=None,
                   help="Rolling KV-cache window in latent frames (default: the training window or clip).")
    p.add_argument("--sink_frames", type=int, default=0, help="First frames kept in the cache forever.")
    p.add_argument("--no_recache", action="store_true", help="On a prompt switch reset only the cross-attention.")
    p.add_argument("--use_ema", action="store_true", help="Use the EMA weights of a Lightning checkpoint.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str | None, default=None, help="float32/bfloat16/float16 (default: bf16 on CUDA).")
    p.add_argument("--text_encoder", type=TextEncoder | None, default=None,
                   help="Text encoder class (default: the checkpoint's), e.g. sfvideo.toy.encoders.ToyTextEncoder.")
    p.add_argument("--codec", type=VideoCodec | None, default=None,
                   help="Codec class (default: the checkpoint's), e.g. sfvideo.nn.wan_vae.WanVAECodec.")
    p.add_argument("--decoder", type=VideoDecoder | None, default=None,
                   help="Decoder of the frames in place of the codec's (e.g. sfvideo.nn.taehv.TAEHVCodec).")
    g = p.add_argument_group("Settings (default: the checkpoint's; needed for bare weights, which record none)")
    g.add_argument("--geometry", type=VideoGeometry | None, default=None, help="Latent geometry of training.")
    g.add_argument("--schedule", type=StepSchedule | None, default=None, help="The few-step list and shift.")
    g.add_argument("--context_noise", type=float | None, default=None, help="Timestep of the cache refresh noise.")


def _flag_message(error: Exception) -> str:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"--{message}" if message.startswith(SESSION_FLAGS) else message


class ServeGenerator:
    """A generator ready to serve: the engine and the stream options (shared by all sessions).

    Build it with :meth:`load` from the ``sfvideo serve`` arguments. The model is only read: every session passes
    its own KV cache to ``forward``, so sessions may run in parallel threads.

    Args:
        engine: The ``InferenceEngine`` (few-step causal sampler, with a decoder).
        source: What it was loaded from (shown on the page).
        frames_per_chunk / window_frames / sink_frames / recache_on_switch: Options of every stream
            (``GenerationSession``; None: the checkpoint's chunking and window).
        max_prompt_chars: Longest prompt accepted.
    """

    def __init__(self, engine: Any, *, source: str, frames_per_chunk: int | None = None,
                 window_frames: int | None = None, sink_frames: int = 0, recache_on_switch: bool = True,
                 max_prompt_chars: int = 500) -> None:
        if max_prompt_chars <= 0:
            raise ServeError(f"--max_prompt_chars must be positive, got {max_prompt_chars}")
        if engine.decoder is None:
            raise ServeError(f"{source} records no codec: serving needs one to show frames (give --codec CLASS_PATH "
                             f"or --decoder CLASS_PATH)")
        self.engine = engine
        self.source = source
        # overlap_decode=False: a viewer's switch lands at the next chunk. An overlapped decode (the engine's
        # default on CUDA) denoises one chunk ahead, so a switch would land one chunk later.
        self._options = dict(endless=True, frames_per_chunk=frames_per_chunk, window_frames=window_frames,
                             sink_frames=sink_frames, recache_on_switch=recache_on_switch, decode=True,
                             overlap_decode=False)
        try:  # the engine checks the options; a probe session knows the defaults they resolve to
            probe = engine.session(**self._options)
        except ValueError as e:
            raise ServeError(_flag_message(e)) from None
        self.frames_per_chunk = probe.frames_per_chunk
        self.window_frames = probe.window_frames
        self.sink_frames = probe.sink_frames
        self.capacity_frames = self.window_frames + self.sink_frames
        self.recache_on_switch = recache_on_switch
        self.max_prompt_chars = max_prompt_chars
        text_encoder = engine.text_encoder
        vocab = getattr(text_encoder, "vocab", None)
        # A word-table encoder (the toy world's) knows a closed vocabulary: check words before encoding.
        self.vocabulary: list[str] | None = sorted(vocab) if isinstance(vocab, Mapping) else None
        self.max_words: int | None = int(text_encoder.text_len) if self.vocabulary is not None else None
        stride = int(getattr(engine.decoder, "spatial_stride", 1))
        self.frame_height = engine.geometry.height * stride
        self.frame_width = engine.geometry.width * stride

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def geometry(self) -> Any:
        return self.engine.geometry

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, args: Any) -> ServeGenerator:
        """Load from the (instantiated) ``sfvideo serve`` arguments, as ``sfvideo generate`` loads its source.

        ``args.generator`` is anything ``checkpoints.read_checkpoint`` reads: a Lightning ``.ckpt`` or an export
        folder (everything recorded), or bare weights (a diffusers folder...: the settings from ``--geometry`` /
        ``--schedule`` / ``--context_noise``, the encoders from ``--text_encoder`` / ``--codec``). ``--codec``,
        ``--decoder`` and ``--text_encoder`` replace the recorded pieces.
        """
        from sfvideo.checkpoints import read_checkpoint
        from sfvideo.config import InferenceSettings
        from sfvideo.generate import GenerateError, resolve_device, resolve_dtype
        from sfvideo.inference import InferenceEngine
        from sfvideo.nn.checkpoint import CheckpointError

        try:
            device = resolve_device(args.device)
            dtype = resolve_dtype(args.dtype, device)
            ckpt = read_checkpoint(args.generator)
            overrides = {"geometry": args.geometry, "schedule": args.schedule, "context_noise": args.context_noise}
            settings = replace(ckpt.settings or InferenceSettings(),
                               **{k: v for k, v in overrides.items() if v is not None})
            decoder = args.decoder if args.decoder is not None else args.codec
            engine = InferenceEngine.from_checkpoint(ckpt, device=device, dtype=dtype, use_ema=args.use_ema,
                                                     settings=settings, text_encoder=args.text_encoder,
                                                     decoder=decoder, keys=KEYS)
        except (GenerateError, CheckpointError, FileNotFoundError, ValueError) as e:
            raise ServeError(_flag_message(e)) from None
        return cls(engine, source=str(ckpt.path), frames_per_chunk=args.frames_per_chunk,
                   window_frames=args.window_frames, sink_frames=args.sink_frames,
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
            context = self.engine.encode([norm])
        except ValueError as e:
            raise PromptError(str(e).splitlines()[0] if str(e) else "the text encoder rejected the prompt") from None
        return Prompt(norm, context)

    # -------------------------------------------------------------- sessions
    def new_session(self, seed: int) -> StreamSession:
        return StreamSession(self, seed=seed)


class StreamSession:
    """One viewer's stream: an endless ``GenerationSession`` of the engine, and the prompt text of each segment.

    Not thread-safe except :meth:`switch`, which may be called from another thread while :meth:`next_chunk` runs
    (the chunk in flight keeps its prompt, the next one switches).
    """

    def __init__(self, generator: ServeGenerator, *, seed: int) -> None:
        self.generator = generator
        self.seed = seed
        self._session = generator.engine.session(**generator._options)
        self._lock = threading.Lock()  # switch() and next_chunk() both touch the prompt texts
        self._texts: dict[int, str] = {}  # segment number -> prompt, for the segment in force and later ones
        self._chunks = 0
        self.closed = False

    @property
    def kv_cache(self) -> Any:
        """The stream's KV cache (None once closed)."""
        return self._session.kv_cache

    @property
    def chunks_done(self) -> int:
        return self._chunks

    def start(self, prompt: Prompt) -> None:
        """Set the prompt of the first chunk."""
        if self._chunks:
            raise RuntimeError("StreamSession.start: the stream has already started")
        self._session.start(prompt.context, seed=self.seed)
        self._texts = {0: prompt.text}

    def switch(self, prompt: Prompt) -> None:
        """Use ``prompt`` from the next chunk on (re-caching the held frames under it)."""
        with self._lock:
            self._texts[self._session.switch_prompt(prompt.context)] = prompt.text

    def next_chunk(self) -> ChunkFrames:
        """Denoise, cache and decode the next chunk (blocking; seconds on a CPU, milliseconds on a GPU)."""
        from sfvideo.video import to_uint8

        if self.closed:
            raise RuntimeError("StreamSession.next_chunk: the session is closed")
        if not self._texts:
            raise RuntimeError("StreamSession.next_chunk: call start(prompt) first")
        item = self._session.next_chunk()
        chunk = item.chunk
        with self._lock:
            text = self._texts[chunk.segment]
            self._texts = {k: v for k, v in self._texts.items() if k >= chunk.segment}  # flat on long streams
        self._chunks += 1
        return ChunkFrames(index=chunk.index, start_frame=chunk.start_frame, frames=to_uint8(item.frames[0]),
                           latents=chunk.latents, segment=chunk.segment, prompt=text, recached=chunk.recached,
                           transformer_s=chunk.transformer_s, recache_s=chunk.recache_s, decode_s=item.decode_s)

    def close(self) -> None:
        """Free the cache, the history and the decoder state at once (idempotent)."""
        self.closed = True
        self._session.close()
        self._texts = {}
