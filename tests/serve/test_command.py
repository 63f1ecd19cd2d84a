"""``sfvideo serve`` on the command line: the bundled generator, generation cards, errors, Ctrl-C."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import PROMPT_A

from sfvideo.serve import command

ROOT = Path(__file__).resolve().parents[2]


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
    monkeypatch.setattr(command, "assets_root", lambda: tmp_path)
    shutil.copytree(generator_folder, tmp_path / command.BUNDLED)
    args = command.parse_args(["--port", "0"])
    assert args.checkpoint == str(tmp_path / command.BUNDLED) and args.card.endswith("serve.yaml")
    assert (args.latent_height, args.frames_per_chunk, args.port) == (8, 2, 0)  # the card, then the flags
    (tmp_path / command.BUNDLED / "serve.yaml").unlink()  # no card of its own: the packaged toy card
    args = command.parse_args([])
    assert Path(args.card).name == "toy_generator.yaml" and args.latent_height == 8 and args.train_frames == 21


def test_the_toy_card_states_the_toy_recipe():
    """The packaged card must describe what configs/toy/dmd.yaml trains (same geometry, steps and encoders)."""
    card = yaml.safe_load((ROOT / "src/sfvideo/serve/toy_generator.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "configs/toy/dmd.yaml").read_text())["model"]["init_args"]
    geo = recipe["geometry"]
    assert (card["train_frames"], card["latent_height"], card["latent_width"], card["frames_per_chunk"]) == (
        geo["num_frames"], geo["height"], geo["width"], geo["frames_per_chunk"])
    assert card["denoising_steps"] == recipe["denoising_steps"] and card["shift"] == recipe["shift"]
    assert card["warp_denoising_steps"] == recipe["warp_denoising_steps"]
    assert json.loads(card["text_encoder_args"]) == recipe["text_encoder"]["init_args"]
    assert json.loads(card["codec_args"]) == recipe["codec"]["init_args"]
    command.build_parser().parse_args(["--config", str(ROOT / "src/sfvideo/serve/toy_generator.yaml")])


def test_missing_generator_bad_flags_and_taken_port_are_one_line(tmp_path, generator_folder):
    from sfvideo.cli import main as sfvideo

    with pytest.raises(SystemExit, match="^sfvideo serve: error: --generator not found"):  # through `sfvideo serve`
        sfvideo(["serve", "--generator", str(tmp_path / "nope")])
    assert "--threads must be positive" in _error(["--generator", str(generator_folder), "--threads", "0"])
    assert "--max_streams" in _error(["--generator", str(generator_folder), "--max_streams", "0"])
    assert "--pace" in _error(["--generator", str(generator_folder), "--pace", "fast"])
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
