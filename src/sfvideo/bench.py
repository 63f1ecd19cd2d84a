"""``sfvideo bench generate``: streaming generation benchmarks, printed as a table and written as JSON.

Run side by side on the same architecture, resolution and length (random weights; nothing is downloaded):

1. ``vs_diffusers``: sfvideo streaming (few steps, KV cache, chunk by chunk, streaming VAE decode) against diffusers'
   ``WanPipeline`` (bidirectional, 50 steps, classifier-free guidance) driving a ``WanTransformer3DModel`` that holds
   *our* weights 1:1 (identical state-dict keys; the parity of one forward is reported), the same tiny random Wan
   VAE, and prompt embeddings passed in (no text encoder). Ratios: throughput (FPS) and first-frame latency; the
   paper reports 22x and 149x for Self Forcing vs Wan2.1 on one H100.
2. ``rolling_vs_recompute``: our rolling KV cache against recomputing the context window for every chunk
   (CausVid-style sliding window: a fresh cache, one forward over the last ``window - f`` clean frames at t = 0,
   then the chunk's denoising steps) at 4x and 8x the training length.
3. ``per_chunk``: transformer time of each chunk over a long rolling stream (64 chunks): flat with a rolling cache
   (``last_first_ratio`` near 1).
4. ``gpu`` (``--gpu``, CUDA only): the full Wan2.1-1.3B architecture, bf16, 832x480 (latent 60x104), 81 frames (21
   latent), flash-attn and torch.compile where available; FPS and first-chunk latency with and without VAE decode
   (the Wan2.1 VAE architecture, random weights).

Timings are wall-clock with the device synchronised around each region; the first run of every configuration is a
warm-up and is not reported. CPU sizes default to a ~1-2 minute run on a 2-core machine (``--quick``: seconds).
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sfvideo.config import InferenceSettings, StepSchedule
from sfvideo.files import AtomicFile
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine, stream_cache, sync_device
from sfvideo.nn.precision import compute_dtype, model_device, parse_dtype

PROG = "sfvideo bench"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run."""

    flavor: str = "toy"
    """Transformer size (``sfvideo.nn.wan.FLAVORS``)."""
    latent_height: int = 8
    latent_width: int = 8
    train_frames: int = 21
    """Latent frames of the training clip (the bidirectional baseline generates exactly this)."""
    frames_per_chunk: int = 3
    text_len: int = 32
    """Tokens of the (random) prompt embeddings."""
    schedule: StepSchedule = field(default_factory=StepSchedule)
    """Our few-step list and shift (the generator's defaults)."""
    baseline_steps: int = 50
    """diffusers' denoising steps."""
    guidance_scale: float = 5.0
    """diffusers' CFG scale (two forwards per step)."""
    long_multiples: tuple[int, ...] = (4, 8)
    """Lengths of the rolling-vs-recompute comparison, in training lengths."""
    long_latent_height: int = 16
    long_latent_width: int = 16
    """Latent size of the long-video sections (no VAE there, so larger: the attention over the context, not
    per-call overhead, should dominate as it does at full resolution)."""
    per_chunk_chunks: int = 64
    vae_base_dim: int = 8
    """Width of the random Wan VAE (96 = the real Wan2.1 VAE)."""
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    with_diffusers: bool = True

    @property
    def geometry(self) -> VideoGeometry:
        from sfvideo.nn.wan import FLAVORS

        return VideoGeometry(
            num_frames=self.train_frames,
            channels=FLAVORS[self.flavor]["in_channels"],
            height=self.latent_height,
            width=self.latent_width,
            frames_per_chunk=self.frames_per_chunk,
        )

    @property
    def long_geometry(self) -> VideoGeometry:
        return replace(self.geometry, height=self.long_latent_height, width=self.long_latent_width)


QUICK = BenchConfig(flavor="debug", latent_height=8, latent_width=8, train_frames=6, frames_per_chunk=2, text_len=8,
                    baseline_steps=50, per_chunk_chunks=12, long_multiples=(2, 4), long_latent_height=8,
                    long_latent_width=8)
GPU = BenchConfig(flavor="1.3B", latent_height=60, latent_width=104, long_latent_height=60, long_latent_width=104,
                  train_frames=21, frames_per_chunk=3,
                  text_len=512, per_chunk_chunks=64, vae_base_dim=96, dtype="bfloat16", device="cuda", compile=True,
                  with_diffusers=False)


