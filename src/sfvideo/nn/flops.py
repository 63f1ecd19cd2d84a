"""FLOP counts of the Wan transformer's forwards, from its config (no model, no tensors).

Counted as ``torch.utils.flop_counter`` counts them: 2 FLOPs per multiply-add of every matrix product (linear
layers, the patch-embedding convolution, both attention products), nothing for elementwise work (norms, RoPE,
modulation, softmax). ``tests/nn/test_flops.py`` checks the formula against ``FlopCounterMode`` on real forwards.

Per forward of ``Lq = frames * tokens_per_frame`` query tokens against ``Lk`` self-attention keys (the chunk plus
the cached view; ``Lk = Lq`` without a cache) and ``Lt`` text tokens, with width ``d``, FFN width ``m`` and
``N`` blocks::

    linear    = 2 Lq (p C_in) d + 2 Lq d (p C_out)                    patch embedding, head (p = patch volume)
              + N [ 2 Lq d^2 (4 self + 2 cross q/o) + 2 Lq d m 2 ]     per block
              + N 2 Lt d^2 2                                           cross k/v (0 when the text K/V are cached)
              + 2 Lt (t d + d^2)                                       text projection (0 when cached)
              + 2 F (f d + d^2 + 6 d^2)                                time embedding, per frame and sample
    attention = N [ 4 Lq Lk d + 4 Lq Lt d ]                            QK^T and AV, self and cross

all times the batch size. In a rolling stream the linear part is proportional to the tokens computed, the
attention part to queries x keys; that split is what bounds rolling vs. recomputing the window (``sfvideo bench``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward, by kind."""

    linear: float
    """Linear layers, patch embedding and head (proportional to the tokens computed)."""
    attention: float
    """The two attention products, self and cross (queries x keys)."""

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: ForwardFlops) -> ForwardFlops:
        return ForwardFlops(self.linear + other.linear, self.attention + other.attention)

    def scale(self, k: float) -> ForwardFlops:
        return ForwardFlops(self.linear * k, self.attention * k)


ZERO = ForwardFlops(0.0, 0.0)


def wan_forward_flops(
    config: Mapping[str, Any],
    *,
    frames: int,
    key_frames: int | None = None,
    tokens_per_frame: int,
    text_tokens: int,
    text_cached: bool = False,
    batch_size: int = 1,
) -> ForwardFlops:
    """FLOPs of one ``WanTransformer.forward`` (see the module docstring for the formula).

    Args:
        config: The transformer's config (``model.config``: heads, head width, FFN width, layers, channels,
            patch size, text and frequency widths).
        frames: Latent frames of the input (the chunk).
        key_frames: Frames the self-attention attends (cached view plus the chunk); None = ``frames``.
        tokens_per_frame: Tokens per latent frame (``VideoGeometry.tokens_per_frame``).
        text_tokens: Tokens of the prompt embeddings.
        text_cached: The KV cache holds the text K/V (every cached call after a prompt's first).
        batch_size: Samples per forward.
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    m, n_layers = int(config["ffn_dim"]), int(config["num_layers"])
    patch = math.prod(int(p) for p in config["patch_size"])
    lq = frames * tokens_per_frame
    lk = (frames if key_frames is None else key_frames) * tokens_per_frame
    lt = text_tokens
    linear = 2 * lq * (patch * int(config["in_channels"])) * d + 2 * lq * d * (patch * int(config["out_channels"]))
    linear += n_layers * (2 * lq * d * d * 6 + 2 * lq * d * m * 2)
    linear += 2 * frames * (int(config["freq_dim"]) * d + d * d + 6 * d * d)
    if not text_cached:
        linear += n_layers * 2 * lt * d * d * 2 + 2 * lt * (int(config["text_dim"]) * d + d * d)
    attention = n_layers * (4 * lq * lk * d + 4 * lq * lt * d)
    return ForwardFlops(float(linear * batch_size), float(attention * batch_size))
