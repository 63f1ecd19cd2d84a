"""Prompt embeddings computed once and stored on disk, and the text encoder that reads them.

``sfvideo encode-prompts`` (:func:`precompute_prompt_embeddings`) encodes every prompt of a file with umT5;
:class:`PrecomputedTextEncoder` serves them to training, which then need not hold the 5B encoder.

File layout (safetensors): ``embeddings`` ``(sum of lengths, dim)`` rows of all prompts back to back, trimmed to
each prompt's true length, and ``offsets`` ``(N + 1,)``; metadata holds ``format`` (:data:`EMBEDDINGS_FORMAT`), the
prompts (JSON), ``text_len`` and ``dim``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sfvideo.files import AtomicFile, read_prompt_file
from sfvideo.nn.interfaces import RecordsInitArgs

__all__ = [
    "EMBEDDINGS_FORMAT",
    "PrecomputedTextEncoder",
    "PromptEmbeddings",
    "load_prompt_embeddings",
    "precompute_prompt_embeddings",
]

EMBEDDINGS_FORMAT = "sfvideo.prompt_embeddings.v1"
"""Value of the ``format`` metadata key of an embeddings file."""


def _true_lengths(embeddings: torch.Tensor) -> torch.Tensor:
    """Per-row length of zero-padded embeddings ``(B, L, D)``: one past the last non-zero position."""
    nonzero = embeddings.ne(0).any(dim=-1)  # (B, L)
    positions = torch.arange(1, embeddings.shape[1] + 1, device=embeddings.device)
    return (nonzero * positions).amax(dim=1)


def precompute_prompt_embeddings(
    encoder: Any,
    prompts_file: str | os.PathLike,
    out_path: str | os.PathLike,
    batch_size: int = 16,
    *,
    extra_prompts: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Encode every prompt of a file once and store the embeddings, trimmed to each prompt's true length.

    Written through :class:`sfvideo.files.AtomicFile`, so an interrupted run never leaves a readable half file.

    Args:
        encoder: a ``TextEncoder``; ``encode_with_lengths`` is used when it has one, otherwise lengths are read
            off the zeroed padding.
        prompts_file: text file, one prompt per line (blank lines skipped).
        out_path: destination ``.safetensors`` file.
        batch_size: prompts per encoder call.
        extra_prompts: prompts added after the file's when not in it (e.g. the negative prompt of CFG).
        progress: show a progress bar.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompts = read_prompt_file(prompts_file)
    prompts += [p for p in dict.fromkeys(extra_prompts) if p not in prompts]
    rows: list[torch.Tensor] = []
    lengths: list[int] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=f"encoding {Path(prompts_file).name}", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        if hasattr(encoder, "encode_with_lengths"):
            emb, lens = encoder.encode_with_lengths(batch)
        else:
            with torch.no_grad():
                emb = encoder.encode(batch)
            lens = _true_lengths(emb)
        for row, n in zip(emb.detach().cpu(), lens.tolist(), strict=True):
            rows.append(row[:n])
            lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    metadata = {
        "format": EMBEDDINGS_FORMAT,
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "text_len": str(int(encoder.text_len)),
        "dim": str(int(encoder.dim)),
    }
    with AtomicFile(out_path, make_parents=True) as tmp:
        save_file({"embeddings": torch.cat(rows).contiguous(), "offsets": offsets}, str(tmp), metadata=metadata)
    return Path(out_path)


@dataclass
class PromptEmbeddings:
    """Prompt embeddings read by :func:`load_prompt_embeddings` (trimmed rows, zero-padded on request)."""

    prompts: list[str]
    embeddings: torch.Tensor
    """``(sum of lengths, dim)``: every prompt's rows back to back."""
    offsets: torch.Tensor
    """``(N + 1,)``: prompt i owns rows ``offsets[i]:offsets[i + 1]``."""
    text_len: int
    dim: int

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Trimmed embedding of one prompt, ``(length_i, dim)``."""
        start, stop = self.offsets[index].item(), self.offsets[index + 1].item()
        return self.embeddings[start:stop]

    def padded(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, text_len, dim)`` embeddings zero-padded as the encoder returned them (all prompts by default)."""
        indices = range(len(self)) if indices is None else indices
        out = self.embeddings.new_zeros(len(indices), self.text_len, self.dim)
        for row, i in enumerate(indices):
            emb = self[i]
            out[row, : emb.shape[0]] = emb
        return out


def load_prompt_embeddings(path: str | os.PathLike) -> PromptEmbeddings:
    """Read a file written by :func:`precompute_prompt_embeddings`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EMBEDDINGS_FORMAT:
                raise ValueError(f"{path}: not a prompt-embeddings file (format {metadata.get('format')!r})")
            embeddings, offsets = f.get_tensor("embeddings"), f.get_tensor("offsets")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - reader errors become one line naming the file
        raise ValueError(f"cannot read prompt embeddings {path}: {type(e).__name__}: {e}") from e
    return PromptEmbeddings(
        prompts=json.loads(metadata["prompts"]),
        embeddings=embeddings,
        offsets=offsets,
        text_len=int(metadata["text_len"]),
        dim=int(metadata["dim"]),
    )


class PrecomputedTextEncoder(RecordsInitArgs):
    """A :class:`~sfvideo.nn.interfaces.TextEncoder` over embeddings written by :func:`precompute_prompt_embeddings`,
    so training need not hold the 5B umT5 encoder. Unknown prompts fail with the file named; the negative prompt
    must be in the file too (``sfvideo encode-prompts --negative_prompt ...`` adds it).

    Args:
        path: the ``.safetensors`` file written by ``sfvideo encode-prompts``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.table = load_prompt_embeddings(path)
        self.text_len = self.table.text_len
        self.dim = self.table.dim
        self._index = {p: i for i, p in enumerate(self.table.prompts)}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"{self.path}: no precomputed embedding for prompt {missing[0]!r}")
        return self.table.padded([self._index[p] for p in prompts])
