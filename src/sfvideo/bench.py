"""``sfvideo bench generate``: streaming generation benchmarks, printed as tables and written as JSON.

Everything runs side by side in one process on the same architecture, resolution and length, with random weights
(nothing is downloaded; no network has data-dependent control flow, so weights do not change the times). Sections:

1. ``streaming``: sfvideo's stream (few steps, rolling KV cache, chunk by chunk, streaming decode) through the
   inference engine, once per decoder (``--decoders``: ``none`` = transformer only, ``wan:W`` = the Wan2.1 VAE
   architecture at base width ``W`` (96 = the real VAE), ``wan-narrow:W`` = a narrow toy variant, ``taehv`` = TAEHV
   in the ``taew2_1`` layout, ``taehv:PATH`` = a user's TAEHV file; a ``+bf16`` suffix runs it in bf16,
   channels-last) and with the decode overlapped or not (``--overlap``). Per row: first-chunk latency, FPS, and
   where the time goes per chunk (denoising forwards, cache refresh, decode, waiting for the decode, host
   overhead), model forwards, transformer FLOPs and achieved FLOP/s (on CUDA with the fraction of the device's
   peak), the decoder's FLOP/s; the decode bound ``max(transformer, decode)`` per chunk.
2. ``diffusers``: diffusers' ``WanPipeline`` (bidirectional, 50 steps, classifier-free guidance) driving a
   ``WanTransformer3DModel`` that holds *our* weights 1:1 (the parity of one forward is reported), its full VAE
   decode with ``--baseline_decoder``, and the prompt embeddings passed in; ratios against every streaming row.
3. ``rolling``: the rolling KV cache against recomputing the window for every chunk (CausVid-style: a fresh cache,
   one forward over the last ``window - f`` clean frames, then the chunk's steps) at multiples of the training
   length, next to the bound both schedules' FLOPs give.
4. ``per_chunk``: transformer time of each chunk of a long rolling stream: the window fill, then ``--chunks``
   chunks with the window full, whose flatness is reported.

Presets (``--preset``): ``toy`` (the default; a small CPU run), ``quick`` (tiny, seconds; the test runs it),
``cpu_mid`` (the mid-size CPU configuration: a ~4M-parameter, 6-layer Wan at 240x416 pixels, 81 frames, with the
real Wan VAE and TAEHV), ``gpu`` (``--gpu``: Wan2.1-1.3B architecture at 832x480, bf16, torch.compile, CUDA graphs
for the per-chunk step, flash attention where available, each reported on/off; within a time budget). Flags
override a preset's sizes. Timings are wall-clock with the device synchronised around timed regions; the first run
of every configuration is a warm-up and is not reported.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sfvideo.config import InferenceSettings, StepSchedule
from sfvideo.files import AtomicFile
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine, cache_capacity, stream_cache, sync_device
from sfvideo.inference.graphs import StepGraphs, compile_blocks, uncompile_blocks
from sfvideo.nn.flops import ZERO, ForwardFlops, wan_forward_flops
from sfvideo.nn.kv_cache import KVCache
from sfvideo.nn.precision import compute_dtype, model_device, parse_dtype

PROG = "sfvideo bench"

BENCH_FLAVORS: dict[str, dict[str, Any]] = {
    # The mid-size CPU configuration of issue 16: 6 layers, 3 heads x 64, 16 latent channels (the Wan VAE's and
    # TAEHV's), 3.99M parameters.
    "mid": dict(num_attention_heads=3, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=256,
                freq_dim=256, ffn_dim=768, num_layers=6),
}
"""Transformer sizes of the benchmark beyond ``nn.wan.FLAVORS``."""

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    # Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, matched as substrings of
    # torch.cuda.get_device_name() in this order (more specific names first).
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.4), ("H100", 989.4),
    ("H200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0),
)
"""Known device peaks for the fraction-of-peak column (half precision; None for other devices and dtypes)."""


def device_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The half-precision dense peak of a GPU by name (``PEAK_TFLOPS``), or None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


BF16 = "+bf16"
"""Decoder-spec suffix: bf16 weights and channels-last layout (the decoders' fastest CPU setting where the CPU has
AMX/AVX512-BF16, docs/benchmarks.md; the CUDA default anyway)."""


def parse_decoder_spec(spec: str) -> tuple[str, str | None]:
    """``"kind[:arg][+bf16]"`` -> ``(kind, arg)``; raises a one-line ValueError naming the spec."""
    kind, _, arg = spec.removesuffix(BF16).partition(":")
    if kind not in ("none", "wan", "wan-narrow", "taehv", "taehv-narrow"):
        raise ValueError(f"decoder {spec!r}: expected none, wan:WIDTH, wan-narrow:WIDTH, taehv, taehv:PATH or "
                         "taehv-narrow:WIDTH")
    if kind in ("wan", "wan-narrow", "taehv-narrow") and not arg.isdigit():
        raise ValueError(f"decoder {spec!r}: {kind} needs a width, e.g. {kind}:96")
    if kind == "none" and arg:
        raise ValueError(f"decoder {spec!r}: none takes no argument")
    return kind, arg or None


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and switches of one benchmark run (a preset, with command-line overrides)."""

    flavor: str = "toy"
    """Transformer size (``nn.wan.FLAVORS`` or ``BENCH_FLAVORS``)."""
    latent_height: int = 8
    latent_width: int = 8
    train_frames: int = 21
    """Latent frames of the training clip: the streamed video and the diffusers baseline's length."""
    frames_per_chunk: int = 3
    text_len: int = 32
    """Tokens of the (random) prompt embeddings."""
    schedule: StepSchedule = field(default_factory=StepSchedule)
    """Our few-step list and shift (the generator's defaults)."""
    baseline_steps: int = 50
    """diffusers' denoising steps."""
    guidance_scale: float = 5.0
    """diffusers' CFG scale (two forwards per step)."""
    decoders: tuple[str, ...] = ("none", "wan-narrow:8")
    """Decoders of the streaming section (module docstring)."""
    baseline_decoder: str = "wan-narrow:8"
    """diffusers' VAE (a ``wan:`` or ``wan-narrow:`` spec, or ``none`` for its transformer only)."""
    overlap: str = "both"
    """Decode overlapped with generation: ``on``, ``off``, ``both`` (a row each) or ``auto`` (the engine's)."""
    long_multiples: tuple[int, ...] = (4, 8)
    """Lengths of the rolling-vs-recompute comparison, in training lengths."""
    long_latent_height: int = 16
    long_latent_width: int = 16
    """Latent size of the long-video sections (transformer only)."""
    per_chunk_chunks: int = 64
    """Chunks with the window full in the per-chunk section (after the fill)."""
    sections: tuple[str, ...] = ("streaming", "diffusers", "rolling", "per_chunk")
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    """``torch.compile`` each transformer block."""
    cuda_graphs: bool = False
    """Replay the per-chunk step as CUDA graphs (``inference.graphs.StepGraphs``; CUDA only)."""
    graph_kind: str = "cuda"
    """``cuda``, or ``eager``: ``inference.graphs.EagerGraph`` stands in for CUDA graphs, so the graph path runs
    on any device (tests)."""
    ablation: bool = False
    """Also time the transformer with CUDA graphs off, and fully eager (the effect of each)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    time_budget_s: float | None = None
    """Skip the remaining runs once this much time has passed (a GPU session's limit)."""
    keep_going: bool = False
    """Record a failed run (its error) and go on with the next (a one-shot GPU session keeps what it measured)."""
    decoder_warmup_max_gflop: float | None = None
    """Warm a decoder up with one untimed chunk only if that chunk costs at most this many GFLOP (None: always).
    On a CPU a first call costs little beyond its compute (oneDNN makes its primitives per shape), and the real
    Wan VAE's chunk at mid size is minutes there."""

    def __post_init__(self) -> None:
        for spec in (*self.decoders, self.baseline_decoder):
            parse_decoder_spec(spec)
        if self.graph_kind not in ("cuda", "eager"):
            raise ValueError(f"graph_kind must be cuda or eager, got {self.graph_kind!r}")
        if self.overlap not in ("on", "off", "both", "auto"):
            raise ValueError(f"overlap must be on, off, both or auto, got {self.overlap!r}")
        unknown = set(self.sections) - {"streaming", "diffusers", "rolling", "per_chunk"}
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)} (streaming, diffusers, rolling, per_chunk)")
        if self.flavor not in _flavors():
            raise ValueError(f"unknown flavor {self.flavor!r}; choose from {sorted(_flavors())}")

    @property
    def arch(self) -> dict[str, Any]:
        return _flavors()[self.flavor]

    @property
    def geometry(self) -> VideoGeometry:
        return VideoGeometry(num_frames=self.train_frames, channels=self.arch["in_channels"],
                             height=self.latent_height, width=self.latent_width,
                             frames_per_chunk=self.frames_per_chunk)

    @property
    def long_geometry(self) -> VideoGeometry:
        return replace(self.geometry, height=self.long_latent_height, width=self.long_latent_width)


