"""``sfvideo generate``: stream a video from a trained network into an mp4, chunk by chunk.

Sources (``sfvideo.checkpoints.read_checkpoint``):

- a Lightning checkpoint of any sfvideo training module (``*.ckpt``) or an ``sfvideo export`` folder: they record
  everything (network, geometry, step list, shift, chunking, context noise, window, text encoder, codec), so the
  path alone is enough; ``--use_ema`` takes the EMA weights of a checkpoint;
- a diffusers folder, an original Wan2.1 file or a Self Forcing / CausVid ``.pt`` (anything
  ``sfvideo.nn.checkpoint.load_transformer`` reads): the settings come from ``--geometry.*``, ``--schedule.*``,
  ``--context_noise`` and the encoders from ``--text_encoder`` / ``--codec``.

Any of those flags given replaces the recorded value. Encoders are given as jsonargparse classes:
``--codec sfvideo.nn.wan_vae.WanVAECodec --codec.vae <folder>``; ``--decoder`` picks another decoder (e.g. a tiny
preview decoder) for the frames. The sampling itself is ``sfvideo.inference``: each chunk is decoded by the
decoder's streaming decoder as soon as it is denoised and its frames are appended to the mp4 at once; the file
appears under its name only when finalised (Ctrl-C keeps the frames done). Lengths are in *latent* frames (Wan:
``1 + 4 (F - 1)`` pixel frames); any multiple of the chunk size works, the KV cache rolls past ``--window_frames``
(keeping ``--sink_frames``). ``--prompt_schedule "0:a red circle ...;42:a blue square ..."`` switches prompts at
latent frames (chunk boundaries), re-caching the recent window under the new prompt.

Examples::

    sfvideo generate runs/toy/checkpoints/last.ckpt --prompt "a red circle moving left on a dark background"
    sfvideo generate last.ckpt --num_frames 84 --window_frames 12 --sink_frames 3 --prompt_schedule \\
        "0:a red circle moving left on a dark background;42:a blue square moving up on a light background"
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sfvideo.config import InferenceSettings, ManyStepSampling, StepSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import TextEncoder, VideoCodec, VideoDecoder

PROG = "sfvideo generate"
KEYS = {"geometry": "--geometry", "text_encoder": "--text_encoder", "codec": "--codec (or --decoder)",
        "network": "the network"}
"""The pieces of a run by their flags, for error messages."""


class GenerateError(ValueError):
    """A user error: printed as one line, no traceback."""


# ------------------------------------------------------------------ the command line
def build_parser():
    from jsonargparse import ActionConfigFile

    from sfvideo.errors import json_parser

    p = json_parser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options.")
    p.add_argument("checkpoint", type=str, help="Lightning .ckpt, export folder, diffusers folder, Wan or .pt file.")
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
    p.add_argument("--fps", type=int, default=16, help="Frame rate of the mp4 (positive).")
    p.add_argument("--contact_sheet", type=str | None, default=None,
                   help="PNG of frames over time (default: next to the mp4; 'none' to skip).")
    p.add_argument("--save_latents", type=str | None, default=None, help="Also save the latents (.pt).")
    p.add_argument("--text_encoder", type=TextEncoder | None, default=None,
                   help="Text encoder class (default: the checkpoint's), e.g. sfvideo.toy.encoders.ToyTextEncoder.")
    p.add_argument("--codec", type=VideoCodec | None, default=None,
                   help="Codec class (default: the checkpoint's), e.g. sfvideo.nn.wan_vae.WanVAECodec.")
    p.add_argument("--decoder", type=VideoDecoder | None, default=None,
                   help="Decoder of the frames in place of the codec's (e.g. a tiny preview decoder).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    g = p.add_argument_group("Settings (default: the checkpoint's; needed for sources that record none)")
    g.add_argument("--geometry", type=VideoGeometry | None, default=None, help="Latent geometry of training.")
    g.add_argument("--schedule", type=StepSchedule | None, default=None, help="The few-step list and shift.")
    g.add_argument("--sampling", type=ManyStepSampling | None, default=None,
                   help="Steps, guidance and solver of a many-step checkpoint (teacher, TF/DF baselines).")
    g.add_argument("--context_noise", type=float | None, default=None, help="Timestep of the cache refresh noise.")
    return p


FLAG_OF_GROUP = {"FlowMatchSchedule.": "--schedule.", "schedule.": "--schedule.", "VideoGeometry.": "--geometry.",
                 "sampling.": "--sampling."}
"""Groups' own names in their validation messages -> the flags of this command."""


