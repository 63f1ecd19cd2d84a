"""The inference engine: one way to sample every sfvideo network, for every caller.

Callers: ``sfvideo generate``, ``sfvideo bench``, ``predict`` and the evaluation callback (through the training
modules' ``inference_engine()``), the demo, and the browser server. None of them sets up noise, caches, dtypes,
guidance or prompt switching itself.

API::

    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.inference import InferenceEngine

    ckpt = read_checkpoint("last.ckpt")                    # any checkpoint or export sfvideo writes
    engine = InferenceEngine.from_checkpoint(ckpt, device="cuda", dtype=torch.bfloat16)
    latents = engine.generate(["a red circle ..."], seed=0)  # (B, F, C, H, W), the training clip
    video = engine.decode(latents)                          # (B, T, 3, H, W) in [-1, 1]

    session = engine.session(num_frames=84, window_frames=12, sink_frames=3)   # one per consumer
    session.start("a red circle ...", seed=0, schedule=[(42, "a blue square ...")])
    for item in session:                                    # or session.next_chunk() until None
        item.chunk.latents, item.frames, item.decode_s      # StreamChunk, (B, t, 3, H, W), seconds
    session.switch_prompt("a green star ...")              # from the next chunk on (LongLive re-cache), any thread
    session.close()

``InferenceEngine(model, text_encoder=..., settings=InferenceSettings(...), decoder=...)``
    One network with its text encoder, its decoder (the run's codec, or any ``VideoDecoder`` such as a tiny
    preview decoder) and ``config.InferenceSettings`` (geometry, sampler, step list, shift, warp, chunking, context
    noise, window, negative prompt, many-step sampling). Device and dtype are the model's. ``encode(prompts)``,
    ``negative(batch)``, ``noise(batch, frames, seed)``, ``generate(prompts, num_frames, seed)``,
    ``decode(latents)``, ``sample_clip(prompts, noise)`` (bidirectional Euler + CFG), ``session(**options)``.
    ``InferenceEngine.from_checkpoint(ckpt, ...)`` builds everything from what the checkpoint records.
    ``step_graphs=True`` replays the generator's cached forwards as CUDA graphs (``graphs.StepGraphs``, one per
    cache layout; ``engine.graphs``); ``engine.decode_workers`` are the threads of overlapped decodes.

``GenerationSession``
    Per consumer: ``start(prompts, seed, schedule)``, ``next_chunk() -> DecodedChunk | None``,
    ``switch_prompt(prompts) -> segment`` (at the next chunk not yet begun; thread-safe, so a server calls it
    while a chunk is generated), ``close()`` (or ``with engine.session(...) as session``); ``stats``
    (``StreamStats``: latency, FPS, transformer / refresh / re-cache / decode seconds, and per call
    ``timings``/``breakdown()``: denoise, refresh, decode, waited, host), ``num_chunks``, ``num_pixel_frames``,
    ``kv_cache``. ``overlap_decode`` (default: where it pays) decodes chunk ``i`` on a worker thread (CUDA: its
    own stream) while chunk ``i + 1`` is denoised, same frames; a live switch then lands one chunk later (the
    server turns it off). Prompts may be given as embeddings
    from ``engine.encode`` (encoded on another thread). ``endless=True`` streams until closed (a server) in flat
    memory (rolling cache, bounded history, past prompts dropped); otherwise ``num_frames`` latent frames (default:
    the training clip).

Samplers (``InferenceSettings.sampler``):
    ``few_step``: the causal generator, chunk by chunk on a rolling KV cache (``stream.FewStepChunks``);
    ``euler``: a bidirectional model (the teacher), the whole clip by many-step Euler with CFG
    (``diffusion.sampling.euler_sample``), then streamed out chunk by chunk; ``causal_cfg``: a many-step causal
    model (diffusion / teacher forcing) chunk by chunk with CFG on two KV caches, cond and uncond, Euler or UniPC
    (``causal_cfg.CausalCFGChunks`` over ``diffusion.causal_sampling.causal_cfg_sample``; official
    ``pipeline/causal_diffusion_inference.py``); it streams, rolls and switches prompts like ``few_step``.

Where new pieces plug in, without changing the callers:
    * a causal sampler (as ``causal_cfg.CausalCFGChunks``): a ``stream.ChunkSampler`` (``denoise``, ``refresh``,
      ``switch``, ``held_frames``; it owns its caches, e.g. two for CFG), chosen in ``GenerationSession.start`` by
      ``settings.sampler``;
    * a decoder (TAEHV): any ``nn.interfaces.VideoDecoder`` passed as ``decoder`` (``sfvideo generate --decoder``);
    * decoding chunk ``i`` on a worker thread while chunk ``i + 1`` is denoised: done inside
      ``GenerationSession.next_chunk``, the only place a chunk is decoded (``overlap.py``);
    * speed-ups applied from outside (``graphs.py``): ``compile_blocks`` (``torch.compile`` per block; the KV
      cache's bookkeeping is never traced) and ``StepGraphs``;
    * a browser server: one ``GenerationSession(endless=True)`` per connection.

Modules: ``engine.py`` (the engine, sessions, cache sizing), ``stream.py`` (the chunk loop, prompt switches,
timing), ``causal_cfg.py`` (the many-step causal sampler), ``prompts.py`` (prompt schedules from text and files),
``overlap.py`` (decode workers), ``graphs.py`` (compile, CUDA graphs).
"""

from sfvideo.inference.causal_cfg import CausalCFGChunks
from sfvideo.inference.engine import (
    GenerationSession,
    InferenceEngine,
    cache_capacity,
    stream_cache,
)
from sfvideo.inference.prompts import PromptSchedule, parse_prompt_schedule, read_prompt_schedule
from sfvideo.inference.stream import (
    ChunkSampler,
    ChunkStream,
    ChunkTiming,
    DecodedChunk,
    FewStepChunks,
    StreamChunk,
    StreamStats,
    check_context_schedule,
    decode_stream,
    stream,
    sync_device,
)

__all__ = [
    "CausalCFGChunks",
    "ChunkSampler",
    "ChunkStream",
    "ChunkTiming",
    "DecodedChunk",
    "FewStepChunks",
    "GenerationSession",
    "InferenceEngine",
    "PromptSchedule",
    "StreamChunk",
    "StreamStats",
    "cache_capacity",
    "check_context_schedule",
    "decode_stream",
    "parse_prompt_schedule",
    "read_prompt_schedule",
    "stream",
    "stream_cache",
    "sync_device",
]
