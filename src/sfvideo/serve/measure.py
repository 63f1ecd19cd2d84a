"""Which frame encoding for the live view: JPEG frames against fragmented-mp4 H.264, by latency (docs/serve.md).

    python -m sfvideo.serve.measure                       # encoders only, toy (32x32) and Wan (832x480) frames
    python -m sfvideo.serve.measure --browser --json m.json   # + delivery through the real page in headless Chromium

Encoders, per frame size, on one synthetic clip (a moving square over a drifting gradient with mild noise, so
neither codec sees a trivial or a random image):

- **JPEG** (Pillow, the server's settings): encode milliseconds per frame and bytes per frame. A frame is on the
  wire as soon as it is encoded and shown as soon as it is decoded: its latency is its encode + decode time.
- **H.264 for fragmented mp4** (PyAV/libx264), in two settings: ``ultrafast`` + ``zerolatency`` (the lowest-latency
  H.264 there is: no B-frames, no lookahead, one packet per frame in) and the recording's ``veryfast`` CRF 18. For
  each: encode milliseconds per frame, and how many frames the encoder holds back before the first packet comes
  out (lookahead/B-frame delay: at 16 fps each held frame is 62.5 ms). A MediaSource player adds its own
  buffering on top, which is not measured here.

``--browser``: the real server and page on 127.0.0.1 with a synthetic session (the adapter's interface, no
model), ``pace=realtime``; the page reports, per chunk, the milliseconds from "chunk ready on the server" to
its first frame and all its frames decoded in the page (JPEG encode, WebSocket, JPEG decode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from fractions import Fraction
from typing import Any

import numpy as np


def synthetic_clip(height: int, width: int, frames: int, seed: int = 0) -> np.ndarray:
    """``(T, H, W, 3)`` uint8: a square moving over a drifting colour gradient, plus noise of std 3 levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        phase = t / max(frames, 1)
        img = np.stack([120 + 80 * np.sin(2 * np.pi * (x / width + phase)),
                        100 + 60 * np.cos(2 * np.pi * (y / height - phase)),
                        np.full_like(x, 90 + 40 * phase)], -1)
        cx = int((width - side) * (0.5 + 0.45 * np.sin(2 * np.pi * phase)))
        cy = int((height - side) * (0.5 + 0.45 * np.cos(2 * np.pi * phase)))
        img[cy : cy + side, cx : cx + side] = (230, 40, 40)
        img += rng.normal(0, 3, img.shape)
        out[t] = img.clip(0, 255).astype(np.uint8)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def measure_jpeg(clip: np.ndarray, quality: int) -> dict[str, Any]:
    from PIL import Image

    from sfvideo.serve.server import encode_jpeg

    encode_jpeg(clip[0], quality)  # warm-up (imports, tables)
    times, sizes, decode = [], [], []
    import io

    for frame in clip:
        t0 = time.perf_counter()
        data = encode_jpeg(frame, quality)
        times.append(1e3 * (time.perf_counter() - t0))
        sizes.append(len(data))
        t0 = time.perf_counter()
        Image.open(io.BytesIO(data)).load()
        decode.append(1e3 * (time.perf_counter() - t0))
    return {"codec": f"JPEG q{quality}", **_summary(times), "held_frames": 0,
            "bytes_per_frame": int(statistics.mean(sizes)), "decode_median_ms": statistics.median(decode)}


def measure_h264(clip: np.ndarray, fps: int, options: dict[str, str], label: str) -> dict[str, Any]:
    """libx264 into a fragmented mp4 in memory: per-frame encode time and the frames held before the first packet."""
    import io

    import av

    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4",
                        options={"movflags": "frag_keyframe+empty_moov+default_base_moof"})
    h, w = clip.shape[1] - clip.shape[1] % 2, clip.shape[2] - clip.shape[2] % 2
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.codec_context.time_base = Fraction(1, fps)
    stream.options = options
    times, held, first_packet_at = [], 0, None
    for i, img in enumerate(clip):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:h, :w]), format="rgb24")
        frame.pts = i
        t0 = time.perf_counter()
        packets = stream.encode(frame)
        times.append(1e3 * (time.perf_counter() - t0))
        for p in packets:
            container.mux(p)
        if packets and first_packet_at is None:
            first_packet_at = i
        if first_packet_at is None:
            held += 1
    for p in stream.encode(None):
        container.mux(p)
    container.close()
    return {"codec": label, **_summary(times[1:]), "held_frames": held,
            "bytes_per_frame": int(len(buf.getvalue()) / len(clip))}


