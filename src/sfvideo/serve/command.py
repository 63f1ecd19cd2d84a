"""``sfvideo serve``: a local web page that streams a generator in real time, with prompt switching.

    sfvideo serve                                    # the toy world's distilled generator shipped in the package
    sfvideo serve --generator runs/toy/checkpoints/last.ckpt
    sfvideo serve --generator exported/generator --latent_height 60 --latent_width 104 --text_encoder umt5 \\
        --codec wan --codec_args '{"path": "Wan2.1-T2V-1.3B-Diffusers/vae"}'

Open the printed address, type a prompt and press Enter. ``--generator`` takes what ``sfvideo generate`` takes: a
Lightning checkpoint of ``SelfForcingDMD`` (geometry, steps and encoders from its hyper-parameters and the run's
``config.yaml``) or a diffusers folder (an ``sfvideo export``); a folder may carry a **generation card**,
``serve.yaml``, whose keys are this command's flags (geometry, steps, encoders), so that it serves with no other
flag. Flags given on the command line override the card.

The bundled toy generator is ``src/sfvideo/assets/toy_generator/`` (an ``sfvideo export`` of the toy Self Forcing
run); its card is the folder's ``serve.yaml`` if present, else ``sfvideo/serve/toy_generator.yaml``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

PROG = "sfvideo serve"
CARD_NAME = "serve.yaml"
"""The generation card inside a generator folder."""
BUNDLED = "toy_generator"
"""The bundled generator's folder under ``sfvideo/assets``."""


def _fail(message: str) -> None:
    raise SystemExit(f"{PROG}: error: {message}")


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options (a generation card).")
    p.add_argument("--generator", type=str | None, default=None,
                   help="Lightning .ckpt or diffusers folder (default: the bundled toy generator).")
    p.add_argument("--host", type=str, default="127.0.0.1", help="Address to bind (loopback by default).")
    p.add_argument("--port", type=int, default=8000, help="Port to bind (0: any free port).")
    p.add_argument("--max_streams", type=int, default=1, help="Streams generated at once; more viewers are told "
                                                              "the server is busy.")
    p.add_argument("--fps", type=int, default=16, help="Playback frame rate of the page and of the mp4.")
    p.add_argument("--pace", type=str, default="realtime",
                   help="realtime: stay one chunk ahead of playback; max: generate as fast as possible.")
    p.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality of the streamed frames (1-95).")
    p.add_argument("--max_stream_s", type=float, default=600.0, help="Stop a stream after this many seconds of "
                                                                     "video (0: never).")
    p.add_argument("--max_prompt_chars", type=int, default=500, help="Longest prompt accepted.")
    p.add_argument("--seed", type=int | None, default=None, help="Seed of every stream (default: random, shown).")
    p.add_argument("--window_frames", type=int | None, default=None,
                   help="Rolling KV-cache window in latent frames (default: the training window or clip).")
    p.add_argument("--sink_frames", type=int, default=0, help="First frames kept in the cache forever.")
    p.add_argument("--no_recache", action="store_true", help="On a prompt switch reset only the cross-attention.")
    p.add_argument("--use_ema", action="store_true", help="Use the EMA weights of a Lightning checkpoint.")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str | None, default=None, help="float32/bfloat16/float16 (default: bf16 on CUDA).")
    p.add_argument("--threads", type=int | None, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is fastest on a busy or 2-core CPU).")
    p.add_argument("--text_encoder", type=str, default="auto",
                   help="auto (the run's config.yaml, else toy), toy, umt5, or a class path.")
    p.add_argument("--text_encoder_args", type=str | None, default=None, help="JSON init args of the text encoder.")
    p.add_argument("--codec", type=str, default="auto", help="auto, toy, wan, or a class path.")
    p.add_argument("--codec_args", type=str | None, default=None, help="JSON init args of the codec.")
    g = p.add_argument_group("Diffusers folders (a Lightning checkpoint states these itself)")
    g.add_argument("--latent_height", type=int, default=60)
    g.add_argument("--latent_width", type=int, default=104)
    g.add_argument("--train_frames", type=int, default=21, help="Latent frames of the training clip.")
    g.add_argument("--frames_per_chunk", type=int | None, default=None, help="Latent frames per chunk (default 3, "
                                                                             "or the checkpoint's).")
    g.add_argument("--denoising_steps", type=list[int], default=[1000, 750, 500, 250])
    g.add_argument("--warp_denoising_steps", type=bool, default=True)
    g.add_argument("--shift", type=float, default=5.0)
    g.add_argument("--context_noise", type=float, default=0.0)
    return p