# ------------------------------------------------------------------ building
class FixedEmbeddings:
    """A ``TextEncoder`` that returns the same (random) prompt embeddings for every prompt: no text model runs."""

    def __init__(self, context: torch.Tensor) -> None:
        self.context = context
        self.text_len, self.dim = context.shape[1], context.shape[2]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.context.expand(len(prompts), -1, -1)


def engine_for(model, geo: VideoGeometry, context: torch.Tensor, schedule: StepSchedule, codec=None):
    """The inference engine of ``model`` at geometry ``geo`` (the random embeddings as its only prompt)."""
    settings = InferenceSettings(geometry=geo, schedule=schedule)
    return InferenceEngine(model, text_encoder=FixedEmbeddings(context), settings=settings, decoder=codec)


def build_models(cfg: BenchConfig, seed: int = 0) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """Our random-weight transformer, a random Wan VAE (as a codec) and random prompt embeddings."""
    from diffusers import AutoencoderKLWan

    from sfvideo.nn.precision import cast_model
    from sfvideo.nn.wan import WanTransformer
    from sfvideo.nn.wan_vae import WanVAECodec

    device, dtype = torch.device(cfg.device), parse_dtype(cfg.dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer.from_flavor(cfg.flavor)
    model = cast_model(model, dtype).eval().requires_grad_(False)
    z = model.config.in_channels
    vae = AutoencoderKLWan(
        base_dim=cfg.vae_base_dim, z_dim=z, dim_mult=[1, 2, 4, 4] if cfg.vae_base_dim >= 96 else [1, 1, 1, 1],
        num_res_blocks=2 if cfg.vae_base_dim >= 96 else 1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    codec = WanVAECodec(vae, dtype=None if dtype == torch.float32 else dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, cfg.text_len, model.config.text_dim, generator=g).to(device=device, dtype=dtype)
    return model, codec, context


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


# ------------------------------------------------------------------ runs
def run_stream(model, geo: VideoGeometry, context, *, num_frames: int, schedule: StepSchedule, codec=None,
               window=None, sink: int = 0, seed: int = 0) -> dict[str, Any]:
    """One sfvideo streaming run (a ``GenerationSession``); returns its ``StreamStats`` plus per-chunk times."""
    engine = engine_for(model, geo, context, schedule, codec)
    session = engine.session(num_frames=num_frames, window_frames=window, sink_frames=sink,
                             decode=codec is not None)
    session.start("", seed=seed)
    sync_device(engine.device)
    session.stats.start_time = time.perf_counter()
    first_chunk_transformer = None
    for item in session:
        first_chunk_transformer = first_chunk_transformer or item.chunk.transformer_s
    out = session.stats.as_dict()
    out["first_chunk_transformer_s"] = first_chunk_transformer
    out["per_chunk_transformer_s"] = list(session.stats.per_chunk_s) if codec is None else None
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
    """diffusers' WanPipeline: ``steps`` bidirectional steps with CFG, then a full VAE decode."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=codec.vae, transformer=ref,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.schedule.shift))
    pipe.set_progress_bar_config(disable=True)
    device = context.device
    s = codec.spatial_stride
    pixel_frames = codec.num_pixel_frames(geo.num_frames)
    g = torch.Generator(device=device).manual_seed(seed)
    sync_device(device)
    t0 = time.perf_counter()
    latents = pipe(prompt_embeds=context, negative_prompt_embeds=torch.zeros_like(context),
                   height=geo.height * s, width=geo.width * s, num_frames=pixel_frames,
                   num_inference_steps=steps or cfg.baseline_steps, guidance_scale=cfg.guidance_scale,
                   generator=g, output_type="latent", return_dict=False)[0]
    sync_device(device)
    t1 = time.perf_counter()
    if not decode:
        return {"transformer_s": t1 - t0}
    with torch.no_grad():
        video = codec.vae.decode(latents.to(codec.dtype)).sample
    sync_device(device)
    t2 = time.perf_counter()
    n = video.shape[2]
    return {"transformer_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "pixel_frames": n,
            "latent_frames": latents.shape[2], "first_frame_s": t2 - t0, "fps": n / (t2 - t0),
            "transformer_fps": n / (t1 - t0), "steps": steps or cfg.baseline_steps,
            "guidance_scale": cfg.guidance_scale}


# ------------------------------------------------------------------ the benchmark
def bench_generate(cfg: BenchConfig, *, seed: int = 0, log=print) -> dict[str, Any]:
    """Run every section for ``cfg``; returns the JSON-ready results."""
    geo = cfg.geometry
    model, codec, context = build_models(cfg, seed)
    schedule = cfg.schedule
    if cfg.compile:
        model = _try_compile(model, log)
    results: dict[str, Any] = {"config": {**asdict(cfg), "geometry": asdict(geo),
                                          "long_geometry": asdict(cfg.long_geometry)}}
    results["config"]["attention_backend"] = _backend_name(model, cfg)
    train = geo.num_frames

    # 1. vs diffusers (or, on GPU without diffusers, just our numbers)
    log("warm-up ...")
    try:
        _warm_up(model, geo, context, schedule, codec)
    except Exception as e:
        if not cfg.compile:
            raise
        # torch.compile fails lazily (at the first call): report it and measure eager.
        log(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); running eager")
        for block in model.blocks:
            block._compiled_call_impl = None
        results["config"]["compile"] = False
        results["config"]["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
        _warm_up(model, geo, context, schedule, codec)
    ours = run_stream(model, geo, context, num_frames=train, schedule=schedule, codec=codec, seed=seed)
    ours_nodec = run_stream(model, geo, context, num_frames=train, schedule=schedule, seed=seed)
    # Pixel frames the same latents decode to, per transformer second (the paper counts pixel frames).
    ours_nodec["pixel_fps_equivalent"] = ours["pixel_frames"] / ours_nodec["transformer_s"]
    section: dict[str, Any] = {"sfvideo": ours, "sfvideo_no_decode": ours_nodec}
    if cfg.with_diffusers:
        ref = diffusers_transformer(model)
        section["parity_max_abs"] = forward_parity(model, ref, geo, context)
        log("diffusers WanPipeline warm-up ...")
        run_diffusers(ref, codec, context, cfg, geo, seed, steps=1, decode=False)
        log(f"diffusers WanPipeline, {cfg.baseline_steps} steps with CFG ...")
        base = run_diffusers(ref, codec, context, cfg, geo, seed)
        section["diffusers"] = base
        section["throughput_ratio"] = ours["fps"] / base["fps"]
        section["latency_ratio"] = base["first_frame_s"] / ours["first_chunk_s"]
        # Transformer only (no VAE on either side): the generation algorithms alone.
        section["transformer_throughput_ratio"] = base["transformer_s"] / ours_nodec["transformer_s"]
        section["transformer_latency_ratio"] = base["transformer_s"] / ours_nodec["first_chunk_s"]
        del ref
    results["vs_diffusers" if cfg.with_diffusers else "streaming"] = section

    # 2. rolling vs recompute
    geo = cfg.long_geometry
    run_stream(model, geo, context, num_frames=train, schedule=schedule)  # warm-up at this size
    rolling: dict[str, Any] = {}
    for mult in cfg.long_multiples:
        n = mult * train
        log(f"rolling vs recompute at {mult}x ({n} latent frames) ...")
        roll = run_stream(model, geo, context, num_frames=n, schedule=schedule, window=train, seed=seed)
        rec = run_recompute(model, geo, context, num_frames=n, schedule=schedule, window=train, seed=seed)
        rolling[f"{mult}x"] = {
            "latent_frames": n,
            "latent_size": [geo.height, geo.width],
            "rolling_s": roll["transformer_s"],
            "recompute_s": rec["transformer_s"],
            "speedup": rec["transformer_s"] / roll["transformer_s"],
            "rolling_mean_chunk_s": statistics.fmean(roll["per_chunk_transformer_s"]),
            "recompute_mean_chunk_s": statistics.fmean(rec["per_chunk_transformer_s"]),
        }
    results["rolling_vs_recompute"] = rolling

    # 3. per-chunk time over a long rolling stream
    n = cfg.per_chunk_chunks * geo.frames_per_chunk
    log(f"per-chunk time over {cfg.per_chunk_chunks} chunks ...")
    roll = run_stream(model, geo, context, num_frames=n, schedule=schedule, window=train, seed=seed)
    times = roll["per_chunk_transformer_s"]
    k = max(1, min(8, len(times) // 4))
    first = statistics.median(times[1 : 1 + k]) if len(times) > k else times[0]  # chunk 0 sees an empty cache
    last = statistics.median(times[-k:])
    results["per_chunk"] = {"chunks": len(times), "window_frames": train, "latent_size": [geo.height, geo.width],
                            "per_chunk_s": times,
                            "first_median_s": first, "last_median_s": last, "last_first_ratio": last / first}
    return results


def _warm_up(model, geo: VideoGeometry, context, schedule: StepSchedule, codec) -> None:
    """One training-length stream (every cache view size the timed runs meet) and one decoded chunk."""
    run_stream(model, geo, context, num_frames=geo.num_frames, schedule=schedule)
    run_stream(model, geo, context, num_frames=geo.frames_per_chunk, schedule=schedule, codec=codec)


def _backend_name(model, cfg: BenchConfig) -> str:
    from sfvideo.nn.attention import resolve_backend

    return resolve_backend(getattr(model, "attention_backend", "auto"), model_device(model), compute_dtype(model),
                           masked=False)


def _try_compile(model, log):
    """Compile each transformer block (the KV cache's python bookkeeping stays outside the graphs)."""
    try:
        for block in model.blocks:
            block.compile(dynamic=True)
    except Exception as e:  # compile is an optimisation: report and go on
        log(f"torch.compile unavailable ({type(e).__name__}: {e}); running eager")
    return model


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------ printing
def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sec = results.get("vs_diffusers") or results.get("streaming") or {}
    if sec:
        t = Table(title="Streaming generation vs diffusers WanPipeline (same weights, resolution, length)")
        for col in ("", "first frame (s)", "total (s)", "FPS", "transformer (s)", "decode (s)"):
            t.add_column(col, justify="right")
        o = sec["sfvideo"]
        t.add_row("sfvideo, 4 steps, KV cache", f"{o['first_chunk_s']:.3f}",
                  f"{o['transformer_s'] + o['decode_s']:.2f}", f"{o['fps']:.1f}", f"{o['transformer_s']:.2f}",
                  f"{o['decode_s']:.2f}")
        n = sec["sfvideo_no_decode"]
        t.add_row("sfvideo, no decode", f"{n['first_chunk_s']:.3f}", f"{n['transformer_s']:.2f}",
                  f"{n['pixel_fps_equivalent']:.1f}", f"{n['transformer_s']:.2f}", "-")
        if "diffusers" in sec:
            d = sec["diffusers"]
            t.add_row(f"diffusers, {d['steps']} steps, CFG", f"{d['first_frame_s']:.3f}", f"{d['total_s']:.2f}",
                      f"{d['fps']:.2f}", f"{d['transformer_s']:.2f}", f"{d['decode_s']:.2f}")
        console.print(t)
        if "diffusers" in sec:
            console.print(f"with VAE decode: throughput ratio {sec['throughput_ratio']:.1f}x, first-frame latency "
                          f"ratio {sec['latency_ratio']:.1f}x; transformer only: "
                          f"{sec['transformer_throughput_ratio']:.1f}x, {sec['transformer_latency_ratio']:.1f}x "
                          f"(paper, H100: 22x, 149x); weight parity max |diff| {sec['parity_max_abs']:.2e}")
    if "rolling_vs_recompute" in results:
        size = "x".join(map(str, next(iter(results["rolling_vs_recompute"].values()))["latent_size"]))
        t = Table(title=f"Rolling KV cache vs recomputing the window every chunk (transformer only, latent {size})")
        for col in ("length", "latent frames", "rolling (s)", "recompute (s)", "speed-up"):
            t.add_column(col, justify="right")
        for k, r in results["rolling_vs_recompute"].items():
            t.add_row(k, str(r["latent_frames"]), f"{r['rolling_s']:.2f}", f"{r['recompute_s']:.2f}",
                      f"{r['speedup']:.2f}x")
        console.print(t)
    if "per_chunk" in results:
        p = results["per_chunk"]
        console.print(f"per-chunk time over {p['chunks']} rolling chunks: first {p['first_median_s'] * 1e3:.1f} ms, "
                      f"last {p['last_median_s'] * 1e3:.1f} ms, last/first {p['last_first_ratio']:.2f}")
    if results.get("mode") == "gpu" and sec:
        gpu_name = results.get("machine", {}).get("gpu", "")
        geo = results["config"]["geometry"]
        t = Table(title=f"GPU {gpu_name}: {results['config']['flavor']} architecture, {results['config']['dtype']}, "
                        f"latent {geo['height']}x{geo['width']}, {geo['num_frames']} latent frames")
        for col in ("", "first chunk (s)", "FPS"):
            t.add_column(col, justify="right")
        t.add_row("with VAE decode", f"{sec['sfvideo']['first_chunk_s']:.3f}", f"{sec['sfvideo']['fps']:.2f}")
        t.add_row("transformer only", f"{sec['sfvideo_no_decode']['first_chunk_s']:.3f}",
                  f"{sec['sfvideo_no_decode']['pixel_fps_equivalent']:.2f}")
        console.print(t)


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Benchmarks: print a table and write JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="Streaming generation benchmarks (see sfvideo.bench).",
                       description=__doc__.split("\n\n")[0])
    g.add_argument("--out", default="bench.json", help="JSON output file.")
    g.add_argument("--quick", action="store_true", help="Tiny sizes (seconds; for tests and smoke runs).")
    g.add_argument("--gpu", action="store_true", help="Full Wan2.1-1.3B architecture on CUDA (bf16, 832x480).")
    g.add_argument("--with_diffusers", action="store_true", help="With --gpu: also run the 50-step diffusers baseline.")
    g.add_argument("--no_compile", action="store_true", help="With --gpu: no torch.compile.")
    g.add_argument("--flavor", default=None, help="Transformer size (debug, toy, 1.3B, 14B).")
    g.add_argument("--latent_height", type=int, default=None)
    g.add_argument("--latent_width", type=int, default=None)
    g.add_argument("--long_latent_height", type=int, default=None, help="Latent height of the long-video sections.")
    g.add_argument("--long_latent_width", type=int, default=None)
    g.add_argument("--train_frames", type=int, default=None, help="Latent frames of the training clip.")
    g.add_argument("--frames_per_chunk", type=int, default=None)
    g.add_argument("--baseline_steps", type=int, default=None, help="diffusers steps (default 50).")
    g.add_argument("--chunks", type=int, default=None, help="Chunks of the per-chunk section (default 64).")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    g.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SystemExit(f"{PROG}: error: --out {out}: folder {out.parent} does not exist")
    if args.gpu:
        if not torch.cuda.is_available():
            print(f"{PROG} generate --gpu needs a CUDA GPU (none found); run without --gpu for the CPU benchmark.")
            raise SystemExit(0)
        cfg = replace(GPU, with_diffusers=args.with_diffusers, compile=not args.no_compile)
    else:
        cfg = QUICK if args.quick else BenchConfig()
    names = ("flavor", "latent_height", "latent_width", "long_latent_height", "long_latent_width", "train_frames",
             "frames_per_chunk", "baseline_steps")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.chunks is not None:
        overrides["per_chunk_chunks"] = args.chunks
    try:
        cfg = replace(cfg, **overrides)
        geo = cfg.geometry
        cfg.long_geometry  # noqa: B018 (validates)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"{PROG}: error: {e}")
    command = "sfvideo bench " + " ".join(list(sys.argv[1:] if argv is None else argv))
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(cfg.device),
    }
    log = (lambda *a: print(*a, file=sys.stderr)) if not args.quick else (lambda *a: None)
    t0 = time.perf_counter()
    body = bench_generate(cfg, seed=args.seed, log=log)
    results["mode"] = "gpu" if args.gpu else ("quick" if args.quick else "cpu")
    results.update(body)
    results["wall_s"] = time.perf_counter() - t0
    results["note"] = (f"latent {geo.height}x{geo.width}, {geo.num_frames} latent frames, chunks of "
                       f"{geo.frames_per_chunk}; random weights; timings are wall-clock, device synchronised")
    with AtomicFile(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=float))
    print_table(results)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
