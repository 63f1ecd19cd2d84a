"""The Wan2.1 text-to-video transformer with per-frame timesteps, block-causal attention and a KV cache.

One implementation serves the bidirectional teacher and critic, block-causal (diffusion forcing) and
teacher-forcing training, and chunk-by-chunk KV-cached generation (the Self Forcing rollout and inference);
the mode is an argument of :meth:`WanTransformer.forward`.

Layouts: latents are ``(B, F, C, H, W)`` at the public API (``sfvideo.geometry``); only the patch embedding
permutes to Conv3d's ``(B, C, F, H, W)``. Tokens are ``(B, L, D)`` with ``L = F * h * w`` in frame-major, row, column
order (``h = H / p_h``, ``w = W / p_w``); attention heads are ``(B, L, heads, head_dim)``. Timesteps are on Wan's
0..1000 scale, one per frame.

Constructor arguments and parameter names are those of diffusers' ``WanTransformer3DModel`` (0.42), so a
diffusers ``transformer/`` folder loads with ``from_pretrained`` and state dicts move 1:1 (T2V only). Differences
from it: per-frame modulation ``(B, F, 6, D)`` broadcast over each frame's tokens (the official causal model's
scheme; no per-token tensors), RoPE computed for any frame positions (``rope_max_seq_len`` is kept for config
compatibility only), and the time path runs entirely in fp32 (as the original Wan code does, including
``time_proj``, which diffusers runs in the activation dtype).

fp32 islands, declared once in ``FP32_MODULES``: time embedding and projection, modulation tables, layer norms
(and RMSNorms and RoPE, which compute in fp32 whatever the storage dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from sfvideo.geometry import check_chunking
from sfvideo.nn.attention import BACKENDS, build_mask, resolve_backend
from sfvideo.nn.attention import attention as attend
from sfvideo.nn.kv_cache import CacheStep, GradMode, KVCache
from sfvideo.nn.rope import apply_rope, rope_axis_dims, rope_cos_sin, rope_table

AttentionMode = Literal["bidirectional", "block_causal", "teacher_forcing"]
ATTENTION_MODES: tuple[str, ...] = ("bidirectional", "block_causal", "teacher_forcing")

FP32_MODULES: tuple[str, ...] = ("time_embedder", "time_proj", "scale_shift_table", "norm1", "norm2", "norm3")
"""Parameter-name fragments kept and computed in fp32 (diffusers' ``_keep_in_fp32_modules`` matching)."""

FLAVORS: dict[str, dict[str, Any]] = {
    # Tiny, for CPU tests: 2 layers, 2 heads x 16, 4 latent channels.
    "debug": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
        ffn_dim=64, num_layers=2,
    ),
    # Small, for the toy world on CPU (configs/toy): 3 layers, 4 heads x 64. 48 latent channels = the toy codec's
    # pixel-unshuffle by 4 of RGB, so a 1x2x2 patch holds 192 values: the width (256) must exceed that, or the flow
    # output (which carries the per-pixel noise) cannot be represented. text_dim 32 = the toy text encoder's width.
    "toy": dict(
        num_attention_heads=4, attention_head_dim=64, in_channels=48, out_channels=48, text_dim=32, freq_dim=64,
        ffn_dim=512, num_layers=3,
    ),
    # Wan2.1-T2V-1.3B: dim 1536 = 12 x 128.
    "1.3B": dict(
        num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=30,
    ),
    # Wan2.1-T2V-14B: dim 5120 = 40 x 128.
    "14B": dict(
        num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=13824, num_layers=40,
    ),
}  # fmt: skip


# -------------------------------------------------------------------------------------------------------------------
# 1. Building blocks (parameter names as in diffusers)
# -------------------------------------------------------------------------------------------------------------------


