"""A tiny random toy-shaped generator, saved as a diffusers folder with a generation card, and servers on it."""

import asyncio
import threading

import pytest
import torch

PROMPT_A = "a red circle moving left on a dark background"
PROMPT_B = "a blue square moving up on a light background"

# The generation card of the tiny generator: toy encoders at their defaults (32-dim words, pixel-unshuffle by 2
# = 12 latent channels), 8x8 latents = 16x16 pixels, chunks of 2 latent frames, a 6-frame window, 2 steps.
CARD = """\
train_frames: 6
latent_height: 8
latent_width: 8
frames_per_chunk: 2
denoising_steps: [1000, 500]
shift: 5.0
text_encoder: toy
codec: toy
device: cpu
"""


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread start-up dominates and the CPU is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def generator_folder(tmp_path_factory):
    """``sfvideo export``'s format (diffusers folder) of a random debug-flavor WanTransformer, plus ``serve.yaml``."""
    from sfvideo.nn.checkpoint import export_diffusers
    from sfvideo.nn.wan import WanTransformer

    torch.manual_seed(0)
    model = WanTransformer.from_flavor("debug", in_channels=12, out_channels=12)
    folder = export_diffusers(model, tmp_path_factory.mktemp("gen") / "generator")
    (folder / "serve.yaml").write_text(CARD)
    return folder


def load_generator(folder, *extra):
    from sfvideo.serve.command import parse_args
    from sfvideo.serve.session import ServeGenerator

    return ServeGenerator.load(parse_args(["--generator", str(folder), *map(str, extra)]))


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
