"""The ``sfvideo serve`` web server (aiohttp): the page, one WebSocket per viewer, and mp4 downloads.

Routes: ``GET /`` the page (``static/``, plain HTML/JS/CSS), ``GET /api/info`` the generator and the stream slots
as JSON, ``GET /ws`` the viewer's WebSocket, ``GET /download/<token>.mp4`` what that viewer has been streamed.

WebSocket protocol (JSON text messages unless stated):

- client -> server: ``{"type": "start", "prompt": ...}``, ``{"type": "prompt", "prompt": ...}`` (switch at the
  next chunk), ``{"type": "stop"}``;
- server -> client: ``hello`` (token, download path, generator, slots), ``started`` (prompt, seed), ``switching``
  (the accepted prompt, used from the next chunk on), ``error`` (``message``; ``field: "prompt"`` for a rejected
  prompt), ``busy`` (every stream slot is taken), ``stopped`` (reason, frames), and one **binary** message per
  frame, sent as soon as it is JPEG-encoded: a 4-byte big-endian header length, the UTF-8 JSON header (chunk
  ``index``, ``part`` of ``frames``, prompt ``segment``, ``recached``, the stream's figures), then the JPEG.

Why JPEG frames (measured in docs/serve.md): each frame is encoded on its own in about a millisecond and shown the
moment it arrives; a fragmented-mp4 stream saves bytes, which a loopback or LAN viewer does not need, and costs
encoder and MediaSource buffering latency.

Concurrency: the event loop only moves messages. Every chunk is generated and decoded by
``StreamSession.next_chunk`` and every frame JPEG-encoded in a worker thread (one per stream slot; a stream has
one job at a time), the recording's H.264 encoding in another,
so the page and other viewers stay responsive. A viewer holds a slot from ``start`` until its stream ends; a
``start`` with every slot taken is answered ``busy`` at once. When a viewer stops or disconnects, its stream
ends after the chunk in flight (it cannot be interrupted mid-forward): then its cache is freed, its slot released
and, on disconnect, its recording deleted.

Pacing (``pace="realtime"``): a stream is kept at most one chunk ahead of the viewer's playback at ``fps``, so a
prompt switch shows within about two chunks and a fast generator does not burn the device for frames nobody
sees; ``pace="max"`` generates as fast as it can (the page drops frames it cannot keep up with).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import shutil
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from sfvideo.serve.recording import Recording, new_recording
from sfvideo.serve.session import PromptError, ServeGenerator, StreamSession

logger = logging.getLogger("sfvideo.serve")

STATIC = Path(str(resources.files("sfvideo.serve") / "static"))
PACES = ("realtime", "max")


@dataclass(frozen=True)
class ServeSettings:
    """How the server streams (the ``sfvideo serve`` flags)."""

    max_streams: int = 1
    """Streams generated at once; more viewers get a busy message."""
    fps: int = 16
    """Playback frame rate of the page and of the mp4 (Wan2.1's 16)."""
    pace: str = "realtime"
    """``realtime``: stay one chunk ahead of playback; ``max``: generate as fast as possible."""
    jpeg_quality: int = 90
    """JPEG quality of the streamed frames (1-95)."""
    max_stream_s: float = 600.0
    """A stream stops after this many seconds of video (0: never)."""
    seed: int | None = None
    """Seed of every stream (None: a fresh random seed per stream, reported to the page)."""

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"--max_streams must be at least 1, got {self.max_streams}")
        if self.fps < 1:
            raise ValueError(f"--fps must be positive, got {self.fps}")
        if self.pace not in PACES:
            raise ValueError(f"--pace must be one of {', '.join(PACES)}, got {self.pace!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"--jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.max_stream_s < 0:
            raise ValueError(f"--max_stream_s must be >= 0, got {self.max_stream_s}")


def encode_jpeg(frame: Any, quality: int) -> bytes:
    """``(H, W, 3)`` uint8 -> JPEG bytes. Small frames keep full-resolution colour (4:4:4): at the toy world's
    32x32, 4:2:0 subsampling smears an 8-pixel object's colour into the background."""
    from PIL import Image

    buf = io.BytesIO()
    small = min(frame.shape[0], frame.shape[1]) < 256
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=quality, subsampling=0 if small else 2)
    return buf.getvalue()


