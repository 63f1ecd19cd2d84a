"""The web server over real sockets on 127.0.0.1: streaming, switching, download, busy limit, disconnects, prompts."""

import asyncio
import io
import json
import threading
import time
import weakref

import aiohttp
import numpy as np
import pytest
from conftest import PROMPT_A, PROMPT_B, ThreadedServer
from PIL import Image

from sfvideo.serve.server import ServeSettings, StreamServer, unpack_frame

TIMEOUT = 20  # seconds; every wait below is bounded, so a hang fails instead of blocking the suite


@pytest.fixture
def make_server(generator):
    servers = []

    def make(gen=None, **settings):
        s = ThreadedServer(StreamServer(gen or generator, ServeSettings(**settings)))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


async def _json(ws, *types, chunks=None):
    """The next JSON message of one of ``types``; headers of chunks completed before it go to ``chunks``."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
        if msg.type == aiohttp.WSMsgType.BINARY:
            header, _ = unpack_frame(msg.data)
            if chunks is not None and header["part"] == header["frames"] - 1:
                chunks.append(header)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if data["type"] in types:
                return data


async def _chunk(ws):
    """The header of the next chunk completed and its frames' JPEGs (one message per frame, in order)."""
    images, last = [], None
    while True:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        if msg.type == aiohttp.WSMsgType.BINARY:
            header, jpeg = unpack_frame(msg.data)
            assert header["type"] == "frame", header
            if last is not None:  # in order, one message per frame
                assert (header["index"], header["part"]) == (last["index"], last["part"] + 1), header
            images.append(jpeg)
            last = header
            if header["part"] == header["frames"] - 1:
                return header, images
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        assert json.loads(msg.data)["type"] in ("switching", "started"), msg.data


async def _connect(session, server):
    ws = await session.ws_connect(server.url + "ws")
    hello = await _json(ws, "hello")
    return ws, hello


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * TIMEOUT))


def test_stream_switch_stop_and_download(make_server, tmp_path):
    server = make_server(pace="max")

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, hello = await _connect(http, server)
            assert hello["generator"]["frame_width"] == 16 and hello["streams"] == {"active": 0, "limit": 1}
            await ws.send_json({"type": "start", "prompt": PROMPT_A})
            started = await _json(ws, "started")
            assert started["prompt"] == PROMPT_A and isinstance(started["seed"], int)
            headers = []
            for _ in range(3):
                header, images = await _chunk(ws)
                headers.append(header)
                assert len(images) == header["frames"] == 2
                for jpeg in images:
                    assert Image.open(io.BytesIO(jpeg)).size == (16, 16)
            # Mid-stream download: everything sent so far (at least the chunks received).
            async with http.get(server.url + hello["download"].lstrip("/")) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
                (tmp_path / "mid.mp4").write_bytes(await r.read())
            await ws.send_json({"type": "prompt", "prompt": PROMPT_B})
            assert (await _json(ws, "switching", chunks=headers))["prompt"] == PROMPT_B
            while headers[-1]["segment"] == 0:
                headers.append((await _chunk(ws))[0])
            for _ in range(2):
                headers.append((await _chunk(ws))[0])
            await ws.send_json({"type": "stop"})
            stopped = await _json(ws, "stopped", chunks=headers)
            async with http.get(server.url + hello["download"].lstrip("/")) as r:
                (tmp_path / "all.mp4").write_bytes(await r.read())
            await ws.close()
            return headers, stopped

    headers, stopped = _run(scenario())
    from sfvideo.video import read_mp4

    assert [h["index"] for h in headers] == list(range(len(headers)))
    assert [h["recached"] for h in headers].count(True) == 1  # one switch, one re-cache, no restart
    switch = next(h for h in headers if h["recached"])
    assert switch["segment"] == 1 and switch["prompt"] == PROMPT_B and switch["switches"] == 1
    assert all(h["prompt"] == PROMPT_A for h in headers[: switch["index"]])
    assert headers[-1]["total_frames"] == sum(h["frames"] for h in headers)
    assert headers[0]["first_chunk_s"] > 0 and headers[-1]["fps"] > 0
    assert stopped["reason"] == "stopped" and stopped["frames"] == headers[-1]["total_frames"]
    assert read_mp4(tmp_path / "mid.mp4").shape[0] >= 3 * headers[0]["frames"]
    video = read_mp4(tmp_path / "all.mp4")
    assert video.shape == (stopped["frames"], 16, 16, 3)


