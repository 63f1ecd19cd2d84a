"""``sfvideo generate``: stream a video from a trained generator into an mp4, chunk by chunk.

Sources of the generator:

- a Lightning checkpoint of ``SelfForcingDMD`` (``*.ckpt``): architecture, geometry, step list, shift and context
  noise come from its hyper-parameters, weights from ``generator.*`` (or the EMA with ``--use_ema``);
- a diffusers folder, an original Wan2.1 file or a Self Forcing / CausVid ``.pt`` (anything
  ``sfvideo.nn.checkpoint.load_transformer`` reads): geometry and steps come from flags or ``--config``.

Each chunk is decoded by the codec's streaming decoder as soon as it is denoised and its frames are appended to
the mp4 at once; the file appears under its name only when finalised (Ctrl-C keeps the frames done). Lengths are
in *latent* frames (Wan: ``1 + 4 (F - 1)`` pixel frames); any multiple of the chunk size works, the KV cache rolls
past ``--window_frames`` (keeping ``--sink_frames``). ``--prompt_schedule "0:a red circle ...;42:a blue square ..."``
switches prompts at latent frames (chunk boundaries), re-caching the recent window under the new prompt.

Examples::

    sfvideo generate runs/toy/checkpoints/last.ckpt --prompt "a red circle moving left on a dark background"
    sfvideo generate last.ckpt --num_frames 84 --window_frames 12 --sink_frames 3 --prompt_schedule \\
        "0:a red circle moving left on a dark background;42:a blue square moving up on a light background"
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sfvideo.geometry import VideoGeometry

PROG = "sfvideo generate"


class GenerateError(ValueError):
    """A user error: printed as one line, no traceback."""


# ------------------------------------------------------------------ prompts
def parse_prompt_schedule(text: str) -> list[tuple[int, str]]:
    """``"0:text;42:text"`` -> ``[(0, "text"), (42, "text")]`` (latent frames)."""
    entries: list[tuple[int, str]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        frame, sep, prompt = part.partition(":")
        if not sep:
            raise GenerateError(f"--prompt_schedule entry {part.strip()!r} is not FRAME:PROMPT")
        try:
            start = int(frame.strip())
        except ValueError:
            raise GenerateError(f"--prompt_schedule entry {part.strip()!r}: {frame.strip()!r} is not a frame number")
        entries.append((start, prompt.strip()))
    if not entries:
        raise GenerateError("--prompt_schedule is empty")
    return entries


def read_prompts_file(path: str | os.PathLike, num_frames: int, frames_per_chunk: int) -> list[tuple[int, str]]:
    """A prompts file: ``FRAME: prompt`` lines, or plain lines spread evenly over the video (chunk-aligned)."""
    from sfvideo.data.prompts import read_prompt_file

    try:
        lines = read_prompt_file(path)
    except FileNotFoundError:
        raise GenerateError(f"--prompts_file not found: {path}")
    except ValueError as e:
        raise GenerateError(f"--prompts_file: {e}")
    framed = [ln.partition(":")[0].strip().isdigit() for ln in lines]
    if all(framed):
        return parse_prompt_schedule(";".join(lines))
    if any(framed):
        raise GenerateError(f"--prompts_file {path}: mixes FRAME:prompt lines and plain lines")
    num_chunks = num_frames // frames_per_chunk
    if len(lines) > num_chunks:
        raise GenerateError(f"--prompts_file {path}: {len(lines)} prompts for only {num_chunks} chunks")
    return [(i * num_chunks // len(lines) * frames_per_chunk, p) for i, p in enumerate(lines)]


def resolve_schedule(args: Any, num_frames: int, frames_per_chunk: int) -> list[tuple[int, str]]:
    """The prompt schedule from exactly one of ``--prompt``, ``--prompt_schedule``, ``--prompts_file``."""
    given = [n for n in ("prompt", "prompt_schedule", "prompts_file") if getattr(args, n) is not None]
    if len(given) != 1:
        raise GenerateError("give exactly one of --prompt, --prompt_schedule, --prompts_file")
    if args.prompt is not None:
        schedule = [(0, args.prompt.strip())]
    elif args.prompt_schedule is not None:
        schedule = parse_prompt_schedule(args.prompt_schedule)
    else:
        schedule = read_prompts_file(args.prompts_file, num_frames, frames_per_chunk)
    for frame, prompt in schedule:
        if not prompt:
            raise GenerateError(f"empty prompt (at latent frame {frame})")
    from sfvideo.streaming import check_context_schedule

    try:
        check_context_schedule(schedule, frames_per_chunk, num_frames)  # type: ignore[arg-type]
    except ValueError as e:
        raise GenerateError(str(e))
    return schedule


# ------------------------------------------------------------------ loading
@dataclass
class LoadedGenerator:
    """A generator ready to stream, with everything needed to drive it."""

    model: torch.nn.Module
    geometry: VideoGeometry
    step_sigmas: torch.Tensor
    context_sigma: float
    window_frames: int | None
    """The attention window the generator was trained with (None: global)."""
    source: str
    hparams: dict[str, Any]


def _torch_load(path: Path) -> Any:
    from sfvideo.geometry import VideoGeometry as _VG

    try:
        with torch.serialization.safe_globals([_VG]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        pass
    try:
        # Lightning checkpoints pickle hyper-parameters (dataclasses, callables); load like Lightning's resume does.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise GenerateError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _as_geometry(value: Any) -> VideoGeometry:
    if isinstance(value, VideoGeometry):
        return value
    if isinstance(value, Mapping) or hasattr(value, "__dict__"):
        d = dict(value if isinstance(value, Mapping) else vars(value))
        d = d.get("init_args", d)
        names = {f.name for f in fields(VideoGeometry)}
        d = {k: (tuple(v) if k == "patch_size" else v) for k, v in d.items() if k in names}
        return VideoGeometry(**d)
    raise GenerateError(f"checkpoint hyper-parameter 'geometry' has an unknown type {type(value).__name__}")


def _architecture(hp: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """An empty-weights WanTransformer of the checkpoint's architecture (the teacher's; generator = teacher arch)."""
    from sfvideo.nn.wan import FLAVORS, WanTransformer

    teacher = hp.get("teacher", "debug")
    overrides = dict(hp.get("teacher_overrides") or {})
    if teacher in FLAVORS:
        return WanTransformer.from_flavor(teacher, **overrides)
    from sfvideo.nn.checkpoint import CONFIG_NAME, _read_folder_config, infer_wan_config

    cfg: dict[str, Any] = {}
    tpath = Path(teacher)
    for folder in (tpath / "transformer", tpath):
        if (folder / CONFIG_NAME).exists():
            cfg = _read_folder_config(folder)
            break
    if not cfg:
        cfg = infer_wan_config(state_dict)
    accepted = set(WanTransformer.__init__.__code__.co_varnames)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in accepted}
    return WanTransformer(**cfg)


def load_lightning_checkpoint(path: Path, *, use_ema: bool = False) -> LoadedGenerator:
    """The generator of a ``SelfForcingDMD`` checkpoint (hyper-parameters + ``generator.*`` weights or the EMA)."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise GenerateError(f"{path} is not a Lightning checkpoint (no 'state_dict' / 'hyper_parameters')")
    hp = dict(ckpt["hyper_parameters"])
    prefix = "generator."
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not weights or "geometry" not in hp:
        raise GenerateError(f"{path} is not a SelfForcingDMD checkpoint (no 'generator.*' weights or no geometry)")
    if use_ema:
        # The EMA is per-rank state (``rank_local``); one-device and ZeRO-1/2 runs keep it whole in the .ckpt.
        ema = ((ckpt.get("rank_local") or {}).get("generator_ema") or {}).get("shadow")
        if not ema:
            raise GenerateError(f"--use_ema: {path} holds no EMA weights (training stopped before ema_start_step?)")
        weights = {**weights, **{k: v for k, v in ema.items()}}
    model = _architecture(hp, weights, path)
    _load_weights(model, weights, path)
    from sfvideo.diffusion.schedule import FlowMatchSchedule

    schedule = FlowMatchSchedule(shift=float(hp.get("shift", 5.0)))
    steps = list(hp.get("denoising_steps", [1000, 750, 500, 250]))
    return LoadedGenerator(
        model=model,
        geometry=_as_geometry(hp["geometry"]),
        step_sigmas=schedule.step_sigmas(steps, warp=bool(hp.get("warp_denoising_steps", True))),
        context_sigma=float(hp.get("context_noise", 0.0)) / schedule.num_train_timesteps,
        window_frames=hp.get("window_frames"),
        source=str(path),
        hparams=hp,
    )


