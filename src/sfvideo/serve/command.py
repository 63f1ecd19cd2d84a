"""``sfvideo serve``: a local web page that streams a generator in real time, with prompt switching.

    sfvideo serve                                    # the toy world's distilled generator shipped in the package
    sfvideo serve --generator runs/toy/checkpoints/last.ckpt
    sfvideo serve --generator exported/generator --port 8080 --max_streams 2
    sfvideo serve --generator exported/generator --decoder sfvideo.nn.taehv.TAEHVCodec --decoder.path taew2_1.pth

Open the printed address, type a prompt and press Enter. ``--generator`` takes what ``sfvideo generate`` takes
(``sfvideo.checkpoints.read_checkpoint``): a Lightning checkpoint of a training module or an ``sfvideo export``
folder, which record their geometry, steps, chunking, window, text encoder and codec, so the path alone is enough;
or bare weights (a diffusers folder, a Wan2.1 file, a Self Forcing ``.pt``), for which ``--geometry.*``,
``--schedule.*``, ``--context_noise`` and the encoders are given. ``--text_encoder``, ``--codec`` and ``--decoder``
are jsonargparse class paths with their init args as ``--codec.ARG VALUE`` (the flags of ``sfvideo generate``)
and replace the recorded pieces; ``--config FILE`` reads any of these flags from a YAML file.

The bundled toy generator is ``src/sfvideo/assets/toy_generator/``, an ``sfvideo export`` of the toy Self
Forcing run: it describes itself like any export.
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
BUNDLED = "toy_generator"
"""The bundled generator's folder under ``sfvideo/assets``."""


def _fail(message: str) -> None:
    raise SystemExit(f"{PROG}: error: {message}")


def build_parser():
    from jsonargparse import ActionConfigFile

    from sfvideo.errors import json_parser
    from sfvideo.serve.session import add_generator_arguments

    p = json_parser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options.")
    p.add_argument("--generator", type=str | None, default=None,
                   help="Lightning .ckpt, export folder, or bare weights (default: the bundled toy generator).")
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
    p.add_argument("--seed", type=int | None, default=None, help="Seed of every stream (default: random, shown).")
    p.add_argument("--threads", type=int | None, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is fastest on a busy or 2-core CPU).")
    add_generator_arguments(p)
    return p


def assets_root() -> Path:
    """``sfvideo/assets`` of the installed package."""
    return Path(str(resources.files("sfvideo") / "assets"))


def bundled_generator() -> Path:
    """The bundled toy generator's folder; one-line error while it is not shipped."""
    folder = assets_root() / BUNDLED
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        _fail(f"the bundled toy generator is not shipped yet (no weights in {folder}); pass --generator "
              f"<Lightning .ckpt | export folder>")
    return folder


def parse_args(argv: Sequence[str]) -> Any:
    """Parse the flags (encoders stay class paths until :func:`instantiate`); ``generator`` is the path to serve."""
    args = build_parser().parse_args(list(argv))
    if args.generator is None:
        args.generator = str(bundled_generator())
    elif not Path(args.generator).exists():
        _fail(f"--generator not found: {args.generator}")
    return args


def instantiate(args: Any) -> Any:
    """The parsed flags with ``--text_encoder``, ``--codec``, ``--decoder``, ``--geometry``, ``--schedule`` built
    (a text encoder or codec may load weights: done after the port is bound)."""
    try:
        return build_parser().instantiate(args)
    except Exception as e:  # noqa: BLE001 - the constructor's own error, as one line
        while e.__cause__ is not None:  # jsonargparse wraps it in its union-type report
            e = e.__cause__
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(f"cannot build the encoders or settings given: {reason}")


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
    print(f"{PROG}: loading {args.generator}", flush=True)
    try:
        args = instantiate(args)
        generator = ServeGenerator.load(args)
    except ServeError as e:
        sock.close()
        _fail(str(e))
    except BaseException:
        sock.close()
        raise
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
