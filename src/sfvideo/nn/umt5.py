"""umT5, Wan2.1's frozen text encoder, behind ``sfvideo.nn.interfaces.TextEncoder``.

Wan's conventions: 512 tokens, padding to max length, output rows beyond each prompt's true length set to zero
instead of passing a mask downstream.

Memory (Wan2.1): the umT5-XXL encoder is about 5.7B parameters, 11.4 GB in bf16 (22.7 GB in fp32). It is frozen,
so hold it in bf16 (``dtype``) with no fp32 master copy; with ``offload=True`` the weights live in CPU memory and
visit the compute device only during :meth:`UMT5TextEncoder.encode` (training needs it once per step, the negative
prompt never again after the first call since its embedding is cached). Precomputed embeddings
(``sfvideo.nn.prompt_embeddings``) remove it from training altogether.

The encoder is a plain object, not an ``nn.Module`` attribute of a LightningModule, on purpose: Lightning would
otherwise move it with the module, count it as trainable and write it into every checkpoint.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sfvideo.nn.interfaces import NEGATIVE_PROMPT, RecordsInitArgs, freeze
from sfvideo.nn.precision import parse_dtype

__all__ = ["UMT5TextEncoder", "clean_prompt"]


def clean_prompt(text: str) -> str:
    """Wan's ``clean="whitespace"`` prompt cleaning: unescape HTML (twice, as Wan does), collapse whitespace.

    Wan also runs ``ftfy.fix_text`` first; it is applied here when ftfy is installed.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder(RecordsInitArgs):
    """Frozen umT5 encoder with Wan's prompt conventions; implements ``sfvideo.nn.interfaces.TextEncoder``.

    Output of :meth:`encode` is ``(B, text_len, dim)``: each prompt is tokenized with EOS, padded to ``text_len``
    and encoded with the attention mask; rows at and beyond the prompt's token count are zero (Wan zeroes padding
    rather than handing a mask to the transformer's cross-attention).

    Args:
        path: a diffusers Wan folder (or hub id) holding ``text_encoder/`` and ``tokenizer/`` subfolders.
        text_encoder: overrides ``path`` for the model: a folder/hub id of a ``UMT5EncoderModel``, or an instance.
        tokenizer: overrides ``path`` for the tokenizer: a folder/hub id, or an instance.
        text_len: tokens per prompt after padding/truncation (Wan: 512).
        dtype: weight dtype; a frozen encoder is held in bf16 without fp32 masters (``"bf16"`` default).
        device: compute device for :meth:`encode` (outputs land here).
        offload: keep the weights on the CPU and move them to ``device`` only for the duration of each encode.
        negative_prompt: default string for :meth:`encode_negative`.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        text_encoder: str | os.PathLike | nn.Module | None = None,
        tokenizer: str | os.PathLike | Any | None = None,
        text_len: int = 512,
        dtype: torch.dtype | str = "bf16",
        device: str | torch.device = "cpu",
        offload: bool = False,
        negative_prompt: str = NEGATIVE_PROMPT,
    ) -> None:
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.text_len = text_len
        """Tokens per prompt after padding/truncation."""
        self.device = torch.device(device)
        """Compute device; embeddings are returned here."""
        self.offload = offload
        """Weights stay on the CPU between encodes."""
        self.negative_prompt = negative_prompt
        """Default string for :meth:`encode_negative`."""
        self.dtype = parse_dtype(dtype)
        self.model = freeze(self._load_model(path, text_encoder, self.dtype).to(self.dtype))
        self.model.to("cpu" if offload else self.device)
        self.tokenizer = self._load_tokenizer(path, tokenizer)
        self.dim = int(self.model.config.d_model)
        """Embedding width (4096 for umT5-XXL)."""
        self._negative_cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _load_model(path: str | os.PathLike | None, text_encoder: Any, dtype: torch.dtype) -> nn.Module:
        if isinstance(text_encoder, nn.Module):
            return text_encoder
        from transformers import UMT5EncoderModel

        if text_encoder is not None:
            return UMT5EncoderModel.from_pretrained(str(text_encoder), dtype=dtype)  # no fp32 detour
        if path is None:
            raise ValueError("UMT5TextEncoder: give path (a Wan diffusers folder) or text_encoder")
        return UMT5EncoderModel.from_pretrained(str(path), subfolder="text_encoder", dtype=dtype)

    @staticmethod
    def _load_tokenizer(path: str | os.PathLike | None, tokenizer: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        from transformers import AutoTokenizer

        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        if path is None:
            raise ValueError("UMT5TextEncoder: give path (a Wan diffusers folder) or tokenizer")
        return AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer")

    @contextmanager
    def _on_compute_device(self) -> Iterator[nn.Module]:
        """The model on the compute device; with offload it goes back to the CPU afterwards."""
        if not self.offload or self.device.type == "cpu":
            yield self.model
            return
        self.model.to(self.device)
        try:
            yield self.model
        finally:
            self.model.to("cpu")

    def to(self, device: str | torch.device) -> UMT5TextEncoder:
        """Change the compute device (weights follow unless offloaded); cached embeddings are moved too."""
        self.device = torch.device(device)
        if not self.offload:
            self.model.to(self.device)
        self._negative_cache = {k: v.to(self.device) for k, v in self._negative_cache.items()}
        return self

    @torch.no_grad()
    def encode_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, text_len, dim)`` with padding zeroed, and token counts ``(B,)`` (EOS included)."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string")
        texts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, text_len)
        mask = tokens["attention_mask"].to(self.device)  # (B, text_len), 1 for real tokens
        if ids.shape[1] != self.text_len:
            raise ValueError(f"tokenizer returned {ids.shape[1]} tokens, expected text_len={self.text_len}")
        with self._on_compute_device() as model:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, text_len, dim)
        # Wan zeroes every position past the prompt (masked_fill, not a product: padded rows may be non-finite).
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return hidden, mask.sum(dim=1)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, text_len, dim)`` embeddings of ``prompts``, padding zeroed (under ``no_grad``)."""
        return self.encode_with_lengths(prompts)[0]

    def encode_negative(self, prompt: str | None = None, batch_size: int = 1) -> torch.Tensor:
        """Embedding of the negative prompt, computed once per string and cached: ``(batch_size, text_len, dim)``."""
        prompt = self.negative_prompt if prompt is None else prompt
        if prompt not in self._negative_cache:
            self._negative_cache[prompt] = self.encode([prompt])
        return self._negative_cache[prompt].expand(batch_size, -1, -1)

    def clear_cache(self) -> None:
        """Drop cached negative-prompt embeddings."""
        self._negative_cache.clear()
