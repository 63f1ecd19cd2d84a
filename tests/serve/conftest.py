"""A tiny random toy-shaped generator, written the way real runs write it (a Lightning checkpoint of
``SelfForcingDMD`` through its ``on_save_checkpoint``, then ``sfvideo export``), and servers on it."""

import asyncio
import threading

import pytest
import torch

PROMPT_A = "a red circle moving left on a dark background"
PROMPT_B = "a blue square moving up on a light background"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread start-up dominates and the CPU is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def generator_checkpoint(tmp_path_factory):
    """What ``sfvideo fit`` saves: a random debug-flavor run with the toy encoders at their defaults (32-dim
    words, pixel-unshuffle by 2 = 12 latent channels), 8x8 latents = 16x16 pixels, chunks of 2 latent frames, a
    6-frame clip (the streams' rolling window), 2 steps."""
    from sfvideo.config import StepSchedule
    from sfvideo.geometry import VideoGeometry
    from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder
    from sfvideo.training.module import SelfForcingDMD

    geometry = VideoGeometry(num_frames=6, channels=12, height=8, width=8, frames_per_chunk=2)
    module = SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12},
                            geometry=geometry, text_encoder=ToyTextEncoder(), codec=ToyCodec(),
                            schedule=StepSchedule(denoising_steps=(1000, 500)))
    module.configure_model()
    ckpt = {"state_dict": dict(module.state_dict()), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # the record of networks, settings and encoders, as Lightning saves it
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def generator_folder(generator_checkpoint, tmp_path_factory):
    """``sfvideo export`` of that checkpoint: a diffusers folder with its ``sfvideo.json`` record."""
    from sfvideo.export import export_checkpoint

    return export_checkpoint(generator_checkpoint, tmp_path_factory.mktemp("export") / "generator")


def load_generator(source, *extra):
    """``ServeGenerator`` from ``sfvideo serve`` flags, through the command's own parsing."""
    from sfvideo.serve.command import instantiate, parse_args
    from sfvideo.serve.session import ServeGenerator

    return ServeGenerator.load(instantiate(parse_args(["--generator", str(source), "--device", "cpu",
                                                       *map(str, extra)])))


@pytest.fixture(scope="session")
def generator(generator_folder):
    return load_generator(generator_folder)


class ThreadedServer:
    """A StreamServer on 127.0.0.1 (any free port) in its own event loop thread."""

    def __init__(self, server):
        from sfvideo.serve.command import bind, serve

        self.server = server
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

        async def main():
            self._stop = asyncio.Event()
            await serve(server, self.sock, on_ready=lambda _: self._ready.set(), stop=self._stop,
                        handle_signals=False)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "server did not start"

    def call(self, fn):
        """Run ``fn()`` on the server's loop and return its result (for reading server state safely)."""
        import concurrent.futures

        fut = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(lambda: fut.set_result(fn()))
        return fut.result(5)

    def close(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not shut down"
        self.loop.close()
