"""Time and profile the streaming decoders (Wan VAE, TAEHV) at one size, random weights; results in docs/benchmarks.md.

    python scripts/profile_decoders.py --height 240 --width 416 --variants wan,taehv --profile

Each variant decodes one stream: a first chunk of ``--first`` latent frames, then ``--chunk`` latent frames (the
steady state; timed, repeated ``--repeats`` times with fresh streams, variants interleaved). Reported per variant:
wall and CPU seconds of the steady-state chunk (with one thread, the thread's CPU time is far less sensitive to
other jobs on a shared machine than wall time), pixel frames per second, model FLOPs of the chunk (counted once on
the meta device) and the achieved GFLOP/s. ``--profile`` adds the torch.profiler op table of one steady-state
chunk, grouped into convolutions, normalisation/activation elementwise ops and copies.

Variants: ``wan`` (the Wan2.1 VAE architecture, diffusers' ``AutoencoderKLWan()`` defaults, random weights, through
``WanVAECodec.stream_decoder()``) or ``taehv`` (``taew2_1`` layout), with options joined by ``+``: ``bf16``, ``cl``
(channels-last), ``fpc=N`` (latent frames per decoder call; ``fpc=0`` = the whole chunk). Weight values do not
change the time of these networks (no data-dependent control flow), so random weights time the real decoders.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import UTC, datetime

import torch
from torch.utils.flop_counter import FlopCounterMode

CATEGORIES = {
    "convolution": ("conv", "mkldnn_convolution", "slow_conv", "_slow_conv", "_convolution"),
    "norm/activation/residual": ("linalg_vector_norm", "div", "mul", "add", "silu", "clamp", "relu", "tanh",
                                 "expand"),
    "copies (cat/pad/clone/fill)": ("cat", "copy_", "fill_", "constant_pad_nd", "clone", "zero_"),
    "upsample": ("upsample",),
}


def build(variant: str, seed: int):
    name, *opts = variant.split("+")
    kw = dict(o.split("=") if "=" in o else (o, "1") for o in opts)
    dtype = torch.bfloat16 if "bf16" in kw else torch.float32
    fpc = int(kw["fpc"]) if "fpc" in kw else None
    torch.manual_seed(seed)
    if name == "wan":
        from diffusers import AutoencoderKLWan

        from sfvideo.nn.wan_vae import WanVAECodec

        extra = {} if fpc is None else {"frames_per_call": fpc or 1 << 20}  # 0: the whole chunk
        if "cl" in kw:
            extra["channels_last"] = True
        return WanVAECodec(AutoencoderKLWan(), dtype=dtype, **extra)
    if name == "taehv":
        from sfvideo.nn.taehv import TAEHV, TAEHVCodec

        return TAEHVCodec(model=TAEHV(), dtype=dtype, frames_per_call=fpc or None, channels_last="cl" in kw)
    raise SystemExit(f"unknown decoder {name!r} in variant {variant!r} (wan or taehv)")


def count_flops(codec, latents: torch.Tensor, first: int) -> float:
    """Model FLOPs of the steady-state chunk, on meta copies of the model (no compute)."""
    meta = copy.copy(codec)
    if hasattr(codec, "vae"):
        meta.vae = copy.deepcopy(codec.vae).to("meta")
        meta._stats_on = {}
    else:
        meta.model = copy.deepcopy(codec.model).to("meta")
    dec = meta.stream_decoder()
    z = latents.to("meta")
    dec.decode_chunk(z[:, :first])
    with FlopCounterMode(display=False) as fc:
        dec.decode_chunk(z[:, first:])
    return float(fc.get_total_flops())


def categorise(prof) -> dict[str, float]:
    out = {k: 0.0 for k in CATEGORIES} | {"other": 0.0}
    for ev in prof.key_averages():
        key = ev.key.removeprefix("aten::")
        cat = next((c for c, names in CATEGORIES.items() if any(key.startswith(n) for n in names)), "other")
        out[cat] += ev.self_cpu_time_total / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--first", type=int, default=1, help="latent frames of the stream's first (untimed) chunk")
    p.add_argument("--chunk", type=int, default=3, help="latent frames of the timed steady-state chunk")
    p.add_argument("--variants", default="wan,taehv")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one steady-state chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.process_time
    variants = args.variants.split(",")
    codecs = {v: build(v, args.seed) for v in variants}
    g = torch.Generator().manual_seed(args.seed)
    results: dict[str, dict] = {}
    for v, codec in codecs.items():
        s = codec.spatial_stride
        shape = (1, args.first + args.chunk, codec.latent_channels, args.height // s, args.width // s)
        results[v] = {"latents": torch.randn(shape, generator=g), "wall_s": [], "cpu_s": []}
        results[v]["gflop"] = count_flops(codec, results[v]["latents"], args.first) / 1e9
    for rep in range(args.repeats):
        for v, codec in codecs.items():
            r, dec = results[v], codecs[v].stream_decoder()
            dec.decode_chunk(r["latents"][:, : args.first])
            w, c = time.perf_counter(), clock()
            frames = dec.decode_chunk(r["latents"][:, args.first :])
            r["cpu_s"].append(clock() - c)
            r["wall_s"].append(time.perf_counter() - w)
            r["pixel_frames"], r["frame_shape"] = frames.shape[1], list(frames.shape[2:])
            print(f"repeat {rep} {v}: {r['wall_s'][-1]:.2f} s wall, {r['cpu_s'][-1]:.2f} s CPU", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for v, codec in codecs.items():
            r, dec = results[v], codec.stream_decoder()
            dec.decode_chunk(r["latents"][:, : args.first])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                dec.decode_chunk(r["latents"][:, args.first :])
            r["profile_s"] = categorise(prof)
            print(f"\n{v}: torch.profiler, one steady-state chunk")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))

    print(f"\n{args.height}x{args.width}, steady-state chunk of {args.chunk} latent frames, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print(f"{'variant':<22}{'wall s':>9}{'CPU s':>9}{'frames':>8}{'fps (CPU)':>11}{'GFLOP':>9}{'GFLOP/s':>9}")
    for v, r in results.items():
        cpu = min(r["cpu_s"])
        r |= {"best_wall_s": min(r["wall_s"]), "best_cpu_s": cpu, "fps_cpu": r["pixel_frames"] / cpu,
              "gflop_per_s": r["gflop"] / cpu}
        print(f"{v:<22}{r['best_wall_s']:>9.2f}{cpu:>9.2f}{r['pixel_frames']:>8}{r['fps_cpu']:>11.2f}"
              f"{r['gflop']:>9.0f}{r['gflop_per_s']:>9.1f}")
        if "profile_s" in r:
            total = sum(r["profile_s"].values())
            print("    " + ", ".join(f"{k} {t / total:.0%}" for k, t in r["profile_s"].items()))
    if args.out:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "date": datetime.now(UTC).isoformat(timespec="minutes"), "args": vars(args),
                "median_cpu_s": {v: statistics.median(r["cpu_s"]) for v, r in results.items()}}
        with open(args.out, "w") as f:
            json.dump(meta | {"results": {v: {k: x for k, x in r.items() if k != "latents"}
                                          for v, r in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