def flag_message(message: str) -> str:
    """A settings group's validation message in terms of this command's flags."""
    for prefix, flag in FLAG_OF_GROUP.items():
        if message.startswith(prefix):
            return flag + message[len(prefix):]
    return message


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``sfvideo generate``. Returns the statistics (also printed)."""
    from sfvideo.errors import fail, nested_error_line

    parser = build_parser()
    config = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.instantiate(config)  # builds the settings groups and classes: their validation runs here
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(PROG, flag_message(nested_error_line(str(e))))
    try:
        return run(args)
    except GenerateError as e:
        fail(PROG, e)


# ------------------------------------------------------------------ checks and set-up
def check_output(path: Path, suffix: str | None = ".mp4", flag: str = "--output") -> None:
    if suffix is not None and path.suffix.lower() != suffix:
        raise GenerateError(f"{flag} {path}: expected a {suffix} file name")
    if path.is_dir():
        raise GenerateError(f"{flag} {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    up = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if up is not None and not up.is_dir():
        raise GenerateError(f"{flag} {path}: {up} is a file, not a folder")
    if not parent.is_dir():
        raise GenerateError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GenerateError(f"{flag} {path}: not writable")


def check_numbers(args: Any) -> None:
    """Counts and rates must be positive (0 is not "the default": leave a flag out for that)."""
    for name in ("num_frames", "frames_per_chunk", "window_frames", "fps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise GenerateError(f"--{name} must be positive, got {value}")
    if args.sink_frames < 0:
        raise GenerateError(f"--sink_frames must be >= 0, got {args.sink_frames}")
    if args.context_noise is not None and args.context_noise < 0:
        raise GenerateError(f"--context_noise must be >= 0, got {args.context_noise}")


def check_prompt_flags(args: Any) -> None:
    """Cheap checks before loading anything (the schedule is checked again once the length is known)."""
    given = [n for n in ("prompt", "prompt_schedule", "prompts_file") if getattr(args, n) is not None]
    if len(given) != 1:
        raise GenerateError("give exactly one of --prompt, --prompt_schedule, --prompts_file")
    if args.prompt is not None and not args.prompt.strip():
        raise GenerateError("--prompt is empty")
    if args.prompts_file is not None and Path(args.prompts_file).is_dir():
        raise GenerateError(f"--prompts_file {args.prompts_file} is a directory, not a file of prompts")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise GenerateError(f"--prompts_file not found: {args.prompts_file}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name!r} is not a device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    from sfvideo.nn.precision import parse_dtype

    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise GenerateError(f"--dtype: {e}") from None


def resolve_schedule(args: Any, num_frames: int, frames_per_chunk: int) -> list[tuple[int, str]]:
    """The prompt schedule from exactly one of ``--prompt``, ``--prompt_schedule``, ``--prompts_file``."""
    from sfvideo.inference import check_context_schedule, parse_prompt_schedule, read_prompt_schedule
    from sfvideo.inference.prompts import check_prompts

    try:
        if args.prompt is not None:
            schedule = check_prompts([(0, args.prompt.strip())])
        elif args.prompt_schedule is not None:
            schedule = parse_prompt_schedule(args.prompt_schedule)
        else:
            schedule = read_prompt_schedule(args.prompts_file, num_frames, frames_per_chunk)
        check_context_schedule(schedule, frames_per_chunk, num_frames)
    except (ValueError, FileNotFoundError) as e:
        flag = next(f"--{n}" for n in ("prompt", "prompt_schedule", "prompts_file") if getattr(args, n) is not None)
        raise GenerateError(f"{flag}: {e}") from None
    return schedule


@dataclass
class Source:
    """The engine built from the checkpoint and the flags, and what the report says about it."""

    engine: Any
    path: str
    load_s: float


def settings_for(args: Any, ckpt: Any) -> InferenceSettings:
    """The checkpoint's inference settings with the flags given replacing theirs (bare weights: the flags' over
    the defaults, Wan2.1's)."""
    overrides = {"geometry": args.geometry, "schedule": args.schedule, "sampling": args.sampling,
                 "context_noise": args.context_noise}
    return replace(ckpt.settings or InferenceSettings(), **{k: v for k, v in overrides.items() if v is not None})