def assets_root() -> Path:
    """``sfvideo/assets`` of the installed package."""
    return Path(str(resources.files("sfvideo") / "assets"))


def bundled_generator() -> tuple[Path, Path]:
    """The bundled toy generator's folder and its generation card; one-line error while it is not shipped."""
    folder = assets_root() / BUNDLED
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        _fail(f"the bundled toy generator is not shipped yet (no weights in {folder}); pass --generator "
              f"<Lightning .ckpt | diffusers folder>")
    card = folder / CARD_NAME
    if not card.is_file():
        card = Path(str(resources.files("sfvideo.serve") / f"{BUNDLED}.yaml"))
    return folder, card


def parse_args(argv: Sequence[str]) -> Any:
    """Parse the flags; a generator folder's card (or the bundled generator's) gives defaults the flags override."""
    parser = build_parser()
    argv = list(argv)
    args = parser.parse_args(argv)
    card: Path | None = None
    if args.generator is None:
        folder, card = bundled_generator()
        source = folder
    else:
        source = Path(args.generator)
        if not source.exists():
            _fail(f"--generator not found: {source}")
        if source.is_dir() and (source / CARD_NAME).is_file():
            card = source / CARD_NAME
    if card is not None:
        args = parser.parse_args(["--config", str(card), *argv])
    args.checkpoint = str(source)
    args.card = str(card) if card is not None else None
    return args


def settings_from(args: Any):
    from sfvideo.serve.server import ServeSettings

    try:
        return ServeSettings(max_streams=args.max_streams, fps=args.fps, pace=args.pace,
                             jpeg_quality=args.jpeg_quality, max_stream_s=args.max_stream_s, seed=args.seed)
    except ValueError as e:
        _fail(str(e))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (one-line error when the address cannot be had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port} (--host/--port): {e.strerror or e}")


async def serve(server: Any, sock: socket.socket, *, on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, handle_signals: bool = True) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down cleanly (streams end, files go)."""
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    runner = web.AppRunner(server.app(), handle_signals=False, shutdown_timeout=10.0, access_log=None)
    await runner.setup()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    try:
        await web.SockSite(runner, sock).start()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
    finally:
        for sig in signals:  # a second Ctrl-C during shutdown interrupts it
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``sfvideo serve``."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = settings_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from sfvideo.serve.server import StreamServer
    from sfvideo.serve.session import ServeError, ServeGenerator

    if args.threads is not None:
        if args.threads < 1:
            _fail(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    sock = bind(args.host, args.port)  # before loading: a taken port fails in a second, not after the model
    print(f"{PROG}: loading {args.checkpoint}" + (f" (card {args.card})" if args.card else ""), flush=True)
    try:
        generator = ServeGenerator.load(args)
    except ServeError as e:
        _fail(str(e))
    server = StreamServer(generator, settings)
    info = generator.describe()

    def ready(url: str) -> None:
        if not sock.getsockname()[0].startswith(("127.", "::1", "localhost")):
            print(f"{PROG}: warning: listening on {args.host}, reachable from other machines; there is no "
                  f"authentication", flush=True)
        print(f"{PROG}: {info['device']} {info['dtype']}, {info['frame_width']}x{info['frame_height']} frames, "
              f"up to {settings.max_streams} stream(s) at {settings.fps} fps ({settings.pace})", flush=True)
        print(f"{PROG}: open {url}  (Ctrl-C stops)", flush=True)

    try:
        asyncio.run(serve(server, sock, on_ready=ready))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        raise SystemExit(130) from None
    print(f"{PROG}: stopped", flush=True)


if __name__ == "__main__":
    main()