def test_busy_limit_answers_at_once_and_frees_on_stop(make_server):
    server = make_server(max_streams=1)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws_a, _ = await _connect(http, server)
            ws_b, _ = await _connect(http, server)
            await ws_a.send_json({"type": "start", "prompt": PROMPT_A})
            await _chunk(ws_a)
            await ws_b.send_json({"type": "start", "prompt": PROMPT_B})
            busy = await _json(ws_b, "busy", "started")
            async with http.get(server.url + "api/info") as r:
                info = await r.json()
            await ws_a.send_json({"type": "stop"})
            await _json(ws_a, "stopped")
            await ws_b.send_json({"type": "start", "prompt": PROMPT_B})
            started = await _json(ws_b, "started", "busy")
            await _chunk(ws_b)
            for ws in (ws_a, ws_b):
                await ws.close()
            return busy, info, started

    busy, info, started = _run(scenario())
    assert busy["type"] == "busy" and "busy" in busy["message"]
    assert info["streams"] == {"active": 1, "limit": 1}
    assert started["type"] == "started"


def test_a_disconnected_viewer_frees_its_stream_cache_and_recording(make_server):
    server = make_server(max_streams=1)
    refs = {}

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": PROMPT_A})
            await _chunk(ws)

            def grab():
                (viewer,) = server.server.viewers.values()
                refs["cache"] = weakref.ref(viewer.session.kv_cache)
                refs["recording"] = viewer.recording.folder

            server.call(grab)
            await ws.close()
        deadline = time.monotonic() + TIMEOUT
        while server.call(lambda: (server.server.slots.active, len(server.server.viewers))) != (0, 0):
            assert time.monotonic() < deadline, "the stream of a closed page was not freed"
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as http:  # the slot is free for the next viewer
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": PROMPT_B})
            assert (await _json(ws, "started", "busy"))["type"] == "started"
            await ws.close()

    _run(scenario())
    assert refs["cache"]() is None
    assert not refs["recording"].exists()


@pytest.mark.parametrize(
    "prompt, reason",
    [("a zebra moving left on a dark background", "unknown word 'zebra'"), ("", "empty"),
     ("a red\x07 circle", "control"), ("a " * 300, "599 characters"), (["a", "list"], "must be text")],
)
def test_bad_prompts_get_the_reason_and_hold_no_slot(make_server, prompt, reason):
    server = make_server(max_streams=1)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": prompt})
            error = await _json(ws, "error", "started")
            active = server.call(lambda: server.server.slots.active)
            await ws.send_json({"type": "start", "prompt": PROMPT_A})  # the page can go on
            await _json(ws, "started")
            await ws.send_json({"type": "prompt", "prompt": prompt})  # and a bad switch keeps the stream
            switch_error = await _json(ws, "error", "switching")
            await _chunk(ws)
            await ws.close()
            return error, active, switch_error

    error, active, switch_error = _run(scenario())
    assert error["type"] == "error" and error["field"] == "prompt" and reason in error["message"]
    assert switch_error["type"] == "error" and reason in switch_error["message"]
    assert active == 0


class _BlockingGenerator:
    """The real generator, whose sessions wait for ``release`` before each chunk (generation that takes long)."""

    def __init__(self, inner):
        self.inner, self.release, self.entered = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def new_session(self, seed):
        session, outer = self.inner.new_session(seed), self

        class Blocking:
            def __getattr__(self, name):
                return getattr(session, name)

            def next_chunk(self):
                outer.entered.set()
                assert outer.release.wait(TIMEOUT)
                return session.next_chunk()

        return Blocking()


