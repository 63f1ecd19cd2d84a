"""``sfvideo serve`` on the command line: the bundled generator, class-path flags, config files, errors, Ctrl-C."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from conftest import PROMPT_A, load_generator

from sfvideo.serve import command


def _error(argv):
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    message = str(e.value.code)
    assert message.startswith("sfvideo serve: error: ") and "\n" not in message
    return message


def test_bundled_generator_absent_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(command, "assets_root", lambda: tmp_path)
    message = _error([])
    assert "bundled toy generator is not shipped yet" in message and "--generator" in message


def test_bundled_generator_is_served_without_flags(monkeypatch, tmp_path, generator_folder):
    """Once shipped it is an export like any other: its own record says everything (no card, no flags)."""
    monkeypatch.setattr(command, "assets_root", lambda: tmp_path)
    shutil.copytree(generator_folder, tmp_path / command.BUNDLED)
    args = command.parse_args(["--port", "0"])
    assert args.generator == str(tmp_path / command.BUNDLED) and args.port == 0
    from sfvideo.serve.session import ServeGenerator

    info = ServeGenerator.load(command.instantiate(args)).describe()
    assert (info["frame_width"], info["latent_frames_per_chunk"], info["window_frames"]) == (16, 2, 6)


@pytest.mark.skipif(not (command.assets_root() / command.BUNDLED).is_dir(), reason="toy generator not shipped yet")
def test_the_shipped_toy_generator_serves_from_its_record():
    from sfvideo.checkpoints import read_checkpoint

    ckpt = read_checkpoint(command.assets_root() / command.BUNDLED)
    assert ckpt.kind == "export" and ckpt.settings.sampler == "few_step"
    assert ckpt.text_encoder_spec and ckpt.codec_spec
    load_generator(ckpt.path).check_prompt(PROMPT_A)


def test_encoders_and_settings_from_class_path_flags_and_a_config_file(generator_checkpoint, tmp_path):
    """The flags of ``sfvideo generate``: class paths with their init args, in a YAML file as on the line."""
    config = tmp_path / "serve.yaml"
    config.write_text("window_frames: 4\nsink_frames: 2\nschedule:\n  denoising_steps: [1000, 750, 500]\n"
                      "decoder:\n  class_path: sfvideo.toy.encoders.ToyCodec\n  init_args:\n    scale: 0.5\n")
    g = load_generator(generator_checkpoint, "--config", config, "--sink_frames", 0)  # the line wins
    assert (g.window_frames, g.sink_frames) == (4, 0)
    assert list(g.engine.settings.schedule.denoising_steps) == [1000, 750, 500]
    assert type(g.engine.decoder).__name__ == "ToyCodec" and bool((g.engine.decoder.scale == 0.5).all())


def test_missing_generator_bad_flags_and_taken_port_are_one_line(tmp_path, generator_folder):
    from sfvideo.cli import main as sfvideo

    with pytest.raises(SystemExit, match="^sfvideo serve: error: --generator not found"):  # through `sfvideo serve`
        sfvideo(["serve", "--generator", str(tmp_path / "nope")])
    assert "--threads must be positive" in _error(["--generator", str(generator_folder), "--threads", "0"])
    assert "--max_streams" in _error(["--generator", str(generator_folder), "--max_streams", "0"])
    assert "--pace" in _error(["--generator", str(generator_folder), "--pace", "fast"])
    message = _error(["--generator", str(generator_folder), "--port", "0", "--codec", "sfvideo.toy.encoders.ToyCodec",
                      "--codec.spatial_stride", "0"])
    assert "cannot build" in message and "spatial_stride must be positive" in message
    message = _error(["--generator", str(generator_folder), "--port", "0", "--window_frames", "3"])
    assert "--window_frames=3" in message
    taken = command.bind("127.0.0.1", 0)
    try:
        message = _error(["--generator", str(generator_folder), "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert "cannot listen on 127.0.0.1" in message and "--port" in message


def test_ctrl_c_stops_the_server_cleanly_mid_stream(tmp_path, generator_folder):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sfvideo.serve", "--generator", str(generator_folder),
                             "--port", "0", "--pace", "max"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if ": open http://" in line:
                url = line.split("open ", 1)[1].split()[0]
        assert url is not None and url.startswith("http://127.0.0.1:"), "".join(lines)

        async def until_close(ws):
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    return msg

        async def stream_then_interrupt():
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url + "ws") as ws:
                    await ws.send_json({"type": "start", "prompt": PROMPT_A})
                    while (await asyncio.wait_for(ws.receive(), 20)).type != aiohttp.WSMsgType.BINARY:
                        pass
                    assert any(tmp.iterdir())  # the stream's recording lives under TMPDIR
                    proc.send_signal(signal.SIGINT)
                    return await asyncio.wait_for(until_close(ws), 20)

        closing = asyncio.run(stream_then_interrupt())
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped" in out.splitlines()[-1]
    assert closing.data == 1001 and "shutting down" in (closing.extra or "")
    assert not any(tmp.iterdir()), list(tmp.iterdir())  # recordings removed