def _flavors() -> dict[str, dict[str, Any]]:
    from sfvideo.nn.wan import FLAVORS

    return {**FLAVORS, **BENCH_FLAVORS}


PRESETS: dict[str, BenchConfig] = {
    # 1 thread on CPU: the serial rows and diffusers run on one core, an overlapped decode on the second (with
    # two threads each on two shared cores oneDNN's parallel regions wait for descheduled threads, docs/benchmarks.md)
    "toy": BenchConfig(threads=1),
    "quick": BenchConfig(flavor="debug", latent_height=4, latent_width=4, train_frames=6, frames_per_chunk=2,
                         text_len=8, decoders=("none", "wan-narrow:8", "taehv-narrow:8"),
                         baseline_decoder="wan-narrow:8", per_chunk_chunks=6, long_multiples=(2, 4),
                         long_latent_height=8, long_latent_width=8, threads=1),
    "cpu_mid": BenchConfig(flavor="mid", latent_height=30, latent_width=52, train_frames=21, frames_per_chunk=3,
                           text_len=32, decoders=("none", "taehv", "taehv+bf16", "wan:96"), baseline_decoder="wan:96",
                           overlap="both", long_latent_height=30, long_latent_width=52, per_chunk_chunks=64,
                           threads=1, decoder_warmup_max_gflop=2000.0),
    "gpu": BenchConfig(flavor="1.3B", latent_height=60, latent_width=104, train_frames=21, frames_per_chunk=3,
                       text_len=512, decoders=("none", "taehv", "wan:96"), baseline_decoder="wan:96",
                       overlap="both", long_multiples=(4,), long_latent_height=60, long_latent_width=104,
                       per_chunk_chunks=64, sections=("streaming", "rolling", "per_chunk"), dtype="bfloat16",
                       device="cuda", compile=True, cuda_graphs=True, ablation=True, time_budget_s=360.0,
                       keep_going=True),
}
"""Named configurations (``--preset``); ``--quick`` and ``--gpu`` select ``quick`` and ``gpu``."""


# ------------------------------------------------------------------ decoders
def _wan_vae(kind: str, width: int, channels: int):
    from diffusers import AutoencoderKLWan

    if kind == "wan":  # the Wan2.1 VAE's layout (diffusers' defaults) at base width `width`
        return AutoencoderKLWan(base_dim=width, z_dim=channels, latents_mean=[0.0] * channels,
                                latents_std=[1.0] * channels)
    # The narrow toy variant the earlier CPU benchmarks used: one resblock per stage, no widening.
    return AutoencoderKLWan(base_dim=width, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * channels,
                            latents_std=[1.0] * channels)


def _taehv_config(kind: str, arg: str | None, channels: int):
    from sfvideo.nn.taehv import TAEHVConfig

    if kind == "taehv-narrow":
        w = int(arg)
        return TAEHVConfig(latent_channels=channels, encoder_width=w, decoder_widths=(w, w, w, w))
    return TAEHVConfig(latent_channels=channels)


def build_decoder(spec: str, channels: int, device: torch.device | str, seed: int = 0) -> Any:
    """The codec of a decoder spec (random weights unless ``taehv:PATH``), in its default dtype on ``device``
    (``"auto"``: half precision on CUDA, fp32 elsewhere); None for ``none``."""
    kind, arg = parse_decoder_spec(spec)
    if kind == "none":
        return None
    torch.manual_seed(seed)
    device = torch.device(device)
    options: dict[str, Any] = {"dtype": "auto"}
    if spec.endswith(BF16):
        options = {"dtype": torch.bfloat16, "channels_last": True}
    if kind in ("wan", "wan-narrow"):
        from sfvideo.nn.wan_vae import WanVAECodec

        with torch.device(device):
            vae = _wan_vae(kind, int(arg), channels)
        return WanVAECodec(vae.eval(), device=device, **options)
    from sfvideo.nn.taehv import TAEHV, TAEHVCodec

    if kind == "taehv" and arg is not None:
        return TAEHVCodec(arg, device=device, **options)
    with torch.device(device):
        model = TAEHV(_taehv_config(kind, arg, channels))
    return TAEHVCodec(model=model, device=device, **options)


def describe_decoder(spec: str, codec: Any) -> dict[str, Any]:
    """A label (what the decoder is) and its parameter counts."""
    kind, arg = parse_decoder_spec(spec)
    if codec is None:
        return {"spec": spec, "label": "none (transformer only)", "params": 0, "decoder_params": 0}
    if kind in ("wan", "wan-narrow"):
        module, decoder = codec.vae, codec.vae.decoder
        real = " = the Wan2.1 VAE" if kind == "wan" and int(arg) == 96 else ""
        what = (f"Wan2.1 VAE architecture, base width {arg}{real}" if kind == "wan"
                else f"narrow Wan-VAE variant (width {arg}, 1 resblock per stage; not the Wan2.1 architecture)")
    else:
        module, decoder = codec.model, codec.model.decoder
        what = ("TAEHV, taew2_1 layout" if kind == "taehv" else f"narrow TAEHV (width {arg}; not taew2_1)")
    weights = f"weights {arg}" if kind == "taehv" and arg else "random weights"
    layout = ", channels-last" if codec.channels_last else ""
    return {"spec": spec, "label": f"{what}, {weights}, {str(codec.dtype).removeprefix('torch.')}{layout}",
            "params": sum(p.numel() for p in module.parameters()),
            "decoder_params": sum(p.numel() for p in decoder.parameters())}