def load_source(args: Any, device: torch.device, dtype: torch.dtype) -> Source:
    """Read the checkpoint and build the engine: network in ``dtype`` on ``device``, its encoders, its settings."""
    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.inference import InferenceEngine
    from sfvideo.nn.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        ckpt = read_checkpoint(args.checkpoint)
        settings = settings_for(args, ckpt)
        codec = args.codec if args.codec is not None else ckpt.build_codec()
        decoder = args.decoder if args.decoder is not None else codec
        if decoder is None and not args.save_latents:
            raise GenerateError(
                f"{args.checkpoint} records no codec ({settings.geometry.channels}-channel latents cannot be written "
                f"as video): give --codec CLASS_PATH, or --save_latents FILE.pt for the latents only"
            )
        engine = InferenceEngine.from_checkpoint(ckpt, device=device, dtype=dtype, use_ema=args.use_ema,
                                                 settings=settings, text_encoder=args.text_encoder, decoder=decoder,
                                                 keys=KEYS)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        if isinstance(e, GenerateError):
            raise
        raise GenerateError(str(e).splitlines()[0]) from None
    return Source(engine=engine, path=str(ckpt.path), load_s=time.perf_counter() - t0)


# ------------------------------------------------------------------ writing
@dataclass
class Written:
    """What the stream loop produced."""

    output: Path | None
    sheet_frames: list[torch.Tensor]
    latents: list[torch.Tensor]
    interrupted: bool


