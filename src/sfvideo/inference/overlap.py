"""Decoding chunks on a worker thread (on CUDA: on its own stream), so a chunk decodes while the next is denoised.

:class:`DecodeWorker` decodes the chunks handed to it, one at a time and in order, on one thread, each with the
stream decoder it came with: a stream decoder's causal state is only touched there while the session overlaps, so
the frames are those of the same decoder calls on the same inputs as a serial decode. ``GenerationSession.next_chunk``
drives it (the only place a chunk is decoded); at most one decode is in flight and one denoised chunk waits, so
memory stays flat.

Threads and devices: PyTorch releases the GIL inside its kernels, so on a CPU the decode and the transformer run
on different cores (each with ``torch.get_num_threads()`` intra-op threads: it pays when the cores are there,
:func:`overlap_pays`). On CUDA the worker issues the decoder's kernels on a side stream that waits for the
transformer's output (an event) and is synchronised by the worker, so the transformer's stream keeps going.

Workers are kept by the engine (:class:`DecodeWorkerPool`) and reused by its sessions: kernel libraries keep
per-thread state (oneDNN's primitives on a CPU, cuDNN/cuBLAS handles on CUDA), so a fresh thread's first decode
pays a one-time set-up (measured: 0.35 s for a tiny TAEHV on this CPU) that a reused thread does not.

Shutdown: a session hands its worker back on ``close()``, on an exception in ``next_chunk`` (also
``KeyboardInterrupt``), on an error in the worker and when it is garbage collected; handing back lets the decode in
flight finish (a kernel cannot be interrupted) and drops queued ones, so no decode of an ended stream runs on. The
threads are daemons (an interpreter exit never waits for them) and end with their engine.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import torch

from sfvideo.inference.stream import DecodedChunk, StreamChunk


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def overlap_pays(device: torch.device) -> bool:
    """Whether decoding on a worker while the next chunk is denoised is expected to be faster.

    CUDA: yes (a side stream fills the transformer's idle gaps and hides the decoder's host work). CPU: when the
    process has the cores for two sets of ``torch.get_num_threads()`` intra-op threads (else both compete for the
    same cores). Other devices: no.
    """
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return available_cores() >= 2 * torch.get_num_threads()
    return False


class _Job:
    """One chunk handed to the worker, and its result."""

    def __init__(self, decoder: Any, chunk: StreamChunk, ready: Any, generation: int) -> None:
        self.decoder, self.chunk, self.ready, self.generation = decoder, chunk, ready, generation
        self.done = threading.Event()
        self.frames: torch.Tensor | None = None
        self.decode_s = 0.0
        self.error: BaseException | None = None


class DecodeWorker:
    """Decodes chunks on a daemon thread, in submission order (see the module docstring).

    Args:
        device: Where the chunks' latents are (a CUDA device gets a side stream).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._generation = 0  # jobs of an earlier generation are dropped (a session handed the worker back)
        self.thread = threading.Thread(target=self._run, name="sfvideo-decode", daemon=True)
        """The worker thread (a daemon named ``sfvideo-decode``)."""
        self.thread.start()

    # ------------------------------------------------------------------ the session's thread
    def submit(self, decoder: Any, chunk: StreamChunk) -> _Job:
        """Queue ``chunk`` for ``decoder`` (a ``StreamDecoder``); returns the job to :meth:`result` later."""
        if not self.alive:
            raise RuntimeError("DecodeWorker.submit: the worker thread has stopped")
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        job = _Job(decoder, chunk, ready, self._generation)
        self._jobs.put(job)
        return job

    def result(self, job: _Job) -> tuple[DecodedChunk, float]:
        """Wait for ``job``; returns its :class:`DecodedChunk` and the seconds waited. Re-raises the worker's error."""
        t0 = time.perf_counter()
        while not job.done.wait(0.1):  # a timed wait, so Ctrl-C reaches the main thread promptly
            if not self.alive:
                raise RuntimeError("the decode worker stopped before finishing a chunk")
        waited = time.perf_counter() - t0
        if job.error is not None:
            raise job.error
        frames = job.frames
        if self._cuda and frames is not None:
            # The caller's stream uses (and may free) the frames made on the side stream.
            frames.record_stream(torch.cuda.current_stream(self.device))
        return DecodedChunk(chunk=job.chunk, frames=frames, decode_s=job.decode_s, decode_wait_s=waited), waited

    def drain(self) -> None:
        """Drop the queued jobs, let the one in flight finish, and wait until the worker is idle (on the worker's
        own thread -- a garbage collection there may run a session's finalizer -- only drop them)."""
        self._generation += 1
        if threading.current_thread() is not self.thread:
            self._jobs.join()

    def close(self) -> None:
        """:meth:`drain`, then stop and join the thread (idempotent)."""
        if self.alive:
            self.drain()
            self._jobs.put(None)
            if self.thread is not threading.current_thread():
                self.thread.join()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def busy(self) -> bool:
        """Jobs queued or in flight."""
        return self._jobs.unfinished_tasks > 0

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if job.generation != self._generation:
                    job.error = RuntimeError("the decode was dropped: its session handed the worker back")
                else:
                    self._decode(job)
            except BaseException as e:  # handed to the session's thread by result()
                job.error = e
            finally:
                if job is not None:
                    job.decoder = job.ready = None  # the worker keeps no decoder state of a finished job
                    job.done.set()
                self._jobs.task_done()

    def _decode(self, job: _Job) -> None:
        latents = job.chunk.latents
        with torch.no_grad():  # grad mode is per thread
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(job.ready)
                    latents.record_stream(self._stream)  # made on the caller's stream, read on this one
                    t0 = time.perf_counter()
                    frames = job.decoder.decode_chunk(latents)
                    self._stream.synchronize()
            else:
                t0 = time.perf_counter()
                frames = job.decoder.decode_chunk(latents)
        job.decode_s = time.perf_counter() - t0
        job.frames = frames


class DecodeWorkerPool:
    """Idle :class:`DecodeWorker` s of one device, lent to sessions (one each) and taken back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._idle: list[DecodeWorker] = []
        self._lock = threading.Lock()

    def take(self) -> DecodeWorker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    return worker
        return DecodeWorker(self.device)

    def give_back(self, worker: DecodeWorker) -> None:
        """Take a worker back once idle (its queued jobs dropped, the one in flight finished)."""
        worker.drain()
        if worker.alive:
            with self._lock:
                self._idle.append(worker)

    @property
    def idle(self) -> tuple[DecodeWorker, ...]:
        """The workers not lent to a session."""
        with self._lock:
            return tuple(self._idle)

    def close(self) -> None:
        """Stop every idle worker."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()