def decoder_flops_per_latent_frame(spec: str, channels: int, geo: VideoGeometry) -> float | None:
    """FLOPs of one steady-state latent frame (after a stream's first), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    kind, arg = parse_decoder_spec(spec)
    if kind == "none":
        return None
    if kind in ("wan", "wan-narrow"):
        from sfvideo.nn.wan_vae import WanVAECodec

        with torch.device("meta"):
            vae = _wan_vae(kind, int(arg), channels)
        codec = WanVAECodec(vae, dtype=None, device="meta", channels_last=False)
    else:
        from sfvideo.nn.taehv import TAEHV, TAEHVCodec

        with torch.device("meta"):
            model = TAEHV(_taehv_config(kind, arg, channels))
        codec = TAEHVCodec(model=model, dtype=None, device="meta", channels_last=False)
    decoder = codec.stream_decoder()
    z = torch.zeros(1, 2, channels, geo.height, geo.width, device="meta")
    decoder.decode_chunk(z[:, :1])
    with FlopCounterMode(display=False) as counter:
        decoder.decode_chunk(z[:, 1:])
    return float(counter.get_total_flops())


# ------------------------------------------------------------------ building
class FixedEmbeddings:
    """A ``TextEncoder`` that returns the same (random) prompt embeddings for every prompt: no text model runs."""

    def __init__(self, context: torch.Tensor) -> None:
        self.context = context
        self.text_len, self.dim = context.shape[1], context.shape[2]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.context.expand(len(prompts), -1, -1)


_ENGINES: dict[tuple, InferenceEngine] = {}


def engine_for(model, geo: VideoGeometry, context: torch.Tensor, schedule: StepSchedule, codec=None,
               graphs: StepGraphs | None = None) -> InferenceEngine:
    """The inference engine of ``model`` at geometry ``geo`` (the random embeddings as its only prompt), one per
    combination during a benchmark: its decode threads, warmed up once, serve every later run."""
    key = (id(model), geo, id(context), schedule, id(codec), id(graphs))
    if key not in _ENGINES:
        settings = InferenceSettings(geometry=geo, schedule=schedule)
        _ENGINES[key] = InferenceEngine(model, text_encoder=FixedEmbeddings(context), settings=settings,
                                        decoder=codec, step_graphs=graphs if graphs is not None else False)
    return _ENGINES[key]


def build_transformer(cfg: BenchConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """Our random-weight transformer and random prompt embeddings."""
    from sfvideo.nn.precision import cast_model
    from sfvideo.nn.wan import WanTransformer

    device, dtype = torch.device(cfg.device), parse_dtype(cfg.dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer(**cfg.arch)
    model = cast_model(model, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, cfg.text_len, model.config.text_dim, generator=g).to(device=device, dtype=dtype)
    return model, context


def diffusers_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' ``WanTransformer3DModel`` with our config and our weights, key for key."""
    from diffusers import WanTransformer3DModel

    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    device, dtype = model_device(model), compute_dtype(model)
    with torch.device(device):
        ref = WanTransformer3DModel(**cfg)
    ref.load_state_dict(model.state_dict(), strict=True)
    # Same precision as ours (bf16 on GPU), cast whole as `pipe.to(torch.bfloat16)` users do: diffusers' forward
    # feeds its time projection in the activation dtype, so partial fp32 islands would not run. (The parameters
    # directly: ModelMixin.to(dtype) warns about the islands.)
    ref.to(device)
    for q in ref.parameters():
        q.data = q.data.to(dtype)
    return ref.eval().requires_grad_(False)