def pack_frame(header: dict[str, Any], jpeg: bytes) -> bytes:
    """The binary frame message: header length (u32 big-endian), the JSON header, the JPEG image."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack(">I", len(head)), head, jpeg])


def unpack_frame(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack_frame` (tests and tools)."""
    (n,) = struct.unpack(">I", message[:4])
    return json.loads(message[4 : 4 + n]), message[4 + n :]


class StreamSlots:
    """At most ``limit`` streams at once (used from the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)


@dataclass
class StreamStats:
    """Figures of one stream, sent with every chunk."""

    started: float
    """``perf_counter`` at the start request."""
    first_chunk_s: float | None = None
    frames: int = 0
    chunks: int = 0
    switches: int = 0
    transformer_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0

    @property
    def fps(self) -> float:
        """Generation throughput: frames per second of transformer + decode time (pacing waits excluded)."""
        busy = self.transformer_s + self.decode_s
        return self.frames / busy if busy > 0 else 0.0


@dataclass
class Viewer:
    """One browser connection."""

    token: str
    ws: web.WebSocketResponse
    session: StreamSession | None = None
    recording: Recording | None = None
    task: asyncio.Task | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = "stopped"
    stats: StreamStats | None = None
    record_job: asyncio.Future | None = None

    @property
    def streaming(self) -> bool:
        return self.task is not None and not self.task.done()


class StreamServer:
    """The aiohttp application around a :class:`ServeGenerator`.

    Args:
        generator: The loaded generator (shared by every stream).
        settings: Streaming settings.
        workdir: Where recordings live (a private temporary folder by default; removed on shutdown).
    """

    def __init__(self, generator: ServeGenerator, settings: ServeSettings | None = None,
                 workdir: str | Path | None = None) -> None:
        self.generator = generator
        self.settings = settings or ServeSettings()
        self.slots = StreamSlots(self.settings.max_streams)
        self.viewers: dict[str, Viewer] = {}
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="sfvideo-serve-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.executor = ThreadPoolExecutor(self.settings.max_streams, thread_name_prefix="sfvideo-stream")
        self.record_executor = ThreadPoolExecutor(1, thread_name_prefix="sfvideo-record")
        self._info = generator.describe()

    # -------------------------------------------------------------- the app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/info", self._api_info)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/download/{token}.mp4", self._download)
        app.router.add_static("/static/", STATIC, append_version=True)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {"generator": self._info, "streams": {"active": self.slots.active, "limit": self.slots.limit},
                "fps": s.fps, "pace": s.pace, "max_stream_s": s.max_stream_s}

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _api_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info())

    async def _download(self, request: web.Request) -> web.StreamResponse:
        viewer = self.viewers.get(request.match_info["token"])
        if viewer is None:
            raise web.HTTPNotFound(text="no such stream (it ended when its page was closed)")
        if viewer.record_job is not None:
            await asyncio.shield(viewer.record_job)  # frames already sent to the page are in the file
        recording = viewer.recording
        path = await asyncio.get_running_loop().run_in_executor(None, recording.snapshot) if recording else None
        if path is None:
            raise web.HTTPNotFound(text="nothing streamed yet")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return web.FileResponse(path, headers={
            "Content-Type": "video/mp4", "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="sfvideo-{stamp}.mp4"'})

    # -------------------------------------------------------------- one viewer
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            raise web.HTTPForbidden(text="cross-origin WebSocket refused")  # another site in the viewer's browser
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 16)
        await ws.prepare(request)
        viewer = Viewer(token=secrets.token_urlsafe(12), ws=ws)
        self.viewers[viewer.token] = viewer
        await self._send(viewer, {"type": "hello", "token": viewer.token,
                                  "download": f"/download/{viewer.token}.mp4", **self.info()})
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(viewer, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._send(viewer, {"type": "error", "message": "binary messages are not understood"})
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            viewer.stop_reason = "disconnected"
            await self._end_stream(viewer)
            if viewer.recording is not None:
                viewer.recording.close()
                viewer.recording = None
            self.viewers.pop(viewer.token, None)
        return ws

    async def _send(self, viewer: Viewer, message: dict[str, Any]) -> None:
        if viewer.ws.closed:
            return
        try:
            await viewer.ws.send_json(message)
        except (ConnectionError, RuntimeError):  # the page went away mid-send
            viewer.stop.set()

    async def _on_message(self, viewer: Viewer, data: str) -> None:
        try:
            message = json.loads(data)
            kind = message.get("type")
        except (json.JSONDecodeError, AttributeError):
            await self._send(viewer, {"type": "error", "message": "messages must be JSON objects"})
            return
        if kind == "start":
            await self._start(viewer, message.get("prompt"))
        elif kind == "prompt":
            await self._switch(viewer, message.get("prompt"))
        elif kind == "stop":
            if viewer.streaming:
                viewer.stop_reason = "stopped"
                viewer.stop.set()
        else:
            await self._send(viewer, {"type": "error", "message": f"unknown message type {kind!r}"})

    async def _prompt(self, viewer: Viewer, text: Any) -> Any:
        """Checked and encoded prompt, or None after telling the page why not."""
        try:
            norm = self.generator.check_prompt(text)
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.generator.encode_prompt,
                                                                    norm)
        except PromptError as e:
            await self._send(viewer, {"type": "error", "field": "prompt", "message": str(e)})
            return None

    async def _start(self, viewer: Viewer, text: Any) -> None:
        if viewer.streaming:
            await self._send(viewer, {"type": "error", "message": "already streaming: send a prompt to switch, "
                                                                  "or stop first"})
            return
        try:
            self.generator.check_prompt(text)
        except PromptError as e:
            await self._send(viewer, {"type": "error", "field": "prompt", "message": str(e)})
            return
        if not self.slots.try_acquire():
            n = self.slots.limit
            await self._send(viewer, {"type": "busy", "message": (
                f"The server is busy: {'its one stream is' if n == 1 else f'all {n} streams are'} in use. "
                f"Try again when {'it ends' if n == 1 else 'one ends'}.")})
            return
        try:
            stats = StreamStats(started=time.perf_counter())
            prompt = await self._prompt(viewer, text)
            if prompt is None or viewer.ws.closed:
                self.slots.release()
                return
            seed = self.settings.seed if self.settings.seed is not None else secrets.randbelow(2**31)
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(self.executor, self.generator.new_session, seed)
        except BaseException:
            self.slots.release()
            raise
        if viewer.ws.closed:  # the page left while the stream was being set up
            session.close()
            self.slots.release()
            return
        session.start(prompt)
        if viewer.recording is not None:
            viewer.recording.close()  # a new stream, a new video
        viewer.recording = new_recording(self.workdir, fps=self.settings.fps)
        viewer.session, viewer.stats, viewer.stop = session, stats, asyncio.Event()
        viewer.stop_reason = "stopped"
        logger.info("stream %s started (seed %d, %d/%d streams): %r", viewer.token[:6], seed, self.slots.active,
                    self.slots.limit, prompt.text)
        await self._send(viewer, {"type": "started", "prompt": prompt.text, "seed": seed})
        viewer.task = asyncio.create_task(self._stream(viewer))

    async def _switch(self, viewer: Viewer, text: Any) -> None:
        if not viewer.streaming or viewer.session is None:
            await self._send(viewer, {"type": "error", "message": "not streaming: start first"})
            return
        session = viewer.session
        prompt = await self._prompt(viewer, text)
        if prompt is None or not viewer.streaming:
            return
        session.switch(prompt)
        await self._send(viewer, {"type": "switching", "prompt": prompt.text})

    async def _end_stream(self, viewer: Viewer) -> None:
        """Stop the viewer's stream and wait for it to free its slot (after the chunk in flight)."""
        viewer.stop.set()
        if viewer.task is not None:
            await asyncio.shield(viewer.task)

    # -------------------------------------------------------------- streaming
    def _encode(self, frame: Any) -> tuple[bytes, float]:
        t0 = time.perf_counter()
        return encode_jpeg(frame, self.settings.jpeg_quality), time.perf_counter() - t0

    async def _stream(self, viewer: Viewer) -> None:
        loop = asyncio.get_running_loop()
        s, stats = self.settings, viewer.stats
        max_frames = int(s.max_stream_s * s.fps) if s.max_stream_s else None
        first_sent: float | None = None
        lead_s = 0.0
        try:
            while not viewer.stop.is_set():
                if s.pace == "realtime" and first_sent is not None:
                    # Playback of what was sent ends at first_sent + frames / fps; stay one chunk ahead of it.
                    delay = first_sent + stats.frames / s.fps - lead_s - time.perf_counter()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(viewer.stop.wait(), timeout=delay)
                            break
                        except TimeoutError:
                            pass
                try:
                    chunk = await loop.run_in_executor(self.executor, viewer.session.next_chunk)
                except Exception as e:  # noqa: BLE001 - the viewer gets one line, the log the traceback
                    logger.exception("stream %s failed", viewer.token[:6])
                    await self._send(viewer, {"type": "error", "message": f"generation failed: {type(e).__name__}: "
                                                                          f"{str(e).splitlines()[0][:200]}"})
                    viewer.stop_reason = "error"
                    break
                now = time.perf_counter()
                t_ready_ms = time.time() * 1000.0
                n = len(chunk.frames)
                if stats.first_chunk_s is None:
                    stats.first_chunk_s = now - stats.started
                    first_sent = now
                stats.chunks += 1
                stats.frames += n
                stats.switches += chunk.recached
                stats.transformer_s += chunk.transformer_s
                stats.decode_s += chunk.decode_s
                lead_s = n / s.fps
                header = {"type": "frame", "index": chunk.index, "frames": n, "segment": chunk.segment,
                          "prompt": chunk.prompt, "recached": chunk.recached, "transformer_s": chunk.transformer_s,
                          "recache_s": chunk.recache_s, "decode_s": chunk.decode_s, "t_ready_ms": t_ready_ms,
                          "total_frames": stats.frames, "first_chunk_s": stats.first_chunk_s, "fps": stats.fps,
                          "switches": stats.switches}
                # One message per frame, each sent as soon as it is encoded: the page shows the chunk's first
                # frame without waiting for the others to be encoded, sent and decoded.
                sent = True
                for part, frame in enumerate(chunk.frames):
                    jpeg, encode_s = await loop.run_in_executor(self.executor, self._encode, frame)
                    stats.encode_s += encode_s
                    if viewer.ws.closed:
                        sent = False
                        break
                    try:
                        await viewer.ws.send_bytes(pack_frame({**header, "part": part, "encode_s": encode_s}, jpeg))
                    except (ConnectionError, RuntimeError):
                        sent = False
                        break
                if not sent:
                    break
                frames = chunk.frames
                if viewer.record_job is not None:
                    await asyncio.shield(viewer.record_job)  # keep the recording in order, one job at a time
                viewer.record_job = loop.run_in_executor(self.record_executor, viewer.recording.write, frames)
                if max_frames is not None and stats.frames >= max_frames:
                    viewer.stop_reason = f"length limit ({s.max_stream_s:g} s of video)"
                    break
        finally:
            if viewer.record_job is not None:
                try:
                    await asyncio.shield(viewer.record_job)
                except Exception:  # noqa: BLE001 - a failed recording must not keep the slot
                    logger.exception("recording of stream %s failed", viewer.token[:6])
            if viewer.session is not None:
                viewer.session.close()
                viewer.session = None
            self.slots.release()
            logger.info("stream %s ended (%s) after %d frames, %.2f fps, first chunk %s s", viewer.token[:6],
                        viewer.stop_reason, stats.frames, stats.fps,
                        f"{stats.first_chunk_s:.3f}" if stats.first_chunk_s is not None else "-")
            await self._send(viewer, {"type": "stopped", "reason": viewer.stop_reason, "frames": stats.frames})

    # -------------------------------------------------------------- shutdown
    async def _on_shutdown(self, app: web.Application) -> None:
        for viewer in list(self.viewers.values()):
            viewer.stop_reason = "server shutting down"
            viewer.stop.set()
            await viewer.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _on_cleanup(self, app: web.Application) -> None:
        for viewer in list(self.viewers.values()):
            if viewer.task is not None:
                await asyncio.shield(viewer.task)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.record_executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