def test_generation_runs_off_the_event_loop(make_server, generator):
    blocking = _BlockingGenerator(generator)
    server = make_server(gen=blocking)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": PROMPT_A})
            await _json(ws, "started")
            assert await asyncio.get_running_loop().run_in_executor(None, blocking.entered.wait, TIMEOUT)
            # A chunk is being generated and cannot finish: the server still answers pages and other viewers.
            async with http.get(server.url + "api/info", timeout=aiohttp.ClientTimeout(total=5)) as r:
                info = await r.json()
            async with http.get(server.url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                page = await r.text()
            other, hello = await _connect(http, server)
            await other.close()
            blocking.release.set()
            await _chunk(ws)
            await ws.close()
            return info, page, hello

    info, page, hello = _run(scenario())
    assert info["streams"]["active"] == 1 and "<canvas" in page and hello["type"] == "hello"


def test_realtime_pace_stays_about_one_chunk_ahead(make_server):
    fps = 40
    server = make_server(pace="realtime", fps=fps)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": PROMPT_A})
            first, _ = await _chunk(ws)
            t0 = time.monotonic()
            frames = 0
            for _ in range(10):
                frames += (await _chunk(ws))[0]["frames"]
            elapsed = time.monotonic() - t0
            await ws.close()
            return first, frames, elapsed

    first, frames, elapsed = _run(scenario())
    # The tiny generator makes >100 frames/s; paced, 20 frames after the first chunk take ~ (20 - 2 lead) / 40 s.
    assert elapsed >= (frames - 2 * first["frames"]) / fps


def test_download_of_an_unknown_stream_and_cross_origin_sockets_are_refused(make_server):
    server = make_server()

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "download/nope.mp4") as r:
                status = r.status
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(server.url + "ws", origin="http://evil.example")
            ws, hello = await _connect(http, server)
            async with http.get(server.url + hello["download"].lstrip("/")) as r:
                empty = r.status
            await ws.close()
            return status, e.value.status, empty

    assert _run(scenario()) == (404, 403, 404)


def test_protocol_errors_are_answered(make_server):
    server = make_server()

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            replies = []
            for raw in ("not json", json.dumps([1]), json.dumps({"type": "dance"}),
                        json.dumps({"type": "prompt", "prompt": PROMPT_A})):
                await ws.send_str(raw)
                replies.append((await _json(ws, "error"))["message"])
            await ws.close()
            return replies

    replies = _run(scenario())
    assert "JSON" in replies[0] and "JSON" in replies[1] and "dance" in replies[2] and "start first" in replies[3]


def test_jpeg_frames_match_the_decoded_video(generator):
    """The streamed JPEG is the chunk's frame (4:4:4 at quality 90: a few levels of error on 8-bit values)."""
    from sfvideo.serve.server import encode_jpeg

    session = generator.new_session(0)
    session.start(generator.encode_prompt(PROMPT_A))
    frame = session.next_chunk().frames[0]
    decoded = np.asarray(Image.open(io.BytesIO(encode_jpeg(frame, 90))))
    assert decoded.shape == frame.shape
    assert np.abs(decoded.astype(int) - frame.astype(int)).mean() < 12


def test_a_stream_stops_at_its_length_limit(make_server):
    server = make_server(pace="max", fps=16, max_stream_s=0.25)  # 4 frames: two chunks of 2

    async def scenario():
        async with aiohttp.ClientSession() as http:
            ws, _ = await _connect(http, server)
            await ws.send_json({"type": "start", "prompt": PROMPT_A})
            chunks = []
            stopped = await _json(ws, "stopped", chunks=chunks)
            await ws.close()
            return chunks, stopped

    chunks, stopped = _run(scenario())
    assert stopped["reason"].startswith("length limit") and stopped["frames"] == 4
    assert [c["index"] for c in chunks] == [0, 1]