@torch.no_grad()
def forward_parity(model: torch.nn.Module, ref: torch.nn.Module, geo: VideoGeometry, context: torch.Tensor) -> float:
    """Max |ours - diffusers| of one bidirectional forward on the same input (checks the 1:1 weight mapping)."""
    device, dtype = model_device(model), compute_dtype(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(geo.latent_shape(1, min(geo.num_frames, 2 * geo.frames_per_chunk)), generator=g)
    x = x.to(device=device, dtype=dtype)
    t = torch.full((1,), 700.0, device=device)
    ours = model(x, t, context, attention="bidirectional")
    theirs = ref(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t, encoder_hidden_states=context,
                 return_dict=False)[0].permute(0, 2, 1, 3, 4)
    return float((ours.float() - theirs.float()).abs().max())


# ------------------------------------------------------------------ FLOPs of the schedules
def stream_calls(num_frames: int, f: int, steps: int, capacity: int, window: int | None,
                 sink: int = 0) -> list[tuple[int, int]]:
    """``(chunk index, visible cached frames)`` of every forward of a rolling stream, in the engine's order (per
    chunk: the previous chunk's deferred refresh, then the chunk's steps; no refresh after the last chunk).

    The views come from the real cache's bookkeeping (``KVCache.begin_chunk`` without buffers), so they are the
    engine's by construction.
    """
    cache = KVCache(1, 1, 1, 1, 1, capacity, sink_frames=sink, window_frames=window)
    calls = []
    for k in range(num_frames // f):
        if k > 0:
            calls.append((k, len(cache.begin_chunk((k - 1) * f, f).view)))
        for _ in range(steps):
            calls.append((k, len(cache.begin_chunk(k * f, f).view)))
    return calls


def rolling_flops(config, geo: VideoGeometry, *, num_frames: int, window: int | None, sink: int, steps: int,
                  text_len: int) -> tuple[list[ForwardFlops], int]:
    """FLOPs of each call (per chunk index: its steps and the refresh before it) and the forward count."""
    f, tpf = geo.frames_per_chunk, geo.tokens_per_frame
    capacity = cache_capacity(num_frames, window, sink)
    per_chunk = [ZERO] * (num_frames // f)
    calls = stream_calls(num_frames, f, steps, capacity, window, sink)
    for i, (k, visible) in enumerate(calls):
        per_chunk[k] = per_chunk[k] + wan_forward_flops(config, frames=f, key_frames=visible + f,
                                                        tokens_per_frame=tpf, text_tokens=text_len,
                                                        text_cached=i > 0)
    return per_chunk, len(calls)


def recompute_flops(config, geo: VideoGeometry, *, num_frames: int, window: int, steps: int,
                    text_len: int) -> ForwardFlops:
    """FLOPs of :func:`run_recompute`: per chunk a context forward over ``min(start, window - f)`` frames on a
    fresh cache (text K/V computed again), then the chunk's steps against it."""
    f, tpf = geo.frames_per_chunk, geo.tokens_per_frame
    total = ZERO
    for start in range(0, num_frames, f):
        n_ctx = min(start, window - f)
        if n_ctx:
            total = total + wan_forward_flops(config, frames=n_ctx, tokens_per_frame=tpf, text_tokens=text_len)
        for j in range(steps):
            total = total + wan_forward_flops(config, frames=f, key_frames=n_ctx + f, tokens_per_frame=tpf,
                                              text_tokens=text_len, text_cached=n_ctx > 0 or j > 0)
    return total


# ------------------------------------------------------------------ runs
class _ForwardCounter:
    """Counts the model's forwards (a pre-hook; graph replays bypass it, so only meaningful without graphs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> int:
        self.handle.remove()
        return self.count


def run_stream(model, geo: VideoGeometry, context, *, num_frames: int, schedule: StepSchedule, codec=None,
               window=None, sink: int = 0, seed: int = 0, overlap: bool | None = None,
               graphs: StepGraphs | None = None) -> dict[str, Any]:
    """One sfvideo streaming run (a ``GenerationSession``): its ``StreamStats``, the per-call breakdown, forwards
    and FLOPs."""
    engine = engine_for(model, geo, context, schedule, codec, graphs)
    counter = _ForwardCounter(model)
    try:
        with engine.session(num_frames=num_frames, window_frames=window, sink_frames=sink, decode=codec is not None,
                            overlap_decode=overlap) as session:
            session.start("", seed=seed)
            sync_device(engine.device)
            session.stats.start_time = time.perf_counter()
            items = [(item.chunk.transformer_s, item.frames.shape[1] if item.frames is not None else 0)
                     for item in session]
            stats, resolved_window = session.stats, session.window_frames
            overlapped = session.overlap_decode
    finally:
        counted = counter.close()
    out = stats.as_dict()
    out["overlap"] = overlapped
    out["window_frames"] = resolved_window
    out["breakdown"] = stats.breakdown()
    out["per_call"] = [t.as_dict() for t in stats.timings]
    out["per_chunk_transformer_s"] = [t for t, _ in items]
    out["first_chunk_pixel_frames"] = items[0][1] if items else 0
    flops, forwards = rolling_flops(model.config, geo, num_frames=num_frames, window=resolved_window, sink=sink,
                                    steps=len(schedule.denoising_steps), text_len=context.shape[1])
    out["forwards"] = forwards
    out["forwards_counted"] = counted if graphs is None or not graphs.enabled else None
    total = sum(flops, ZERO)
    out["transformer_flops"] = {"linear": total.linear, "attention": total.attention, "total": total.total}
    out["transformer_flops_per_s"] = total.total / stats.transformer_s if stats.transformer_s > 0 else None
    return out


def run_recompute(model, geo: VideoGeometry, context, *, num_frames: int, schedule: StepSchedule, window: int,
                  seed: int = 0) -> dict[str, Any]:
    """CausVid-style sliding window: per chunk a fresh cache filled by one forward over the last ``window - f``
    clean frames (t = 0), then the chunk's few denoising steps; no rolling state is reused."""
    from sfvideo.diffusion.rollout import generate_latents

    engine = engine_for(model, geo, context, schedule)
    f = geo.frames_per_chunk
    noise, g = engine.noise(1, num_frames, seed)
    step_sigmas = schedule.generator_sigmas().to(engine.device)
    clean: list[torch.Tensor] = []
    per_chunk = []
    sync_device(engine.device)
    t_all = time.perf_counter()
    with torch.no_grad():
        for start in range(0, num_frames, f):
            t0 = time.perf_counter()
            ctx_frames = torch.cat(clean, 1)[:, -(window - f):] if clean else None
            n_ctx = 0 if ctx_frames is None else ctx_frames.shape[1]
            cache = stream_cache(model, geo, 1, n_ctx + f)
            if ctx_frames is not None:
                engine.denoiser(ctx_frames, torch.zeros(1, n_ctx, device=engine.device), context, kv_cache=cache,
                                start_frame=0, attention="block_causal", frames_per_chunk=n_ctx)
            x = generate_latents(engine.denoiser, noise[:, start : start + f], context, step_sigmas=step_sigmas,
                                 frames_per_chunk=f, kv_cache=cache, noise_generator=g, start_frame=n_ctx,
                                 refresh_last=False)
            clean.append(x)
            sync_device(engine.device)
            per_chunk.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    return {"transformer_s": total, "latent_frames": num_frames, "per_chunk_transformer_s": per_chunk,
            "fps": num_frames / total}


def run_diffusers(ref, codec, context, cfg: BenchConfig, geo: VideoGeometry, seed: int = 0,
                  steps: int | None = None, decode: bool = True) -> dict[str, Any]:
    """diffusers' WanPipeline: ``steps`` bidirectional steps with CFG, then a full VAE decode (``codec``'s VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=codec.vae if codec is not None else None,
                       transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.schedule.shift))
    pipe.set_progress_bar_config(disable=True)
    device = context.device
    stride = codec.spatial_stride if codec is not None else 8
    pixel_frames = 1 + 4 * (geo.num_frames - 1)
    g = torch.Generator(device=device).manual_seed(seed)
    sync_device(device)
    t0 = time.perf_counter()
    latents = pipe(prompt_embeds=context, negative_prompt_embeds=torch.zeros_like(context),
                   height=geo.height * stride, width=geo.width * stride, num_frames=pixel_frames,
                   num_inference_steps=steps or cfg.baseline_steps, guidance_scale=cfg.guidance_scale,
                   generator=g, output_type="latent", return_dict=False)[0]
    sync_device(device)
    t1 = time.perf_counter()
    out = {"transformer_s": t1 - t0, "latent_frames": latents.shape[2], "steps": steps or cfg.baseline_steps,
           "guidance_scale": cfg.guidance_scale, "forwards": 2 * (steps or cfg.baseline_steps)}
    if not decode or codec is None:
        out.update(pixel_frames=pixel_frames, total_s=t1 - t0, first_frame_s=t1 - t0, decode_s=0.0,
                   fps=pixel_frames / (t1 - t0), transformer_fps=pixel_frames / (t1 - t0))
        return out
    with torch.no_grad():
        video = codec.vae.decode(latents.to(codec.dtype)).sample
    sync_device(device)
    t2 = time.perf_counter()
    n = video.shape[2]
    out.update(decode_s=t2 - t1, total_s=t2 - t0, pixel_frames=n, first_frame_s=t2 - t0, fps=n / (t2 - t0),
               transformer_fps=n / (t1 - t0))
    return out


# ------------------------------------------------------------------ GPU features
def attention_report(model) -> dict[str, Any]:
    """The attention kernel of the cached path: the flash-attn package, or SDPA and whether its flash kernel runs
    for this model's heads (probed)."""
    from sfvideo.nn.attention import flash_available, resolve_backend

    device, dtype = model_device(model), compute_dtype(model)
    backend = resolve_backend(getattr(model, "attention_backend", "auto"), device, dtype, masked=False)
    report: dict[str, Any] = {"backend": backend}
    if backend == "flash":
        import flash_attn

        report["flash_attn"] = getattr(flash_attn, "__version__", "?")
        report["flash"] = "on (flash-attn package)"
        return report
    report["flash_attn"] = "not installed" if not flash_available() else "installed, not used"
    if device.type != "cuda":
        report["flash"] = "off (not CUDA)"
        return report
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    q = torch.randn(1, heads, 128, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        report["flash"] = "on (SDPA's flash kernel is eligible and preferred for unmasked half-precision attention)"
    except RuntimeError as e:
        report["flash"] = f"off (SDPA's flash kernel refused: {str(e).splitlines()[0][:200]})"
    return report


def attention_kernels(run: Callable[[], Any]) -> list[str]:
    """CUDA kernels with 'flash', 'fmha', 'attention' or 'sdpa' in their names that ``run()`` launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(w in n.lower() for w in ("flash", "fmha", "attention", "sdpa")))[:8]


# ------------------------------------------------------------------ the benchmark
class _Clock:
    """The time budget: ``allows(what)`` is False (and notes what was skipped) once the budget is spent."""

    def __init__(self, budget: float | None, log) -> None:
        self.t0, self.budget, self.log = time.perf_counter(), budget, log
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if self.budget is None or time.perf_counter() - self.t0 < self.budget:
            return True
        self.skipped.append(what)
        self.log(f"time budget {self.budget:.0f} s spent: skipping {what}")
        return False


def _overlap_modes(cfg: BenchConfig, spec: str) -> list[bool | None]:
    if parse_decoder_spec(spec)[0] == "none":
        return [None]
    return {"on": [True], "off": [False], "both": [True, False], "auto": [None]}[cfg.overlap]


def bench_generate(cfg: BenchConfig, *, seed: int = 0, log=print,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every section of ``cfg``; returns the JSON-ready results (``progress`` gets them after each section)."""
    try:
        return _bench_generate(cfg, seed=seed, log=log, progress=progress or (lambda r: None))
    finally:
        _ENGINES.clear()


def _bench_generate(cfg: BenchConfig, *, seed: int, log, progress) -> dict[str, Any]:
    geo = cfg.geometry
    clock = _Clock(cfg.time_budget_s, log)
    errors: list[str] = []

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or with ``keep_going`` None after recording its error."""
        if not cfg.keep_going:
            return fn()
        try:
            return fn()
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            log(f"{what} failed: {errors[-1]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    model, context = build_transformer(cfg, seed)
    schedule = cfg.schedule
    device = torch.device(cfg.device)
    features: dict[str, Any] = {"compile": "off", "cuda_graphs": "off"}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the VAE's 3-D convolutions: autotuned in the warm-up
        features["cudnn_benchmark"] = "on"
    features["attention"] = attention_report(model)
    graphs = None
    if cfg.cuda_graphs and cfg.graph_kind == "eager":
        from sfvideo.inference.graphs import EagerGraph

        graphs = StepGraphs(model, graph_factory=EagerGraph)
    elif cfg.cuda_graphs and device.type == "cuda":
        graphs = StepGraphs(model)
    elif cfg.cuda_graphs:
        features["cuda_graphs"] = "off (needs CUDA)"
    if cfg.compile:
        try:
            compile_blocks(model)
            features["compile"] = "on"
        except Exception as e:  # compile is an optimisation: report and go on
            features["compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {
        "config": {**asdict(cfg), "geometry": asdict(geo), "long_geometry": asdict(cfg.long_geometry)},
        "model": {"flavor": cfg.flavor, "params": n_params, "layers": model.config.num_layers,
                  "dim": model.config.num_attention_heads * model.config.attention_head_dim,
                  "tokens_per_frame": geo.tokens_per_frame, "latent": [geo.height, geo.width],
                  "pixels": [geo.height * 8, geo.width * 8], "latent_frames": geo.num_frames,
                  "pixel_frames": 1 + 4 * (geo.num_frames - 1)},
        "features": features,
        "errors": errors,
        "skipped": clock.skipped,
    }
    peak = device_peak_tflops(torch.cuda.get_device_name(), compute_dtype(model)) if device.type == "cuda" else None
    results["device_peak_tflops"] = peak

    # Warm-up: a training-length stream reaches every cache layout (compiles, captures the graphs).
    log("warm-up (transformer) ...")
    try:
        for _ in range(2 if graphs is not None else 1):
            run_stream(model, geo, context, num_frames=geo.num_frames, schedule=schedule, graphs=graphs)
    except Exception as e:
        if not cfg.compile:
            raise
        # torch.compile fails lazily (at the first call): report it and measure eager.
        log(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); running eager")
        uncompile_blocks(model)
        features["compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        run_stream(model, geo, context, num_frames=geo.num_frames, schedule=schedule, graphs=graphs)
    if graphs is not None:
        features["cuda_graphs"] = graphs.status + (" (EagerGraph stand-in)" if cfg.graph_kind == "eager" else "")
        features["cuda_graph_counts"] = dict(graphs.counts)
    if device.type == "cuda":  # which attention kernels one eager chunk launches (graph replays hide them)
        engine = engine_for(model, geo, context, schedule)
        features["attention_kernels"] = attempt("attention kernels", lambda: attention_kernels(
            lambda: engine.generate("", num_frames=geo.frames_per_chunk)))

    codecs: dict[str, Any] = {}
    decoders: dict[str, Any] = {}
    for spec in dict.fromkeys((*cfg.decoders, cfg.baseline_decoder)):
        codec = attempt(f"decoder {spec}", lambda: build_decoder(spec, geo.channels, device, seed))
        if codec is None and parse_decoder_spec(spec)[0] != "none":
            continue  # recorded in errors (keep_going)
        codecs[spec] = codec
        info = describe_decoder(spec, codec)
        flops = decoder_flops_per_latent_frame(spec, geo.channels, geo)
        info["gflop_per_latent_frame"] = flops / 1e9 if flops is not None else None
        decoders[spec] = info
    results["decoders"] = decoders
    progress(results)

    # 1. streaming, per decoder and overlap mode
    rows: list[dict[str, Any]] = []
    transformer_only: dict[str, Any] | None = None
    if "streaming" in cfg.sections:
        for spec in (s for s in cfg.decoders if s in codecs):
            codec = codecs[spec]
            gflop = decoders[spec]["gflop_per_latent_frame"] or 0.0
            limit = cfg.decoder_warmup_max_gflop
            warm = codec is not None and (limit is None or gflop * geo.frames_per_chunk <= limit)
            for overlap in _overlap_modes(cfg, spec) if warm else ():  # the main thread and the decode thread
                if clock.allows(f"decoder warm-up {spec}"):
                    log(f"warm-up ({spec}, overlap {overlap}) ...")
                    attempt(f"warm-up {spec}", lambda: run_stream(
                        model, geo, context, num_frames=geo.frames_per_chunk, schedule=schedule, codec=codec,
                        graphs=graphs, overlap=overlap))
            for overlap in _overlap_modes(cfg, spec):
                label = f"{spec}, overlap {'-' if overlap is None else 'on' if overlap else 'off'}"
                if not clock.allows(f"streaming {label}"):
                    continue
                log(f"streaming: {label} ...")
                row = attempt(f"streaming {label}", lambda: run_stream(
                    model, geo, context, num_frames=geo.num_frames, schedule=schedule, codec=codec, seed=seed,
                    overlap=overlap, graphs=graphs))
                if row is None:
                    continue
                row["decoder"] = spec
                if codec is None:
                    # Pixel frames the same latents decode to, per second (the paper counts pixel frames).
                    row["pixel_frames_equivalent"] = 1 + 4 * (geo.num_frames - 1)
                    row["fps"] = row["pixel_frames_equivalent"] / row["wall_s"]
                    transformer_only = row
                else:
                    gflop = decoders[spec]["gflop_per_latent_frame"]
                    row["decoder_flops_per_s"] = gflop * 1e9 * geo.num_frames / row["decode_s"] if gflop else None
                if peak is not None and row["transformer_flops_per_s"]:
                    row["transformer_peak_fraction"] = row["transformer_flops_per_s"] / (peak * 1e12)
                rows.append(row)
                progress({**results, "streaming": rows})
        for row in rows:  # the decode bound, from the transformer-only row of the same run
            if row["decoder"] != "none" and transformer_only is not None:
                row["bound"] = decode_bound(transformer_only, row)
    results["streaming"] = rows

    progress(results)

    # 2. diffusers' WanPipeline, same weights, the baseline decoder
    if "diffusers" in cfg.sections and cfg.baseline_decoder in codecs and clock.allows("diffusers"):
        attempt("diffusers", lambda: _diffusers_section(results, model, codecs[cfg.baseline_decoder], context, cfg,
                                                        geo, seed, rows, transformer_only, log))
        progress(results)

    # ablation: the transformer with CUDA graphs off, then (if compiled) fully eager
    if cfg.ablation:
        compiled = features["compile"] == "on"
        runs = ([f"compile {'on' if compiled else 'off'}, CUDA graphs off"] if graphs is not None else []) + (
            ["eager (compile off, CUDA graphs off)"] if compiled else [])
        ablation = []
        for name in runs:
            if not clock.allows(f"ablation {name}"):
                continue
            if name.startswith("eager"):
                uncompile_blocks(model)
            log(f"ablation: {name} ...")

            def run_twice() -> dict[str, Any]:
                run_stream(model, geo, context, num_frames=geo.num_frames, schedule=schedule)  # warm-up
                return run_stream(model, geo, context, num_frames=geo.num_frames, schedule=schedule, seed=seed)

            row = attempt(f"ablation {name}", run_twice)
            if row is not None:
                ablation.append({"name": name, "first_chunk_s": row["first_chunk_s"], "wall_s": row["wall_s"],
                                 "fps": (1 + 4 * (geo.num_frames - 1)) / row["wall_s"],
                                 "transformer_flops_per_s": row["transformer_flops_per_s"]})
        results["ablation"] = ablation
        if compiled:
            compile_blocks(model)  # back on for the long sections
        progress(results)

    long_geo = cfg.long_geometry
    train = geo.num_frames
    # 3. rolling vs recompute (graphs off on both sides: the recompute's fresh caches have no fixed layout)
    if "rolling" in cfg.sections and clock.allows("rolling vs recompute"):
        attempt("rolling vs recompute", lambda: _rolling_section(results, model, long_geo, context, cfg, seed, clock,
                                                                 log))
        progress(results)

    # 4. per-chunk time: the window fill, then per_chunk_chunks chunks with the window full
    if "per_chunk" in cfg.sections and clock.allows("per-chunk"):
        f = long_geo.frames_per_chunk
        fill = train // f  # chunk k sees min(k f, window - f) frames; its call also refreshes chunk k - 1
        n = (fill + cfg.per_chunk_chunks) * f
        log(f"per-chunk time over {fill} + {cfg.per_chunk_chunks} chunks ...")
        roll = attempt("per-chunk", lambda: run_stream(model, long_geo, context, num_frames=n, schedule=schedule,
                                                       window=train, seed=seed, graphs=graphs))
        if roll is not None:
            results["per_chunk"] = flatness(roll["per_chunk_transformer_s"], fill, window=train,
                                            latent=[long_geo.height, long_geo.width])
            results["per_chunk"]["cuda_graphs"] = graphs.status if graphs is not None else "off"
    if graphs is not None:
        features["cuda_graph_counts"] = dict(graphs.counts)
    return results


def _diffusers_section(results, model, codec, context, cfg: BenchConfig, geo: VideoGeometry, seed: int,
                       rows: list[dict[str, Any]], transformer_only: dict[str, Any] | None, log) -> None:
    """diffusers' WanPipeline on our weights (their parity), its full decode, the ratios to every streaming row."""
    ref = diffusers_transformer(model)
    section: dict[str, Any] = {"parity_max_abs": forward_parity(model, ref, geo, context),
                               "decoder": cfg.baseline_decoder}
    log("diffusers WanPipeline warm-up ...")
    run_diffusers(ref, codec, context, cfg, geo, seed, steps=1, decode=False)
    log(f"diffusers WanPipeline, {cfg.baseline_steps} steps with CFG, decode with {cfg.baseline_decoder} ...")
    base = run_diffusers(ref, codec, context, cfg, geo, seed)
    section["run"] = base
    section["ratios"] = [
        {"decoder": r["decoder"], "overlap": r["overlap"],
         "throughput_ratio": r["fps"] / base["fps"], "latency_ratio": base["first_frame_s"] / r["first_chunk_s"]}
        for r in rows
    ]
    if transformer_only is not None:  # the generation algorithms alone (no decoder on either side)
        section["transformer_throughput_ratio"] = base["transformer_s"] / transformer_only["transformer_s"]
        section["transformer_latency_ratio"] = base["transformer_s"] / transformer_only["first_chunk_s"]
    results["diffusers"] = section


def _rolling_section(results, model, long_geo: VideoGeometry, context, cfg: BenchConfig, seed: int, clock: _Clock,
                     log) -> None:
    """Rolling cache vs recomputing the window, at each multiple of the training length, with the FLOP bounds."""
    schedule, train = cfg.schedule, cfg.train_frames
    steps, text_len = len(schedule.denoising_steps), context.shape[1]
    run_stream(model, long_geo, context, num_frames=train, schedule=schedule)  # warm-up at this size
    rolling: dict[str, Any] = {}
    results["rolling_vs_recompute"] = rolling
    for mult in cfg.long_multiples:
        n = mult * train
        if not clock.allows(f"rolling vs recompute {mult}x"):
            continue
        log(f"rolling vs recompute at {mult}x ({n} latent frames) ...")
        roll = run_stream(model, long_geo, context, num_frames=n, schedule=schedule, window=train, seed=seed)
        rec = run_recompute(model, long_geo, context, num_frames=n, schedule=schedule, window=train, seed=seed)
        rolling_fl = sum(rolling_flops(model.config, long_geo, num_frames=n, window=train, sink=0, steps=steps,
                                       text_len=text_len)[0], ZERO)
        recompute_fl = recompute_flops(model.config, long_geo, num_frames=n, window=train, steps=steps,
                                       text_len=text_len)
        rolling[f"{mult}x"] = {
            "latent_frames": n,
            "latent_size": [long_geo.height, long_geo.width],
            "rolling_s": roll["transformer_s"],
            "recompute_s": rec["transformer_s"],
            "speedup": rec["transformer_s"] / roll["transformer_s"],
            "flop_bound": recompute_fl.total / rolling_fl.total,
            "linear_bound": recompute_fl.linear / rolling_fl.linear,
            "attention_bound": recompute_fl.attention / rolling_fl.attention,
            "rolling_flops": rolling_fl.total,
            "recompute_flops": recompute_fl.total,
            "rolling_mean_chunk_s": statistics.fmean(roll["per_chunk_transformer_s"]),
            "recompute_mean_chunk_s": statistics.fmean(rec["per_chunk_transformer_s"]),
        }


def decode_bound(transformer_only: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The best an overlap can do per chunk, ``max(transformer, decode)`` (transformer from the transformer-only
    run, decode from this run), against serial ``transformer + decode``, as FPS, and this row's share of it."""
    chunks = row["chunks"]
    t = transformer_only["transformer_s"] / chunks
    d = row["decode_s"] / chunks
    frames = row["pixel_frames"]
    bound_fps = frames / (chunks * max(t, d))
    return {"transformer_per_chunk_s": t, "decode_per_chunk_s": d, "bound_fps": bound_fps,
            "serial_fps": frames / (chunks * (t + d)), "fraction_of_bound": row["fps"] / bound_fps}


def flatness(times: list[float], fill: int, *, window: int, latent: list[int], block: int = 8) -> dict[str, Any]:
    """Per-chunk times after the window is full (``times[fill:]``): medians of the first and last ``block``
    chunks, the spread of medians over consecutive blocks, and the largest deviation from the median."""
    fill_times, steady = times[:fill], times[fill:]
    out: dict[str, Any] = {"chunks": len(times), "fill_chunks": fill, "steady_chunks": len(steady),
                           "window_frames": window, "latent_size": latent, "per_chunk_s": times,
                           "fill_s": fill_times}
    if not steady:
        return out
    k = max(1, min(block, len(steady) // 2))
    med = statistics.median(steady)
    blocks = [statistics.median(steady[i : i + k]) for i in range(0, len(steady) - k + 1, k)]
    out.update(steady_median_s=med, first_median_s=statistics.median(steady[:k]),
               last_median_s=statistics.median(steady[-k:]),
               last_first_ratio=statistics.median(steady[-k:]) / statistics.median(steady[:k]),
               block_medians_s=blocks, block_spread=max(blocks) / min(blocks) - 1,
               max_deviation=max(abs(t - med) for t in steady) / med)
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU's model and the instruction sets oneDNN's kernels depend on (timings differ across them: bf16 is
    fast only with AMX or AVX512-BF16)."""
    info: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    family = f"(family {fields['cpu family']}, model {fields.get('model', '?')})" if "cpu family" in fields else ""
    info["cpu"] = " ".join(filter(None, (fields.get("model name"), family)))
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    return info


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, **cpu_info()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------ printing
def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _overlap(row: dict[str, Any]) -> str:
    return "-" if row["decoder"] == "none" or row["overlap"] is None else "on" if row["overlap"] else "off"


@dataclass(frozen=True)
class ReportTable:
    """One table of a bench report: what ``print_table`` shows in the terminal and ``markdown_report`` in docs."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def report(results: dict[str, Any]) -> list[str | ReportTable]:
    """The report of a bench result (the JSON ``sfvideo bench generate`` writes) as lines and tables, in order.

    One formatting for the terminal (``print_table``) and for docs (``markdown_report``, ``sfvideo bench report
    FILE --markdown``), so the tables in docs/benchmarks.md are generated from the JSON, not copied by hand.
    """
    out: list[str | ReportTable] = []
    model, feats, machine = results.get("model", {}), results.get("features", {}), results.get("machine", {})
    isa = "; ".join(filter(None, (machine.get("cpu_capability"), " ".join(machine.get("cpu_flags", []))))) or (
        "instruction set not recorded")
    out.append(f"{results.get('preset', '')}: {model.get('flavor')} transformer "
               f"({model.get('params', 0) / 1e6:.2f}M params, {model.get('layers')} layers), latent "
               f"{'x'.join(map(str, model.get('latent', [])))} = {'x'.join(map(str, model.get('pixels', [])))} "
               f"pixels, {model.get('latent_frames')} latent = {model.get('pixel_frames')} pixel frames; "
               f"machine {machine.get('gpu') or machine.get('cpu') or machine.get('processor') or '?'} ({isa}), "
               f"{machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} torch threads, torch "
               f"{machine.get('torch')}; {results.get('date')}; `{results.get('command')}`")
    attention = feats.get("attention", {})
    out.append(f"torch.compile {feats.get('compile')} | CUDA graphs {feats.get('cuda_graphs')} | flash attention "
               f"{attention.get('flash')} (flash-attn package: {attention.get('flash_attn')})")
    for spec, d in results.get("decoders", {}).items():
        out.append(f"decoder {spec}: {d['label']}, {d['decoder_params'] / 1e6:.3g}M decoder params, "
                   f"{_s(d['gflop_per_latent_frame'], 1)} GFLOP per latent frame")
    rows = results.get("streaming", [])
    if rows:
        out.append(ReportTable(
            "Streaming (sfvideo engine): first-chunk latency and throughput",
            ("decoder", "overlap", "first chunk (s)", "total (s)", "FPS", "transformer (s)", "decode (s)",
             "bound FPS", "of bound"),
            tuple((r["decoder"], _overlap(r), _s(r["first_chunk_s"], 3), _s(r["wall_s"]), _s(r["fps"], 1),
                   _s(r["transformer_s"]), _s(r["decode_s"]), _s((r.get("bound") or {}).get("bound_fps"), 1),
                   _s((r.get("bound") or {}).get("fraction_of_bound"), 2)) for r in rows)))
        peak = results.get("device_peak_tflops")

        def where(r: dict[str, Any]) -> tuple[str, ...]:
            b, n = r["breakdown"], max(1, r["chunks"])
            frac, dec = r.get("transformer_peak_fraction"), r.get("decoder_flops_per_s")
            return (r["decoder"], _overlap(r), *(_s(1e3 * b[k] / n, 1) for k in (
                "wall_s", "denoise_s", "refresh_s", "decode_s", "decode_wait_s", "host_s")),
                _s(r["forwards"] / n, 1), _s((r["transformer_flops_per_s"] or 0) / 1e12, 4),
                *([_s(100 * frac, 1) if frac else "-"] if peak else []), _s(dec / 1e12 if dec else None, 4))

        out.append(ReportTable(
            "Where the time goes: mean per chunk (ms), forwards per chunk, achieved FLOP/s",
            ("decoder", "overlap", "call", "denoise", "refresh", "decode", "waited", "host", "forwards",
             "transformer TFLOP/s", *(["% of peak"] if peak else []), "decoder TFLOP/s"),
            tuple(where(r) for r in rows)))
    d = results.get("diffusers")
    if d:
        run = d["run"]
        out.append(ReportTable(
            f"vs diffusers WanPipeline ({run['steps']} steps, CFG {run['guidance_scale']}, decode with "
            f"{d['decoder']}): first frame {run['first_frame_s']:.2f} s, {run['fps']:.3f} FPS (transformer "
            f"{run['transformer_s']:.1f} s, decode {run['decode_s']:.1f} s)",
            ("sfvideo decoder", "overlap", "throughput ratio", "first-frame latency ratio"),
            tuple((r["decoder"], _overlap(r), f"{r['throughput_ratio']:.1f}x", f"{r['latency_ratio']:.1f}x")
                  for r in d["ratios"])))
        if "transformer_throughput_ratio" in d:
            out.append(f"transformer only: throughput {d['transformer_throughput_ratio']:.1f}x, latency "
                       f"{d['transformer_latency_ratio']:.1f}x (paper, H100: 22x, 149x end to end); weight "
                       f"parity max |diff| {d['parity_max_abs']:.2e}")
    if results.get("ablation"):
        out.append(ReportTable(
            "Transformer only: the effect of each speed-up", ("configuration", "first chunk (s)", "FPS", "TFLOP/s"),
            tuple((r["name"], _s(r["first_chunk_s"], 3), _s(r["fps"], 1),
                   _s((r["transformer_flops_per_s"] or 0) / 1e12, 3)) for r in results["ablation"])))
    if results.get("rolling_vs_recompute"):
        rv = results["rolling_vs_recompute"]
        size = "x".join(map(str, next(iter(rv.values()))["latent_size"]))
        out.append(ReportTable(
            f"Rolling KV cache vs recomputing the window every chunk (transformer only, latent {size})",
            ("length", "latent frames", "rolling (s)", "recompute (s)", "speed-up", "FLOP bound", "linear-FLOP bound"),
            tuple((k, str(r["latent_frames"]), _s(r["rolling_s"]), _s(r["recompute_s"]), f"{r['speedup']:.2f}x",
                   f"{r['flop_bound']:.2f}x", f"{r['linear_bound']:.2f}x") for k, r in rv.items())))
    p = results.get("per_chunk")
    if p and "steady_median_s" in p:
        out.append(f"per-chunk time, {p['steady_chunks']} chunks after the window fill ({p['fill_chunks']} "
                   f"chunks): median {p['steady_median_s'] * 1e3:.1f} ms, last/first {p['last_first_ratio']:.3f}, "
                   f"spread of {len(p['block_medians_s'])} block medians {100 * p['block_spread']:.1f}%, max "
                   f"deviation {100 * p['max_deviation']:.1f}%; fill: "
                   + ", ".join(f"{x * 1e3:.0f}" for x in p["fill_s"]) + " ms")
    if results.get("skipped"):
        out.append(f"skipped (time budget): {', '.join(results['skipped'])}")
    if results.get("errors"):
        out.append(f"errors: {results['errors']}")
    if results.get("partial"):
        out.append("partial result: the run was interrupted or is still running")
    return out


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=140)
    for item in report(results):
        if isinstance(item, str):
            console.print(escape(item))
            continue
        t = Table(title=escape(item.title))
        for col in item.columns:
            t.add_column(escape(col), justify="right")
        for row in item.rows:
            t.add_row(*map(escape, row))
        console.print(t)


def markdown_report(results: dict[str, Any]) -> str:
    """The report as Markdown: lines as paragraphs, tables as pipe tables (numeric columns right-aligned)."""
    parts = []
    for item in report(results):
        if isinstance(item, str):
            parts.append(item)
            continue
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = [f"**{item.title}**", "", "| " + " | ".join(map(cell, item.columns)) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(item.columns))) + "|"]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in item.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    from sfvideo.errors import ArgParser

    p = ArgParser(prog=PROG, description="Benchmarks: print tables and write JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="Streaming generation benchmarks (see sfvideo.bench).",
                       description=__doc__.split("\n\n")[0])
    g.add_argument("--out", "--json", dest="out", default="bench.json", help="JSON output file.")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="Named configuration (default toy).")
    g.add_argument("--quick", action="store_true", help="The quick preset (tiny sizes; seconds).")
    g.add_argument("--gpu", action="store_true", help="The gpu preset (Wan2.1-1.3B architecture, 832x480, bf16).")
    g.add_argument("--decoders", default=None, help="Comma-separated decoder specs, e.g. none,taehv,wan:96.")
    g.add_argument("--baseline_decoder", default=None, help="diffusers' VAE spec (e.g. wan:96).")
    g.add_argument("--overlap", choices=("on", "off", "both", "auto"), default=None)
    g.add_argument("--sections", default=None, help="Comma-separated: streaming,diffusers,rolling,per_chunk.")
    g.add_argument("--with_diffusers", action="store_true", help="Add the diffusers section (off in the gpu preset).")
    g.add_argument("--no_compile", action="store_true", help="No torch.compile.")
    g.add_argument("--no_cuda_graphs", action="store_true", help="No CUDA graphs.")
    g.add_argument("--no_ablation", action="store_true", help="Skip the GPU ablation runs.")
    g.add_argument("--time_budget", type=float, default=None, help="Seconds after which remaining runs are skipped.")
    g.add_argument("--flavor", default=None, help="Transformer size (debug, toy, mid, 1.3B, 14B).")
    g.add_argument("--latent_height", type=int, default=None)
    g.add_argument("--latent_width", type=int, default=None)
    g.add_argument("--long_latent_height", type=int, default=None, help="Latent height of the long-video sections.")
    g.add_argument("--long_latent_width", type=int, default=None)
    g.add_argument("--train_frames", type=int, default=None, help="Latent frames of the training clip.")
    g.add_argument("--frames_per_chunk", type=int, default=None)
    g.add_argument("--baseline_steps", type=int, default=None, help="diffusers steps (default 50).")
    g.add_argument("--chunks", type=int, default=None, help="Chunks after the window fill in the per-chunk section.")
    g.add_argument("--multiples", default=None, help="Comma-separated lengths of the rolling section (e.g. 4,8).")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="Print the tables of a saved bench JSON (Markdown with --markdown).",
                       description="Print the tables of a JSON written by `sfvideo bench generate`; --markdown "
                                   "gives the pipe tables that docs/benchmarks.md quotes.")
    r.add_argument("json", help="A JSON file written by `sfvideo bench generate`.")
    r.add_argument("--markdown", action="store_true", help="Markdown instead of terminal tables.")
    return p


def _report_main(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.json)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{PROG} report: error: {path}: no such file")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{PROG} report: error: {path}: not JSON ({e})")
    if not isinstance(results, dict) or "config" not in results:
        raise SystemExit(f"{PROG} report: error: {path}: not a result of `sfvideo bench generate` (no 'config' key)")
    try:
        if args.markdown:
            print(markdown_report(results), end="")
        else:
            print_table(results)
    except (KeyError, TypeError) as e:
        raise SystemExit(f"{PROG} report: error: {path}: malformed bench result (missing or bad {e})")
    return results


def config_from_args(args: argparse.Namespace) -> tuple[str, BenchConfig]:
    """The preset named by the flags, with the flags' overrides (raises ValueError on bad values)."""
    name = "gpu" if args.gpu else "quick" if args.quick else args.preset or "toy"
    cfg = PRESETS[name]
    names = ("flavor", "latent_height", "latent_width", "long_latent_height", "long_latent_width", "train_frames",
             "frames_per_chunk", "baseline_steps", "overlap", "baseline_decoder", "threads")
    overrides: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.chunks is not None:
        overrides["per_chunk_chunks"] = args.chunks
    if args.decoders is not None:
        overrides["decoders"] = tuple(s.strip() for s in args.decoders.split(",") if s.strip())
    if args.sections is not None:
        overrides["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    if args.multiples is not None:
        overrides["long_multiples"] = tuple(int(m) for m in args.multiples.split(","))
    if args.with_diffusers and "diffusers" not in overrides.get("sections", cfg.sections):
        overrides["sections"] = (*overrides.get("sections", cfg.sections), "diffusers")
    if args.no_compile:
        overrides["compile"] = False
    if args.no_cuda_graphs:
        overrides["cuda_graphs"] = False
    if args.no_ablation:
        overrides["ablation"] = False
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget
    cfg = replace(cfg, **overrides)
    cfg.long_geometry  # noqa: B018 (validates both geometries)
    return name, cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report_main(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SystemExit(f"{PROG}: error: --out {out}: folder {out.parent} does not exist")
    try:
        name, cfg = config_from_args(args)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"{PROG}: error: {e}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG} generate --preset {name} needs a CUDA GPU (none found); run without --gpu for the CPU "
              "benchmark.")
        raise SystemExit(0)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(name, cfg, argv, args, out)
    finally:
        torch.set_num_threads(threads)


def _run(name: str, cfg: BenchConfig, argv: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    geo = cfg.geometry
    header: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "sfvideo bench " + " ".join(argv),
        "preset": name,
        "machine": machine_info(cfg.device),
        "note": (f"latent {geo.height}x{geo.width}, {geo.num_frames} latent frames, chunks of "
                 f"{geo.frames_per_chunk}; random weights; timings are wall-clock, device synchronised"),
    }
    log = (lambda *a: print(*a, file=sys.stderr)) if name != "quick" else (lambda *a: None)
    t0 = time.perf_counter()

    def write(body: dict[str, Any], partial: bool) -> dict[str, Any]:
        results = {**header, **body, "wall_s": time.perf_counter() - t0, "partial": partial}
        with AtomicFile(out) as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=_json_default))
        return results

    # What is measured so far is on disk after every section (a one-shot GPU session keeps it if killed).
    results = write(bench_generate(cfg, seed=args.seed, log=log, progress=lambda r: write(r, True)), False)
    print_table(results)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return float(value)


if __name__ == "__main__":
    main()
