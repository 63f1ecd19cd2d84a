"""GAN discriminator head over the critic transformer's intermediate features (Self Forcing's SF-GAN, notes §4.4).

The discriminator is the critic (``WanTransformer``, bidirectional) plus this head. The critic's forward returns the
hidden states after chosen blocks (``forward(..., return_block_features=blocks)``); per chosen block one learnable,
RMS-normed **register token** cross-attends to that block's tokens and passes an FFN; the per-block results are
concatenated and mapped to logits by ``LayerNorm -> Linear -> SiLU -> Linear``:

    r_i = RMSNorm(register_i)                                             (1, D)  register token of block b_i
    t_i = r_i + CrossAttn(q = r_i, kv = LN_affine(h_{b_i}))               (B, 1, D)
    u_i = t_i + FFN(LN(t_i))                                              (B, 1, D)
    logits = Linear(SiLU(Linear(LN([u_1, ..., u_n (, s temb)]))))          (B, num_classes)

Official code (faithful, with the literals made config): ``utils/wan_wrapper.py::WanDiffusionWrapper
.adding_cls_branch`` (3 registers, head ``LayerNorm(3 D [+ D]) -> Linear(.., 1536) -> SiLU -> Linear(1536,
num_class)``, "hard coded for WAN2.1-T2V-1.3B": D = 1536), ``wan/modules/model.py::RegisterTokens`` (``randn * 0.02``,
``WanRMSNorm(eps=1e-6)``), ``GanAttentionBlock`` (``norm3`` affine LayerNorm on the hidden states, residual on the
token, ``norm2`` non-affine LayerNorm before a ``Linear -> GELU(tanh) -> Linear`` FFN of width 8192, 12 heads),
``WanGanCrossAttention`` (q/k RMSNorm across heads, unmasked, no RoPE) and ``WanModel._forward(classify_mode=True)``
(features after blocks ``[13, 21, 29]``; with ``concat_time_embeddings`` the time embedding ``e`` scaled by 10 is
appended as a fourth token). Here every size comes from the transformer's config (``from_transformer``); the block
indices and the FFN width are arguments (the official values are the 1.3B recipe's config, not library defaults).

Single-device module: no sharding or precision policy here; the head computes in its parameter dtype, with the
layer norms in fp32 (the same islands as ``nn/wan.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sfvideo.nn.attention import resolve_backend
from sfvideo.nn.wan import FP32LayerNorm, FP32RMSNorm, WanAttention, WanTransformer


class RegisterTokens(nn.Module):
    """``num_tokens`` learnable tokens ``(N, D)``, RMS-normed on read (official ``RegisterTokens``)."""

    def __init__(self, num_tokens: int, dim: int, *, eps: float = 1e-6, init_std: float = 0.02) -> None:
        super().__init__()
        if num_tokens <= 0 or dim <= 0:
            raise ValueError(f"RegisterTokens: num_tokens and dim must be positive, got {num_tokens}, {dim}")
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * init_std)
        self.norm = FP32RMSNorm(dim, eps=eps)

    def forward(self) -> torch.Tensor:
        """The normed tokens ``(N, D)`` in the parameter dtype."""
        return self.norm(self.tokens)


class RegisterAttentionBlock(nn.Module):
    """A register token cross-attends to one block's hidden states, then an FFN (official ``GanAttentionBlock``).

    Args:
        dim: Model width D.
        num_heads: Attention heads (D must divide).
        ffn_dim: FFN hidden width.
        eps: Norm epsilon.
        hidden_norm_affine: Affine LayerNorm on the hidden states (official ``cross_attn_norm=True``).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, eps: float = 1e-6, hidden_norm_affine: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RegisterAttentionBlock: dim={dim} is not divisible by num_heads={num_heads}")
        self.norm_hidden = FP32LayerNorm(dim, eps, elementwise_affine=hidden_norm_affine)  # official norm3
        self.attn = WanAttention(dim, num_heads, eps)  # to_q/to_k/to_v/to_out + q/k RMSNorm across heads
        self.norm_ffn = FP32LayerNorm(dim, eps, elementwise_affine=False)  # official norm2
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, hidden: torch.Tensor, token: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
        """``hidden (B, L, D)``, ``token (B, 1, D)`` -> ``(B, 1, D)``.

        ``WanAttention.cross_attention`` takes queries from its first argument and keys/values from its second,
        which is exactly the official ``WanGanCrossAttention`` (q from the register token, k/v from the tokens).
        """
        t = token + self.attn.cross_attention(token, self.norm_hidden(hidden), None, 0, backend)
        return t + self.ffn(self.norm_ffn(t))


