"""Prompt schedules: which prompt is in force from which latent frame.

A schedule is ``[(start_frame, prompt), ...]`` starting at frame 0 with switches on chunk boundaries (checked by
``sfvideo.inference.stream.check_context_schedule`` once the chunk size and length are known). Written as
``"0:a red circle ...;42:a blue square ..."`` or as a file of ``FRAME: prompt`` lines, or of plain lines spread
evenly over the video. Errors are one-line ``ValueError``s naming the entry or file.
"""

from __future__ import annotations

import os

from sfvideo.files import read_prompt_file

PromptSchedule = list[tuple[int, str]]
"""``[(start_frame, prompt), ...]``."""


def parse_prompt_schedule(text: str) -> PromptSchedule:
    """``"0:text;42:text"`` -> ``[(0, "text"), (42, "text")]`` (latent frames)."""
    entries: PromptSchedule = []
    for part in text.split(";"):
        if not part.strip():
            continue
        frame, sep, prompt = part.partition(":")
        if not sep:
            raise ValueError(f"prompt schedule entry {part.strip()!r} is not FRAME:PROMPT")
        try:
            start = int(frame.strip())
        except ValueError:
            entry, number = part.strip(), frame.strip()
            raise ValueError(f"prompt schedule entry {entry!r}: {number!r} is not a frame number") from None
        entries.append((start, prompt.strip()))
    if not entries:
        raise ValueError("the prompt schedule is empty")
    return check_prompts(entries)


def read_prompt_schedule(path: str | os.PathLike, num_frames: int, frames_per_chunk: int) -> PromptSchedule:
    """A prompts file: ``FRAME: prompt`` lines, or plain lines spread evenly over the video (chunk-aligned)."""
    lines = read_prompt_file(path)
    framed = [ln.partition(":")[0].strip().isdigit() for ln in lines]
    if all(framed):
        return parse_prompt_schedule(";".join(lines))
    if any(framed):
        raise ValueError(f"{path}: mixes FRAME:prompt lines and plain lines")
    num_chunks = num_frames // frames_per_chunk
    if len(lines) > num_chunks:
        raise ValueError(f"{path}: {len(lines)} prompts for only {num_chunks} chunks")
    return [(i * num_chunks // len(lines) * frames_per_chunk, p) for i, p in enumerate(lines)]


def check_prompts(schedule: PromptSchedule) -> PromptSchedule:
    """Raise a one-line ``ValueError`` on an empty prompt; returns the schedule."""
    for frame, prompt in schedule:
        if not prompt.strip():
            raise ValueError(f"empty prompt (at latent frame {frame})")
    return schedule