def _fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer computed in fp32 whatever the storage dtype (fp32 island)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm (Wan's q/k norm across all heads) computed in fp32, result in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


def timestep_sinusoid(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(N,)`` timesteps -> ``(N, dim)`` fp32 ``[cos(t w_j), sin(t w_j)]``, ``w_j = max_period^(-j / (dim/2))``.

    Same arithmetic (fp32) as diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class WanTimestepEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear (``time_embedder.linear_1/linear_2``), fp32."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32_linear(self.linear_2, self.act(_fp32_linear(self.linear_1, x)))


class WanTextProjection(nn.Module):
    """Linear -> GELU(tanh) -> Linear (``text_embedder.linear_1/linear_2``), in the activation dtype."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class WanConditionEmbedder(nn.Module):
    """Time embedding and modulation projection (fp32), and the text projection."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = WanTimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = WanTextProjection(text_dim, dim)

    def time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, F)`` timesteps -> ``temb (B, F, D)`` and block modulation ``(B, F, 6, D)``, both fp32."""
        temb = self.time_embedder(timestep_sinusoid(timestep.flatten(), self.freq_dim))  # (B*F, D)
        e0 = _fp32_linear(self.time_proj, self.act_fn(temb))  # (B*F, 6D)
        batch, frames = timestep.shape
        return temb.view(batch, frames, -1), e0.view(batch, frames, 6, -1)


class GELUProj(nn.Module):
    """Linear followed by tanh-GELU (``ffn.net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class WanFeedForward(nn.Module):
    """``net = [GELUProj, Dropout, Linear]`` (keys ``ffn.net.0.proj``, ``ffn.net.2``)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, ffn_dim), nn.Dropout(0.0), nn.Linear(ffn_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


@dataclass
class _AttnPlan:
    """Per-forward self-attention setup shared by all layers (passed explicitly, never stored on modules)."""

    backend: str
    rope_q: tuple[torch.Tensor, torch.Tensor]
    """``(cos, sin)``, each ``(Lq, D/2)``: RoPE of the queries (and of the keys without cache)."""
    rope_k: tuple[torch.Tensor, torch.Tensor] | None = None
    """RoPE of the attended cache view (``kv_cache`` only)."""
    mask: Any = None
    """Boolean ``(L, L)`` tensor or flex ``BlockMask``; ``None`` = unmasked."""
    kv_cache: KVCache | None = None
    step: CacheStep | None = None


class WanAttention(nn.Module):
    """Multi-head attention with Wan's q/k RMSNorm across heads (``to_q/to_k/to_v/to_out.0/norm_q/norm_k``)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = FP32RMSNorm(dim, eps=eps)
        self.norm_k = FP32RMSNorm(dim, eps=eps)

    def _kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(source)).unflatten(2, (self.heads, -1))  # (B, Lk, H, Dh)
        v = self.to_v(source).unflatten(2, (self.heads, -1))
        return k, v

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        return self.to_out[1](self.to_out[0](out.flatten(2)))

    def self_attention(self, x: torch.Tensor, plan: _AttnPlan, layer: int) -> torch.Tensor:
        """``(B, L, D)`` -> ``(B, L, D)``; masked full-sequence attention, or chunk vs. cached view."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))  # (B, L, H, Dh)
        k, v = self._kv(x)
        q = apply_rope(q, *plan.rope_q)
        if plan.kv_cache is None:
            k = apply_rope(k, *plan.rope_q)
            out = attend(q, k, v, plan.mask, backend=plan.backend)
        else:
            # Keys are cached before RoPE; rotate the whole view with positions relative to the view.
            k_view, v_view = plan.kv_cache.attend(layer, k, v, plan.step)
            out = attend(q, apply_rope(k_view, *plan.rope_k), v_view, None, backend=plan.backend)
        return self._out(out)

    def cross_attention(
        self, x: torch.Tensor, text: torch.Tensor | None, kv_cache: KVCache | None, layer: int, backend: str
    ) -> torch.Tensor:
        """``(B, L, D)`` queries against the text tokens ``(B, L_text, D)`` (no RoPE, no mask, as Wan)."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        cached = kv_cache.get_cross(layer) if kv_cache is not None else None
        if text is None:  # the model decided the cache is usable
            k, v = cached
        else:
            k, v = self._kv(text)
            if kv_cache is not None and not torch.is_grad_enabled():
                kv_cache.set_cross(layer, k, v)
        return self._out(attend(q, k.to(q.dtype), v.to(q.dtype), None, backend=backend))


class WanBlock(nn.Module):
    """Wan transformer block: adaLN self-attention, cross-attention, adaLN FFN, modulated per frame."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.attn2 = WanAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = WanFeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None,
        e0: torch.Tensor,
        plan: _AttnPlan,
        layer: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """Args:
        x: ``(B, Fx * T, D)`` tokens of ``Fx`` frames of ``T`` tokens each.
        text: ``(B, L_text, D)`` projected text, or ``None`` when the cross-attention cache is used.
        e0: ``(B, Fx, 6, D)`` fp32 per-frame modulation from the time embedding.
        plan: Self-attention setup of this forward.
        layer: Index of this block (for the cache).
        kv_cache: The cache (cross-attention part), or ``None``.
        """
        frames = e0.shape[1]
        # (1, 1, 6, D) + (B, Fx, 6, D) -> six (B, Fx, 1, D) tensors, broadcast over each frame's tokens.
        mod = (self.scale_shift_table.float().unsqueeze(0) + e0).chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod

        def per_frame(t: torch.Tensor) -> torch.Tensor:  # (B, Fx*T, D) -> (B, Fx, T, D)
            return t.unflatten(1, (frames, -1))

        # 1. Self-attention
        h = (per_frame(self.norm1(x.float())) * (1 + scale_msa) + shift_msa).flatten(1, 2).type_as(x)
        a = self.attn1.self_attention(h, plan, layer)
        x = (per_frame(x.float()) + per_frame(a) * gate_msa).flatten(1, 2).type_as(x)
        # 2. Cross-attention
        h = self.norm2(x.float()).type_as(x)
        cross_backend = "sdpa" if plan.backend == "flex" else plan.backend  # unmasked: no BlockMask needed
        x = x + self.attn2.cross_attention(h, text, kv_cache, layer, cross_backend)
        # 3. Feed-forward
        h = (per_frame(self.norm3(x.float())) * (1 + scale_ffn) + shift_ffn).flatten(1, 2).type_as(x)
        f = self.ffn(h)
        return (per_frame(x.float()) + per_frame(f.float()) * gate_ffn).flatten(1, 2).type_as(x)


# -------------------------------------------------------------------------------------------------------------------
# 2. The model
# -------------------------------------------------------------------------------------------------------------------


class WanTransformer(ModelMixin, ConfigMixin):
    """Wan2.1 T2V transformer with per-frame timesteps, block-causal / teacher-forcing masks and a KV cache.

    Constructor arguments are diffusers' ``WanTransformer3DModel``'s (see there); ``image_dim``,
    ``added_kv_proj_dim`` and ``pos_embed_seq_len`` (I2V) are not supported. ``rope_max_seq_len`` is accepted and
    ignored (RoPE is computed for any position).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanBlock"]
    _keep_in_fp32_modules = list(FP32_MODULES)
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if image_dim is not None or added_kv_proj_dim is not None or pos_embed_seq_len is not None:
            raise NotImplementedError(
                "WanTransformer is text-to-video only: image_dim / added_kv_proj_dim / pos_embed_seq_len (I2V) "
                "are not supported"
            )
        if qk_norm not in ("rms_norm_across_heads", None):
            raise NotImplementedError(f"WanTransformer: qk_norm={qk_norm!r} (only 'rms_norm_across_heads')")
        if len(patch_size) != 3 or patch_size[0] != 1:
            raise ValueError(f"WanTransformer: patch_size must be (1, p_h, p_w) (per-frame caching), got {patch_size}")
        rope_axis_dims(attention_head_dim)  # validates the head split early
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = WanConditionEmbedder(dim, freq_dim, text_dim)
        self.blocks = nn.ModuleList(
            [WanBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

        self.gradient_checkpointing = False
        self.attention_backend: str = "auto"
        """Kernel: "auto" (by device/dtype/availability), "sdpa", "flex" or "flash" (nn/attention.py)."""

    def set_attention_backend(self, backend: str) -> None:
        """Select the attention kernel: "auto", "sdpa", "flex" or "flash" (see ``nn/attention.py``)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {backend!r}")
        self.attention_backend = backend

    @classmethod
    def from_flavor(cls, name: str, **overrides: Any) -> WanTransformer:
        """Randomly initialised model of a named size (``FLAVORS``), with config overrides."""
        if name not in FLAVORS:
            raise ValueError(f"unknown Wan flavor {name!r}; choose from {sorted(FLAVORS)}")
        return cls(**{**FLAVORS[name], **overrides})

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of activations (the patch embedding's); fp32 islands such as ``scale_shift_table`` stay fp32."""
        return self.patch_embedding.weight.dtype

    @property
    def dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens per latent frame of size ``height x width``."""
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def new_kv_cache(
        self,
        batch_size: int,
        tokens_per_frame: int,
        capacity_frames: int,
        *,
        sink_frames: int = 0,
        window_frames: int | None = None,
        grad_mode: GradMode = "truncate",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` sized for this model (buffers allocated on first use unless dtype/device
        are given; they default to the activations')."""
        return KVCache(
            num_layers=self.config.num_layers,
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            batch_size=batch_size,
            tokens_per_frame=tokens_per_frame,
            capacity_frames=capacity_frames,
            sink_frames=sink_frames,
            window_frames=window_frames,
            grad_mode=grad_mode,
            dtype=dtype,
            device=device,
        )

    def time_embedding(self, timestep: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """Per-frame time embedding ``temb (B, F, D)`` fp32 (Wan's ``e`` before the modulation projection), for
        ``timestep`` ``(B,)`` or ``(B, F)`` on the 0..1000 scale; the GAN head may concatenate it (official
        ``concat_time_embeddings``)."""
        return self.condition_embedder.time(self._frame_timesteps(timestep, batch, frames, "timestep"))[0]

    # -- helpers -------------------------------------------------------------------------------------------------

    def _frame_timesteps(self, timestep: torch.Tensor, batch: int, frames: int, name: str) -> torch.Tensor:
        """``(B,)`` or ``(B, F)`` -> ``(B, F)`` float."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.as_tensor(timestep)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        device = self.patch_embedding.weight.device
        if timestep.ndim == 1 and timestep.shape[0] == batch:
            return timestep[:, None].expand(batch, frames).to(device=device, dtype=torch.float32)
        if timestep.ndim == 2 and tuple(timestep.shape) == (batch, frames):
            return timestep.to(device=device, dtype=torch.float32)
        raise ValueError(f"{name} must have shape ({batch},) or ({batch}, {frames}), got {tuple(timestep.shape)}")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, H, W)`` -> tokens ``(B, F*h*w, D)`` in the activation (parameter) dtype."""
        w = self.patch_embedding.weight
        tokens = self.patch_embedding(x.permute(0, 2, 1, 3, 4).to(w.dtype))  # (B, D, F, h, w)
        return tokens.flatten(2).transpose(1, 2).contiguous()

    def _needs_cross_grad(self, context: torch.Tensor) -> bool:
        """Whether this call must recompute text K/V with gradient instead of using cached ones."""
        if not torch.is_grad_enabled():
            return False
        cross_params = (self.condition_embedder.text_embedder.linear_1.weight, self.blocks[0].attn2.to_k.weight)
        return context.requires_grad or any(p.requires_grad for p in cross_params)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        attention: AttentionMode = "bidirectional",
        frames_per_chunk: int = 1,
        window_frames: int | None = None,
        clean_x: torch.Tensor | None = None,
        clean_timestep: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        return_block_features: tuple[int, ...] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Flow prediction for a latent video or chunk.

        Args:
            x: ``(B, F, C, H, W)`` noisy latents (with ``kv_cache``: one chunk).
            timestep: ``(B,)`` or ``(B, F)`` on Wan's 0..1000 scale; one timestep per frame.
            context: ``(B, L_text, text_dim)`` text embeddings.
            attention: ``"bidirectional"`` (teacher, critic), ``"block_causal"`` (diffusion forcing: bidirectional
                within chunks of ``frames_per_chunk``, causal across) or ``"teacher_forcing"`` (``clean_x`` as
                context). Ignored with ``kv_cache`` except that ``"teacher_forcing"`` is refused.
            frames_per_chunk: Chunk size of the masks. With ``kv_cache``, if not 1 it must equal ``F``.
            window_frames: Each query chunk sees only keys within the last ``window_frames`` frames ending at its
                chunk end (chunk-aligned); with ``kv_cache`` overrides the cache's window. ``None`` = no limit.
            clean_x: ``(B, F, C, H, W)`` clean context for teacher forcing; same RoPE positions as ``x``.
            clean_timestep: ``(B,)`` or ``(B, F)`` timestep of ``clean_x`` (default 0).
            kv_cache: Streaming cache; ``x`` is one chunk starting at absolute stream frame ``start_frame``.
            start_frame: Absolute frame of ``x[:, 0]`` in the stream (``kv_cache`` only).
            return_block_features: 0-based indices of blocks whose output hidden states to return as well (the GAN
                discriminator's features, ``sfvideo.nn.discriminator``; official ``wan/modules/model.py::_forward``
                with ``classify_mode`` reads blocks 13, 21, 29 of the 30-block 1.3B). ``None`` (default) returns the
                flow alone and costs nothing.

        Returns:
            ``(B, F, C_out, H, W)`` flow prediction, in ``x.dtype``; with ``return_block_features`` the pair
            ``(flow, features)``, ``features[i]`` the tokens ``(B, F * h * w, D)`` after block
            ``return_block_features[i]`` in the activation dtype (with ``teacher_forcing``: the noisy half only).
        """
        if x.ndim != 5:
            raise ValueError(f"x must be (B, F, C, H, W), got shape {tuple(x.shape)}")
        batch, frames, channels, height, width = x.shape
        _, p_h, p_w = self.config.patch_size
        if channels != self.config.in_channels:
            raise ValueError(f"x has {channels} channels, model in_channels={self.config.in_channels}")
        if height % p_h or width % p_w:
            raise ValueError(f"x latent size {height}x{width} is not divisible by patch {p_h}x{p_w}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.config.text_dim:
            raise ValueError(
                f"context must be ({batch}, L_text, {self.config.text_dim}), got shape {tuple(context.shape)}"
            )
        if return_block_features is not None:
            bad = [i for i in return_block_features if not 0 <= int(i) < self.config.num_layers]
            if bad or len(return_block_features) == 0:
                raise ValueError(
                    f"return_block_features={tuple(return_block_features)}: need block indices in "
                    f"[0, {self.config.num_layers}) (num_layers={self.config.num_layers})"
                )
        grid_h, grid_w = height // p_h, width // p_w
        tpf = grid_h * grid_w
        head_dim = self.config.attention_head_dim
        t = self._frame_timesteps(timestep, batch, frames, "timestep")

        # 1. Tokens and per-frame time conditioning.
        tokens = self._embed(x)  # (B, F*tpf, D)
        temb, e0 = self.condition_embedder.time(t)  # (B, F, D), (B, F, 6, D) fp32
        masked = kv_cache is None and attention != "bidirectional"
        backend = resolve_backend(self.attention_backend, x.device, tokens.dtype, masked)
        if window_frames is not None and kv_cache is None and attention == "bidirectional":
            raise ValueError("window_frames needs attention='block_causal' or 'teacher_forcing' (or a kv_cache)")

        # 2. Self-attention plan for this mode.
        num_tokens = frames * tpf
        if kv_cache is not None:
            if attention == "teacher_forcing":
                raise ValueError("teacher_forcing cannot be combined with kv_cache")
            if frames_per_chunk != 1 and frames != frames_per_chunk:
                raise ValueError(
                    f"with kv_cache x must be one chunk: got {frames} frames, frames_per_chunk={frames_per_chunk}"
                )
            if kv_cache.tokens_per_frame != tpf or kv_cache.batch_size != batch:
                raise ValueError(
                    f"kv_cache was built for batch {kv_cache.batch_size} x {kv_cache.tokens_per_frame} tokens/frame, "
                    f"x gives {batch} x {tpf}"
                )
            step = kv_cache.begin_chunk(start_frame, frames, window_frames)
            view_len = step.view_frames
            cos, sin = rope_table(view_len, grid_h, grid_w, head_dim, x.device)  # shared, read-only
            # Queries are the last `frames` frames of the view.
            plan = _AttnPlan(backend, (cos[-num_tokens:], sin[-num_tokens:]), (cos, sin), None, kv_cache, step)
        else:
            if start_frame != 0:
                raise ValueError("start_frame is only meaningful with kv_cache")
            if attention != "bidirectional":
                try:
                    check_chunking(frames, frames_per_chunk, what="num_frames (x.shape[1])")
                except ValueError as err:
                    raise ValueError(f"frames_per_chunk={frames_per_chunk}: {err}") from None
            rope = rope_cos_sin(range(frames), grid_h, grid_w, head_dim, device=x.device)
            mask = None
            if masked:
                kind = "block" if backend == "flex" else "bool"
                mask = build_mask(attention, frames, tpf, frames_per_chunk, window_frames, x.device, kind)
            if attention == "teacher_forcing":
                if clean_x is None or clean_x.shape != x.shape:
                    got = None if clean_x is None else tuple(clean_x.shape)
                    raise ValueError(f"teacher_forcing needs clean_x of shape {tuple(x.shape)}, got {got}")
                if clean_timestep is None:
                    clean_timestep = torch.zeros(batch, device=x.device)
                t_clean = self._frame_timesteps(clean_timestep, batch, frames, "clean_timestep")
                _, e0_clean = self.condition_embedder.time(t_clean)
                # [clean | noisy] on the token and frame axes; both halves get the same RoPE positions.
                tokens = torch.cat([self._embed(clean_x), tokens], dim=1)  # (B, 2*F*tpf, D)
                e0 = torch.cat([e0_clean, e0], dim=1)  # (B, 2F, 6, D)
                rope = (torch.cat([rope[0], rope[0]]), torch.cat([rope[1], rope[1]]))
            elif clean_x is not None or clean_timestep is not None:
                raise ValueError("clean_x / clean_timestep are only used with attention='teacher_forcing'")
            plan = _AttnPlan(backend, rope, None, mask)

        # 3. Text: projected once per forward unless every layer can use cached text K/V.
        use_cross_cache = (
            kv_cache is not None
            and kv_cache.cross_ready()
            and not self._needs_cross_grad(context)
            and kv_cache.cross_k[0].shape[:2] == context.shape[:2]
        )
        text = None if use_cross_cache else self.condition_embedder.text_embedder(context.to(tokens.dtype))

        # 4. Transformer blocks (optionally checkpointed; cache writes are idempotent under recompute).
        two_halves = attention == "teacher_forcing" and kv_cache is None
        wanted = frozenset(int(i) for i in return_block_features) if return_block_features is not None else ()
        features: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, text, e0, plan, layer, kv_cache)
            else:
                tokens = block(tokens, text, e0, plan, layer, kv_cache)
            if layer in wanted:
                features[layer] = tokens[:, num_tokens:] if two_halves else tokens
        if two_halves:
            tokens = tokens[:, num_tokens:]  # only the noisy half goes to the head

        # 5. Head: per-frame shift/scale from temb, projection, unpatchify.
        shift, scale = (self.scale_shift_table.float().unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        h = self.norm_out(tokens.float()).unflatten(1, (frames, tpf)) * (1 + scale) + shift  # (B, F, tpf, D)
        out = self.proj_out(h.flatten(1, 2).type_as(tokens))  # (B, F*tpf, p_t*p_h*p_w*C_out)
        # (B, F, h, w, p_t, p_h, p_w, C) -> (B, F, p_t, C, h, p_h, w, p_w) -> (B, F, C, H, W)  (p_t = 1)
        out = out.reshape(batch, frames, grid_h, grid_w, 1, p_h, p_w, -1)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(batch, frames, -1, height, width)
        if return_block_features is None:
            return out.to(x.dtype)
        return out.to(x.dtype), tuple(features[int(i)] for i in return_block_features)


__all__ = ["ATTENTION_MODES", "BACKENDS", "FLAVORS", "FP32_MODULES", "KVCache", "WanTransformer"]