class SyntheticGenerator:
    """The adapter's interface (``ServeGenerator``) over a fixed clip: transport measurements without a model."""

    def __init__(self, clip: np.ndarray, frames_per_chunk: int) -> None:
        self.clip, self.f = clip, frames_per_chunk

    def describe(self) -> dict[str, Any]:
        h, w = self.clip.shape[1:3]
        return {"source": "synthetic clip", "device": "cpu", "dtype": "uint8", "frame_height": h, "frame_width": w,
                "latent_frames_per_chunk": self.f, "window_frames": 0, "sink_frames": 0, "max_prompt_chars": 100,
                "max_words": None, "vocabulary": None, "examples": []}

    def check_prompt(self, text: Any) -> str:
        return " ".join(str(text).split())

    def encode_prompt(self, text: str) -> Any:
        from sfvideo.serve.session import Prompt

        return Prompt(self.check_prompt(text), None)

    def new_session(self, seed: int) -> Any:
        from sfvideo.serve.session import ChunkFrames

        outer = self

        class Session:
            chunks_done = 0

            def start(self, prompt):
                self.prompt = prompt

            def switch(self, prompt):
                self.prompt = prompt

            def next_chunk(self):
                i, f, n = self.chunks_done, outer.f, len(outer.clip)
                frames = outer.clip[[(i * f + j) % n for j in range(f)]]
                self.chunks_done += 1
                return ChunkFrames(index=i, start_frame=i * f, frames=frames, latents=None, segment=0,
                                   prompt=self.prompt.text, recached=False, transformer_s=0.0, recache_s=0.0,
                                   decode_s=1e-9)

            def close(self):
                pass

        return Session()


def measure_browser(clip: np.ndarray, frames_per_chunk: int, fps: int, chunks: int) -> dict[str, Any]:
    """Chunk ready on the server -> all its frames decoded in the page, through headless Chromium."""
    import shutil
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from sfvideo.serve.command import bind, serve
    from sfvideo.serve.server import ServeSettings, StreamServer

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise SystemExit("--browser needs Debian's chromium and chromium-driver (make browser)")
    server = StreamServer(SyntheticGenerator(clip, frames_per_chunk), ServeSettings(fps=fps))
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    import asyncio

    loop = asyncio.new_event_loop()
    stop: dict[str, asyncio.Event] = {}

    async def main() -> None:
        stop["event"] = asyncio.Event()
        await serve(server, sock, stop=stop["event"], handle_signals=False)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        deadline = time.monotonic() + 30
        while "Ready" not in driver.find_element(By.ID, "status").text and time.monotonic() < deadline:
            time.sleep(0.05)
        driver.find_element(By.ID, "prompt").send_keys("measure", Keys.ENTER)
        values: dict[str, list[float]] = {"firstFrameMs": [], "deliveryMs": []}
        deadline = time.monotonic() + 30 + 2 * chunks * frames_per_chunk / fps
        while len(values["deliveryMs"]) < chunks and time.monotonic() < deadline:
            values = driver.execute_script("return window.sfvideo")
            time.sleep(0.1)
    finally:
        driver.quit()
        loop.call_soon_threadsafe(stop["event"].set)
        thread.join(30)
    # The first chunk pays for the page's decoder start-up: left out.
    first, whole = values["firstFrameMs"][1:], values["deliveryMs"][1:]
    return {"path": "JPEG over WebSocket, decoded in Chromium", "chunks": len(whole),
            "first_frame": _summary(first), "whole_chunk": _summary(whole)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m sfvideo.serve.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32x32:3,480x832:12",
                   help="HxW:frames_per_chunk,... (toy 32x32 with 3-frame chunks; Wan 480x832 with 12).")
    p.add_argument("--frames", type=int, default=48, help="Frames per encoder measurement.")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (the server's default).")
    p.add_argument("--browser", action="store_true", help="Also measure delivery through headless Chromium.")
    p.add_argument("--chunks", type=int, default=20, help="Chunks per browser measurement.")
    p.add_argument("--json", default=None, help="Write the results here.")
    args = p.parse_args(argv)
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results: dict[str, Any] = {"machine": f"{cpu}, {os.cpu_count()} CPUs",
                               "load_average_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
                               "fps": args.fps, "sizes": []}
    print(f"{results['machine']}, load average {results['load_average_1min']:.1f}, {results['date']}")
    for spec in args.sizes.split(","):
        size, _, f = spec.partition(":")
        h, w = (int(v) for v in size.split("x"))
        clip = synthetic_clip(h, w, args.frames)
        rows = [measure_jpeg(clip, args.quality),
                measure_h264(clip, args.fps, {"preset": "ultrafast", "tune": "zerolatency"},
                             "H.264 ultrafast zerolatency"),
                measure_h264(clip, args.fps, {"preset": "veryfast", "crf": "18"}, "H.264 veryfast crf18")]
        entry: dict[str, Any] = {"height": h, "width": w, "frames_per_chunk": int(f or 1), "encoders": rows}
        if args.browser:
            entry["browser"] = measure_browser(clip, int(f or 1), args.fps, args.chunks)
        results["sizes"].append(entry)
        print(f"\n{w}x{h} frames ({args.frames} frames, {args.fps} fps)")
        print(f"  {'codec':30s} {'encode ms (median / p95)':>26s} {'held frames':>12s} {'bytes/frame':>12s}")
        for r in rows:
            print(f"  {r['codec']:30s} {r['median_ms']:12.2f} / {r['p95_ms']:<11.2f} {r['held_frames']:12d} "
                  f"{r['bytes_per_frame']:12d}")
        if "browser" in entry:
            b = entry["browser"]
            print(f"  page delivery over {b['chunks']} chunks of {entry['frames_per_chunk']} frames, ready on the "
                  f"server -> decoded in the page: first frame median {b['first_frame']['median_ms']:.1f} ms "
                  f"(p95 {b['first_frame']['p95_ms']:.1f}), whole chunk median {b['whole_chunk']['median_ms']:.1f} "
                  f"ms (p95 {b['whole_chunk']['p95_ms']:.1f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