class DiscriminatorHead(nn.Module):
    """Register-token classifier over the hidden states of chosen transformer blocks.

    Args:
        dim: Width D of the transformer's tokens.
        num_heads: Heads of each register cross-attention.
        feature_blocks: Transformer block indices whose hidden states are read, one register token each, in this
            order (pass the same tuple to ``WanTransformer.forward(return_block_features=...)``). The official 1.3B
            recipe uses ``(13, 21, 29)``.
        ffn_dim: FFN width of the register blocks (official: 8192 for the 1.3B critic).
        num_classes: Logits per sample (official ``num_class``); the GAN losses average over them.
        concat_time_embedding: Append ``time_embedding_scale * temb`` as an extra token before the classifier
            (official ``concat_time_embeddings``, default off).
        time_embedding_scale: Scale of the appended time embedding (official: 10).
        eps: Norm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feature_blocks: Sequence[int],
        ffn_dim: int,
        *,
        num_classes: int = 1,
        concat_time_embedding: bool = False,
        time_embedding_scale: float = 10.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        blocks = tuple(int(b) for b in feature_blocks)
        if not blocks:
            raise ValueError("DiscriminatorHead: feature_blocks is empty (give the transformer blocks to read)")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"DiscriminatorHead: feature_blocks {blocks} has duplicates")
        if num_classes <= 0:
            raise ValueError(f"DiscriminatorHead: num_classes must be positive, got {num_classes}")
        self.dim = dim
        self.feature_blocks = blocks
        self.concat_time_embedding = concat_time_embedding
        self.time_embedding_scale = time_embedding_scale
        self.attention_backend = "auto"
        """Kernel of the register cross-attention (see ``nn/attention.py``)."""
        self.registers = RegisterTokens(len(blocks), dim, eps=eps)
        self.blocks = nn.ModuleList(
            [RegisterAttentionBlock(dim, num_heads, ffn_dim, eps=eps) for _ in blocks]
        )
        width = dim * (len(blocks) + int(concat_time_embedding))
        # Official: LayerNorm(3 D [+ D]) -> Linear(.., D) -> SiLU -> Linear(D, num_class) (D = 1536 literally there).
        self.classifier = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, dim), nn.SiLU(), nn.Linear(dim, num_classes)
        )

    @classmethod
    def from_transformer(
        cls,
        transformer: WanTransformer,
        feature_blocks: Sequence[int],
        *,
        ffn_dim: int | None = None,
        num_classes: int = 1,
        concat_time_embedding: bool = False,
        time_embedding_scale: float = 10.0,
    ) -> DiscriminatorHead:
        """A head sized from ``transformer.config``: width, heads and epsilon; ``ffn_dim`` defaults to the
        transformer's own (the official 8192 must be passed explicitly). Block indices are validated."""
        cfg = transformer.config
        bad = [b for b in feature_blocks if not 0 <= int(b) < cfg.num_layers]
        if bad:
            raise ValueError(
                f"DiscriminatorHead: feature_blocks {tuple(feature_blocks)} outside [0, {cfg.num_layers}) "
                f"(the transformer has num_layers={cfg.num_layers})"
            )
        return cls(
            transformer.dim,
            cfg.num_attention_heads,
            feature_blocks,
            ffn_dim if ffn_dim is not None else cfg.ffn_dim,
            num_classes=num_classes,
            concat_time_embedding=concat_time_embedding,
            time_embedding_scale=time_embedding_scale,
            eps=cfg.eps,
        )

    def forward(self, features: Sequence[torch.Tensor], temb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)``.

        Args:
            features: Hidden states ``(B, L, D)`` of ``feature_blocks``, in that order (the second output of
                ``WanTransformer.forward(..., return_block_features=head.feature_blocks)``).
            temb: Time embedding ``(B, D)`` (``transformer.time_embedding(t, B, F)[:, 0]`` for a bidirectional
                critic); needed only with ``concat_time_embedding``.
        """
        if len(features) != len(self.blocks):
            raise ValueError(f"DiscriminatorHead: got {len(features)} feature tensors for blocks {self.feature_blocks}")
        batch = features[0].shape[0]
        registers = self.registers()  # (N, D)
        dtype = registers.dtype
        backend = resolve_backend(self.attention_backend, registers.device, dtype, masked=False)
        pooled = []
        for i, (block, hidden) in enumerate(zip(self.blocks, features, strict=True)):
            if hidden.ndim != 3 or hidden.shape[0] != batch or hidden.shape[2] != self.dim:
                raise ValueError(f"DiscriminatorHead: features[{i}] must be ({batch}, L, {self.dim}), got "
                                 f"{tuple(hidden.shape)}")  # fmt: skip
            token = registers[i : i + 1].unsqueeze(0).expand(batch, 1, self.dim)  # (B, 1, D)
            pooled.append(block(hidden.to(dtype), token, backend))
        if self.concat_time_embedding:
            if temb is None or tuple(temb.shape) != (batch, self.dim):
                got = None if temb is None else tuple(temb.shape)
                raise ValueError(
                    f"DiscriminatorHead: concat_time_embedding needs temb ({batch}, {self.dim}), got {got}"
                )
            pooled.append(self.time_embedding_scale * temb.to(dtype)[:, None, :])
        return self.classifier(torch.cat(pooled, dim=1).flatten(1))  # (B, n D) -> (B, num_classes)