def _load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    for k in sorted(expected.keys() & weights.keys()):
        if tuple(expected[k].shape) != tuple(weights[k].shape):
            raise GenerateError(
                f"{path}: weights do not match the architecture: '{k}' is {tuple(weights[k].shape)} in the "
                f"checkpoint, {tuple(expected[k].shape)} in the model"
            )
    if missing or unexpected:
        raise GenerateError(
            f"{path}: weights do not match the architecture ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    model.load_state_dict(weights, strict=True)


def load_generator(args: Any) -> LoadedGenerator:
    """Load from a Lightning checkpoint or any transformer source ``load_transformer`` understands."""
    path = Path(args.checkpoint)
    if not path.exists():
        raise GenerateError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".ckpt":
        loaded = load_lightning_checkpoint(path, use_ema=args.use_ema)
    else:
        from sfvideo.diffusion.schedule import FlowMatchSchedule
        from sfvideo.nn.checkpoint import CheckpointError, load_transformer

        try:
            model = load_transformer(path, key="generator_ema" if args.use_ema else None)
        except (CheckpointError, FileNotFoundError, KeyError) as e:
            raise GenerateError(f"cannot load a generator from {path}: {e}")
        cfg = getattr(model, "config", {})
        geometry = VideoGeometry(
            num_frames=args.train_frames,
            channels=int(cfg.get("in_channels", 16)),
            height=args.latent_height,
            width=args.latent_width,
            frames_per_chunk=args.frames_per_chunk or 3,
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        )
        schedule = FlowMatchSchedule(shift=args.shift)
        loaded = LoadedGenerator(
            model=model,
            geometry=geometry,
            step_sigmas=schedule.step_sigmas(args.denoising_steps, warp=args.warp_denoising_steps),
            context_sigma=args.context_noise / schedule.num_train_timesteps,
            window_frames=None,
            source=str(path),
            hparams={},
        )
    return loaded


def _import(class_path: str) -> Any:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise GenerateError(f"cannot import {class_path!r}")


SHORTHANDS = {
    "text_encoder": {"toy": "sfvideo.toy.encoders.ToyTextEncoder", "umt5": "sfvideo.nn.umt5.UMT5TextEncoder"},
    "codec": {"toy": "sfvideo.toy.encoders.ToyCodec", "wan": "sfvideo.nn.wan_vae.WanVAECodec"},
}


def _run_config_spec(checkpoint: Path, role: str) -> Any:
    """``model.init_args.<role>`` of the LightningCLI ``config.yaml`` saved with the run (if there is one)."""
    import yaml

    for cand in (checkpoint.parent / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if cand.is_file():
            try:
                cfg = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError:
                return None
            model = cfg.get("model") or {}
            return (model.get("init_args") or model).get(role)
    return None


def build_encoder(role: str, spec: str, args_json: str | None, checkpoint: Path, loaded: LoadedGenerator) -> Any:
    """Instantiate the text encoder / codec: ``none``, a shorthand, a class path, or ``auto``."""
    try:
        init_args = json.loads(args_json) if args_json else {}
    except json.JSONDecodeError as e:
        raise GenerateError(f"--{role}_args is not JSON: {e}")
    if not isinstance(init_args, dict):
        raise GenerateError(f"--{role}_args must be a JSON object, got {args_json!r}")
    if spec == "none":
        return None
    if spec == "auto":
        found = _run_config_spec(checkpoint, role) if checkpoint.is_file() else None
        if isinstance(found, Mapping) and "class_path" in found:
            return _import(found["class_path"])(**{**(found.get("init_args") or {}), **init_args})
        spec = "toy"  # the toy world's encoders are the default of SelfForcingDMD (and they need no weights)
    cls = _import(SHORTHANDS[role].get(spec, spec))
    try:
        return cls(**init_args)
    except Exception as e:
        raise GenerateError(f"--{role} {spec}: cannot build {cls.__name__}: {e}")


# ------------------------------------------------------------------ the command
def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options.")
    p.add_argument("checkpoint", type=str, help="Lightning .ckpt, diffusers folder, Wan file or Self Forcing .pt.")
    p.add_argument("--prompt", type=str | None, default=None, help="One prompt for the whole video.")
    p.add_argument("--prompt_schedule", type=str | None, default=None,
                   help='Prompts by latent frame: "0:text;42:text" (switches on chunk boundaries).')
    p.add_argument("--prompts_file", type=str | None, default=None,
                   help="File of FRAME:prompt lines, or plain lines spread evenly over the video.")
    p.add_argument("--output", "-o", type=str, default="video.mp4", help="Output mp4.")
    p.add_argument("--num_frames", type=int | None, default=None,
                   help="Latent frames to generate (default: the training clip), any multiple of the chunk size.")
    p.add_argument("--frames_per_chunk", type=int | None, default=None,
                   help="Override the chunk size (1 = frame-wise); default: the checkpoint's.")
    p.add_argument("--window_frames", type=int | None, default=None,
                   help="Rolling KV-cache window in latent frames (default: the training window, or the training "
                        "clip length when generating longer).")
    p.add_argument("--sink_frames", type=int, default=0, help="First frames kept in the cache forever.")
    p.add_argument("--no_recache", action="store_true", help="On a prompt switch reset only the cross-attention.")
    p.add_argument("--use_ema", action="store_true", help="Use the EMA weights of the generator.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str | None, default=None, help="float32/bfloat16/float16 (default: bf16 on CUDA).")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--contact_sheet", type=str | None, default=None,
                   help="PNG of frames over time (default: next to the mp4; 'none' to skip).")
    p.add_argument("--save_latents", type=str | None, default=None, help="Also save the latents (.pt).")
    p.add_argument("--text_encoder", type=str, default="auto",
                   help="auto (the run's config.yaml, else toy), toy, umt5, none, or a class path.")
    p.add_argument("--text_encoder_args", type=str | None, default=None, help="JSON init args of the text encoder.")
    p.add_argument("--codec", type=str, default="auto", help="auto, toy, wan, none, or a class path.")
    p.add_argument("--codec_args", type=str | None, default=None, help="JSON init args of the codec.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    g = p.add_argument_group("Non-Lightning sources (diffusers folder, Wan or Self Forcing file)")
    g.add_argument("--latent_height", type=int, default=60)
    g.add_argument("--latent_width", type=int, default=104)
    g.add_argument("--train_frames", type=int, default=21, help="Latent frames of the training clip.")
    g.add_argument("--denoising_steps", type=list[int], default=[1000, 750, 500, 250])
    g.add_argument("--warp_denoising_steps", type=bool, default=True)
    g.add_argument("--shift", type=float, default=5.0)
    g.add_argument("--context_noise", type=float, default=0.0)
    return p


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters to ``dtype`` except the class's fp32 islands (``_keep_in_fp32_modules``), as diffusers does."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():
        if p.is_floating_point():
            want = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            p.data = p.data.to(want)
    return model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name!r} is not a device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available")
    return dev


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise GenerateError(f"--dtype {name!r}: expected one of {', '.join(table)}")
    return table[name]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``sfvideo generate``. Returns the statistics (also printed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except GenerateError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None


def _check_output(path: Path, suffix: str = ".mp4") -> None:
    if path.suffix.lower() != suffix:
        raise GenerateError(f"--output {path}: expected a {suffix} file name")
    if path.is_dir():
        raise GenerateError(f"--output {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GenerateError(f"--output {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GenerateError(f"--output {path}: not writable")


def run(args: Any) -> dict[str, Any]:
    from rich.console import Console

    from sfvideo.diffusion.denoiser import Denoiser
    from sfvideo.streaming import StreamStats, decode_stream, stream
    from sfvideo.video import Mp4Writer, save_contact_sheet

    console = Console(stderr=True, quiet=args.quiet)
    out = Path(args.output)
    _check_output(out)
    # Cheap checks first: prompts without a model need only the length, validated again once geometry is known.
    for name in ("prompt", "prompts_file"):
        value = getattr(args, name)
        if name == "prompt" and value is not None and not value.strip():
            raise GenerateError("--prompt is empty")
        if name == "prompts_file" and value is not None and not Path(value).is_file():
            raise GenerateError(f"--prompts_file not found: {value}")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    checkpoint = Path(args.checkpoint)

    t_load = time.perf_counter()
    loaded = load_generator(args)
    geo = loaded.geometry
    f = args.frames_per_chunk or geo.frames_per_chunk
    if f <= 0:
        raise GenerateError(f"--frames_per_chunk must be positive, got {f}")
    num_frames = args.num_frames if args.num_frames is not None else geo.num_frames
    if num_frames <= 0 or num_frames % f:
        raise GenerateError(
            f"--num_frames={num_frames} is not a positive multiple of the chunk size {f} latent frames "
            f"(nearest: {max(f, num_frames // f * f)})"
        )
    schedule_text = resolve_schedule(args, num_frames, f)
    window = args.window_frames if args.window_frames is not None else loaded.window_frames
    if window is None and num_frames > geo.num_frames:
        window = geo.num_frames  # beyond the training clip: roll over the training length
    if window is not None and (window < f or window % f):
        raise GenerateError(f"--window_frames={window} must be a positive multiple of the chunk size {f}")
    if args.sink_frames < 0 or args.sink_frames % f:
        raise GenerateError(f"--sink_frames={args.sink_frames} must be a non-negative multiple of the chunk size {f}")

    text_encoder = build_encoder("text_encoder", args.text_encoder, args.text_encoder_args, checkpoint, loaded)
    if text_encoder is None:
        raise GenerateError("--text_encoder none: a text encoder is needed to encode the prompts")
    codec = build_encoder("codec", args.codec, args.codec_args, checkpoint, loaded)
    if codec is None and not args.save_latents:
        raise GenerateError("--codec none writes no video: give --save_latents PATH")
    model_cfg = getattr(loaded.model, "config", None)
    text_dim = model_cfg.get("text_dim") if hasattr(model_cfg, "get") else None
    if text_dim is not None and getattr(text_encoder, "dim", text_dim) != text_dim:
        raise GenerateError(
            f"text encoder {type(text_encoder).__name__} gives {text_encoder.dim}-dim embeddings but the generator "
            f"expects text_dim={text_dim} (choose --text_encoder)"
        )
    if codec is not None and getattr(codec, "latent_channels", geo.channels) != geo.channels:
        raise GenerateError(
            f"codec {type(codec).__name__} has {codec.latent_channels} latent channels, the generator "
            f"{geo.channels} (choose --codec)"
        )
    model = cast_model(loaded.model, dtype).to(device).eval()
    load_s = time.perf_counter() - t_load

    with torch.no_grad():
        t_text = time.perf_counter()
        contexts = []
        for frame, prompt in schedule_text:
            try:
                emb = text_encoder.encode([prompt])
            except ValueError as e:  # e.g. a word outside the toy vocabulary
                raise GenerateError(f"prompt at latent frame {frame}: {e}")
            contexts.append((frame, emb.to(device=device, dtype=dtype)))
        text_s = time.perf_counter() - t_text

    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn(geo.latent_shape(1, num_frames), generator=gen, device=device, dtype=dtype)
    capacity = num_frames if window is None else min(num_frames, window + args.sink_frames)
    cache = model.new_kv_cache(1, geo.tokens_per_frame, capacity, sink_frames=args.sink_frames,
                               window_frames=window, dtype=dtype, device=device)
    denoiser = Denoiser(model)
    chunks = stream(denoiser, noise, contexts, step_sigmas=loaded.step_sigmas.to(device), frames_per_chunk=f,
                    kv_cache=cache, noise_generator=gen, context_sigma=loaded.context_sigma,
                    recache_on_switch=not args.no_recache,
                    synchronize=device.type == "cuda")
    console.print(f"[bold]{PROG}[/]: {loaded.source} -> {out} | {num_frames} latent frames in chunks of {f}, "
                  f"window {window or 'global'}, sink {args.sink_frames}, {len(contexts)} prompt(s), {device} "
                  f"{str(dtype).removeprefix('torch.')}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stats = StreamStats()
    latents_all: list[torch.Tensor] = []
    frames_sheet: list[torch.Tensor] = []
    # Contact-sheet frames are picked in advance (8 evenly spaced) so a long stream keeps only those in memory.
    total_pixel = codec.num_pixel_frames(num_frames) if codec is not None else 0
    sheet_idx = set(torch.linspace(0, max(total_pixel - 1, 0), 8).round().long().tolist())
    pixel_done = 0
    interrupted = False
    try:
        writer = Mp4Writer(out, fps=args.fps) if codec is not None else None
    except OSError as e:
        raise GenerateError(str(e))
    progress = Progress(TextColumn("chunks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=console, disable=args.quiet, transient=False)
    try:
        with progress:
            task = progress.add_task("gen", total=num_frames // f, info="")
            if codec is not None:
                items = decode_stream(chunks, codec.stream_decoder(), synchronize=device.type == "cuda")
            else:
                items = ((c, None, 0.0) for c in chunks)
            for item in items:
                chunk, frames, decode_s = (item.chunk, item.frames, item.decode_s) if codec is not None else item
                n_pix = 0
                if frames is not None and frames.shape[1]:
                    n_pix = frames.shape[1]
                    writer.write(frames[0])
                    frames_sheet += [frames[0, j].float().cpu() for j in range(n_pix) if pixel_done + j in sheet_idx]
                    pixel_done += n_pix
                stats.update(chunk, pixel_frames=n_pix, decode_s=decode_s)
                if args.save_latents:
                    latents_all.append(chunk.latents.float().cpu())
                info = f"{stats.fps():.1f} fps" + (" [prompt switch]" if chunk.recached else "")
                progress.update(task, advance=1, info=info)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        if writer is not None:
            writer.abort()  # a failure leaves nothing under the output name
        raise
    saved = writer.close() if writer is not None else None

    if args.save_latents and latents_all:
        torch.save(torch.cat(latents_all, 1), args.save_latents)
    sheet = None
    if saved is not None and args.contact_sheet != "none" and frames_sheet:
        sheet = Path(args.contact_sheet) if args.contact_sheet else out.with_suffix(".png")
        save_contact_sheet(sheet, torch.stack(frames_sheet, 0), columns=8)
    result = {
        "output": str(saved) if saved else None,
        "contact_sheet": str(sheet) if sheet else None,
        "interrupted": interrupted,
        "load_s": load_s,
        "text_encode_s": text_s,
        **stats.as_dict(),
    }
    if interrupted:
        console.print(
            f"[yellow]interrupted[/] after {stats.chunks} chunk(s); kept {stats.pixel_frames} frames in {saved}"
        )
    lat = stats.first_chunk_s or float("nan")
    console.print(
        f"first chunk {lat:.3f} s | {stats.pixel_frames} frames ({stats.latent_frames} latent) | "
        f"{result['fps']:.2f} fps overall | transformer {stats.transformer_s:.2f} s "
        f"(re-cache {stats.recache_s:.2f} s), decode {stats.decode_s:.2f} s | text {text_s:.2f} s, load {load_s:.2f} s"
    )
    if saved:
        console.print(f"wrote {saved}" + (f" and {sheet}" if sheet else ""))
    if interrupted:
        raise SystemExit(130)
    return result


if __name__ == "__main__":
    main()