def write_stream(session: Any, out: Path, args: Any, console: Any) -> Written:
    """Append each chunk's frames to the mp4 as it arrives; keep 8 evenly spaced frames for the contact sheet.

    Ctrl-C finalises the frames done; any other failure leaves nothing under the output name.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sfvideo.video import Mp4Writer

    total_pixel = session.num_pixel_frames or 0
    sheet_idx = set(torch.linspace(0, max(total_pixel - 1, 0), 8).round().long().tolist())
    sheet: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    pixel_done = 0
    try:
        writer = Mp4Writer(out, fps=args.fps) if session.decode else None
    except (OSError, ValueError) as e:
        raise GenerateError(str(e)) from None
    progress = Progress(TextColumn("chunks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=console, disable=args.quiet, transient=False)
    interrupted = False
    try:
        with progress:
            task = progress.add_task("gen", total=session.num_chunks, info="")
            for item in session:
                if item.frames is not None and item.frames.shape[1]:
                    frames = item.frames[0]
                    writer.write(frames)
                    sheet += [frames[j].float().cpu() for j in range(frames.shape[0]) if pixel_done + j in sheet_idx]
                    pixel_done += frames.shape[0]
                if args.save_latents:
                    latents.append(item.chunk.latents.float().cpu())
                info = f"{session.stats.fps():.1f} fps" + (" [prompt switch]" if item.chunk.recached else "")
                progress.update(task, advance=1, info=info)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        if writer is not None:
            writer.abort()  # a failure leaves nothing under the output name
        raise
    saved = writer.close() if writer is not None else None
    return Written(output=saved, sheet_frames=sheet, latents=latents, interrupted=interrupted)


def report(console: Any, result: dict[str, Any], stats: Any, written: Written, sheet: Path | None) -> None:
    if written.interrupted:
        console.print(f"[yellow]interrupted[/] after {stats.chunks} chunk(s); kept {stats.pixel_frames} frames in "
                      f"{written.output}")
    lat = stats.first_chunk_s or float("nan")
    console.print(
        f"first chunk {lat:.3f} s | {stats.pixel_frames} frames ({stats.latent_frames} latent) | "
        f"{result['fps']:.2f} fps overall | transformer {stats.transformer_s:.2f} s "
        f"(re-cache {stats.recache_s:.2f} s), decode {stats.decode_s:.2f} s | text {result['text_encode_s']:.2f} s, "
        f"load {result['load_s']:.2f} s"
    )
    if written.output:
        console.print(f"wrote {written.output}" + (f" and {sheet}" if sheet else ""))


# ------------------------------------------------------------------ the command
def run(args: Any) -> dict[str, Any]:
    from rich.console import Console

    from sfvideo.files import clean_stale_partials
    from sfvideo.video import save_contact_sheet

    console = Console(stderr=True, quiet=args.quiet)
    out = Path(args.output)
    check_output(out)
    sheet_path = None
    if args.contact_sheet != "none":
        sheet_path = Path(args.contact_sheet) if args.contact_sheet else out.with_suffix(".png")
        check_output(sheet_path, None, "--contact_sheet")
    if args.save_latents:
        check_output(Path(args.save_latents), None, "--save_latents")
    check_numbers(args)
    check_prompt_flags(args)
    for target in (out, sheet_path, args.save_latents):
        if target is not None:
            clean_stale_partials(target)  # what a killed run to the same path left
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = load_source(args, device, dtype)
    engine = source.engine
    try:
        session = engine.session(num_frames=args.num_frames, frames_per_chunk=args.frames_per_chunk,
                                 window_frames=args.window_frames, sink_frames=args.sink_frames,
                                 recache_on_switch=not args.no_recache, decode=engine.decoder is not None)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    schedule = resolve_schedule(args, session.num_frames, session.frames_per_chunk)
    try:
        session.start(schedule[0][1], seed=args.seed, schedule=schedule[1:])
    except ValueError as e:
        raise GenerateError(str(e)) from None
    console.print(f"[bold]{PROG}[/]: {source.path} -> {out} | {session.num_frames} latent frames in chunks of "
                  f"{session.frames_per_chunk}, window {session.window_frames or 'global'}, sink "
                  f"{session.sink_frames}, {len(schedule)} prompt(s), {device} {str(dtype).removeprefix('torch.')}")
    try:
        written = write_stream(session, out, args, console)
    finally:
        session.close()  # no decode of this stream runs on (an overlapped decode, after Ctrl-C or an error)
    if args.save_latents and written.latents:
        from sfvideo.files import AtomicFile

        with AtomicFile(args.save_latents) as tmp:
            torch.save(torch.cat(written.latents, 1), tmp)
    sheet = None
    if written.output is not None and sheet_path is not None and written.sheet_frames:
        sheet = sheet_path
        save_contact_sheet(sheet, torch.stack(written.sheet_frames, 0), columns=8)
    stats = session.stats
    result = {
        "output": str(written.output) if written.output else None,
        "contact_sheet": str(sheet) if sheet else None,
        "interrupted": written.interrupted,
        "load_s": source.load_s,
        "text_encode_s": session.text_encode_s,
        **stats.as_dict(),
    }
    report(console, result, stats, written, sheet)
    if written.interrupted:
        from sfvideo.errors import EXIT_INTERRUPTED

        raise SystemExit(EXIT_INTERRUPTED)
    return result


if __name__ == "__main__":
    main()
