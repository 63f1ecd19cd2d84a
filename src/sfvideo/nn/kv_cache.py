"""Explicit KV cache for chunk-by-chunk (streaming) generation with the causal Wan transformer.

The cache is an object the caller creates (``WanTransformer.new_kv_cache``), passes to every ``forward`` and resets;
nothing is stored on the model. It holds, per transformer layer:

- self-attention K/V buffers ``(B, capacity_frames * tokens_per_frame, H, D)`` in the activation dtype, organised in
  frame *slots*. Slot ``j`` holds absolute stream frame ``frame_ids[j]``; slots are always in stream order.
- cross-attention (text) K/V, computed once per prompt (see "Cross-attention" below).

Bookkeeping is python ints only (no ``.item()``, no host sync, nothing for ``torch.compile`` to break on).

Write rule (one model call = one chunk of ``n`` frames at absolute ``start_frame``):
    The cache represents the stream up to ``end_frame``. A call at ``start_frame <= end_frame`` first drops the
    held frames ``>= start_frame`` and then writes the chunk after the remaining ones. So calling again at the same
    ``start_frame`` overwrites that chunk's slot (the denoising steps, then the clean refresh), and
    ``start_frame == end_frame`` appends. When the buffer is full, the oldest frames after the first
    ``sink_frames`` are evicted; sink frames never move and the rest stay contiguous and in order.

Read rule:
    The chunk's queries attend to ``[visible cached frames ; the chunk's own live K/V]``. The chunk's own K/V are
    the live tensors of this call, never read back from the buffer, so the write can be skipped on recompute.
    Visible cached frames: all held frames before ``start_frame``, limited by ``window_frames = W`` to the sink
    frames plus frames ``>= start_frame + n - W`` (keys within the last ``W`` frames ending at the chunk end, as
    the official ``local_attn_size``). Without eviction, ``W`` is the paper's "last chunk cannot see the first"
    training trick.

RoPE:
    Keys are cached *before* RoPE; the model rotates the attended view with positions relative to the view
    (sink frames ``0..s-1``, then the window contiguously, then the chunk). Attention scores depend only on
    position differences, so without eviction or window this equals absolute positions exactly, and any stream
    length works (no 1024-frame table, no gap between sink and window).

Gradient through earlier chunks (``grad_mode``):
    ``"truncate"`` (default): cached K/V are detached; a chunk's output has no gradient path into earlier chunks.
    ``"straight_through"``: the official code's behaviour (notes §3.6). The value attended for an earlier frame
    is the buffer content (the refreshed, clean-context K/V), but the gradient flows to the K/V of that frame's
    last grad-enabled write (the exit denoising step): ``buffer.detach() + (live - live.detach())``, which equals
    the buffer value exactly in the forward pass. Unlike the official in-place write, this also works without
    activation checkpointing.

Activation checkpointing:
    A recomputed layer calls :meth:`KVCache.attend` again with the same :class:`CacheStep`. The step remembers
    which layers already wrote, so recompute does not write (writes are idempotent), and it reads exactly the
    frames (and, for straight-through, the live tensors) it read in the forward. If those frames were overwritten
    or evicted in between, recompute raises instead of silently using other keys.

Cross-attention:
    Text K/V are cached per layer by no-grad calls and reused while the prompt is the same; call
    :meth:`KVCache.reset_cross` on a prompt switch. Calls that need gradient for the cross-attention path
    (grad enabled and the text projections or the context require grad) recompute the text K/V so the generator's
    cross-attention projections get gradient; they neither read nor write the cache.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch

GradMode = Literal["truncate", "straight_through"]
GRAD_MODES: tuple[str, ...] = ("truncate", "straight_through")


def _not_traced(method):
    """Run ``method`` eagerly under ``torch.compile`` (a graph break around it).

    The cache's bookkeeping is python ints, sets and lists that change every call (write serials, the layers a step
    wrote, the visible slots): traced, each value would be a guard and every chunk a recompilation. Compiling
    a transformer block thus compiles the compute around the cache, and the layer index only passes through.
    """
    return torch.compiler.disable(method, recursive=True)


@dataclass
class CacheStep:
    """The layout decided once per model call (by :meth:`KVCache.begin_chunk`) and used by every layer."""

    start_frame: int
    """Absolute stream frame of the chunk's first frame."""
    num_frames: int
    """Frames in the chunk."""
    slot: int
    """Buffer slot (frame index inside the buffer) of the chunk's first frame."""
    view: list[tuple[int, int]]
    """Visible cached frames, in order, as ``(absolute frame, write serial)``."""
    written: set[int] = field(default_factory=set)
    """Layers that already wrote this chunk (a second call is a checkpoint recompute)."""
    live_used: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """Per layer, the straight-through live K/V read for each visible frame (reused on recompute)."""

    @property
    def view_frames(self) -> int:
        """Frames in the attended view: visible cached frames plus the chunk."""
        return len(self.view) + self.num_frames


class KVCache:
    """Per-layer self- and cross-attention K/V for streaming generation (see module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        batch_size: int,
        tokens_per_frame: int,
        capacity_frames: int,
        *,
        sink_frames: int = 0,
        window_frames: int | None = None,
        grad_mode: GradMode = "truncate",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Args:
        num_layers: Transformer layers (one K/V buffer each).
        num_heads: Attention heads.
        head_dim: Channels per head.
        batch_size: Batch size of the stream.
        tokens_per_frame: Tokens per latent frame (``VideoGeometry.tokens_per_frame``).
        capacity_frames: Frames the buffer holds; older non-sink frames are evicted beyond it.
        sink_frames: First frames of the stream kept forever (attention sink); 0 = none.
        window_frames: Attend only to keys within the last ``window_frames`` frames ending at the chunk end (plus
            the sink frames); ``None`` = everything held.
        grad_mode: ``"truncate"`` or ``"straight_through"`` (module docstring).
        dtype: Buffer dtype; ``None`` = the dtype of the first K written (the activation dtype).
        device: Buffer device; ``None`` = the device of the first K written.
        """
        for name, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("batch_size", batch_size),
            ("tokens_per_frame", tokens_per_frame),
            ("capacity_frames", capacity_frames),
        ):
            if value <= 0:
                raise ValueError(f"KVCache: {name} must be positive, got {value}")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"KVCache: sink_frames={sink_frames} must be in [0, capacity_frames={capacity_frames})")
        if window_frames is not None and window_frames <= 0:
            raise ValueError(f"KVCache: window_frames must be positive or None, got {window_frames}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"KVCache: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.grad_mode: GradMode = grad_mode
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        # Buffers are allocated on the first write of each layer (dtype/device of the activations by default).
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.reset()

    # -- state -------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream and the prompt (buffers stay allocated and are overwritten by later writes)."""
        self.frame_ids: list[int] = []
        """Absolute stream frame held by each filled slot, increasing."""
        self._serials: list[int] = []
        """Write serial of each filled slot: identifies the values a slot holds."""
        self._next_serial = 0
        self._end_frame = 0
        self.next_step: CacheStep | None = None
        """A layout decided ahead by the caller (a :meth:`begin_chunk` result, e.g. by the CUDA graphs of
        ``sfvideo.inference.graphs``, which must know it before the model runs): the next :meth:`begin_chunk`
        returns it instead of deciding again, once."""
        # Straight-through: per layer, absolute frame -> (K, V) of that frame's last grad-enabled write.
        self._live: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(self.num_layers)]
        self.reset_cross()

    def reset_cross(self) -> None:
        """Forget the cached text K/V (call on a prompt switch)."""
        self.cross_k = [None] * self.num_layers
        self.cross_v = [None] * self.num_layers

    @property
    def end_frame(self) -> int:
        """Absolute stream frame after the last one written (0 for an empty cache)."""
        return self._end_frame

    @property
    def num_held_frames(self) -> int:
        return len(self.frame_ids)

    # -- layout ------------------------------------------------------------------------------------------------

    def begin_chunk(self, start_frame: int, num_frames: int, window_frames: int | None = None) -> CacheStep:
        """Decide the layout for one chunk; called once per model forward, before the layers.

        Drops held frames ``>= start_frame``, evicts if needed, reserves the chunk's slots and lists the visible
        cached frames. ``window_frames`` overrides the cache's window for this call when not ``None``.
        With :attr:`next_step` set, returns that layout instead (it must be for the same chunk).
        """
        start_frame, num_frames = operator.index(start_frame), operator.index(num_frames)  # python ints only
        if self.next_step is not None:
            step, self.next_step = self.next_step, None
            if (step.start_frame, step.num_frames) != (start_frame, num_frames):
                raise ValueError(f"KVCache: the layout decided ahead is for chunk ({step.start_frame}, "
                                 f"{step.num_frames}), the model asked for ({start_frame}, {num_frames})")
            return step
        window = self.window_frames if window_frames is None else window_frames
        if num_frames <= 0:
            raise ValueError(f"KVCache: chunk must have frames, got {num_frames}")
        if self.sink_frames + num_frames > self.capacity_frames:
            raise ValueError(
                f"KVCache: capacity_frames={self.capacity_frames} cannot hold sink_frames={self.sink_frames} plus "
                f"a chunk of {num_frames} frames"
            )
        if window is not None and window < num_frames:
            raise ValueError(f"KVCache: window_frames={window} must be >= the chunk's {num_frames} frames")
        if not 0 <= start_frame <= self._end_frame:
            raise ValueError(
                f"KVCache: start_frame={start_frame} must be in [0, end_frame={self._end_frame}] (overwrite or append)"
            )
        # 1. Truncate to the stream before start_frame. After evictions the held non-sink frames start at
        #    frame_ids[sink]; rewinding below that (but past the sinks) would leave a hole in the history.
        sink = self.sink_frames
        if len(self.frame_ids) > sink and sink <= start_frame < self.frame_ids[sink]:
            raise ValueError(
                f"KVCache: start_frame={start_frame} rewinds into evicted frames (oldest held after the sinks: "
                f"{self.frame_ids[sink]})"
            )
        keep = bisect.bisect_left(self.frame_ids, start_frame)
        del self.frame_ids[keep:], self._serials[keep:]
        end = start_frame + num_frames
        # Straight-through sources of the chunk's own frames survive (the refresh keeps the exit step's graph);
        # later frames are gone from the stream.
        for live in self._live:
            for frame in [f for f in live if f >= end]:
                del live[frame]
        # 2. Evict the oldest non-sink frames if the chunk does not fit.
        overflow = len(self.frame_ids) + num_frames - self.capacity_frames
        if overflow > 0:
            self._evict(overflow)
        # 3. Reserve the chunk's slots.
        slot = len(self.frame_ids)
        self.frame_ids.extend(range(start_frame, end))
        self._serials.extend(range(self._next_serial, self._next_serial + num_frames))
        self._next_serial += num_frames
        self._end_frame = end
        # 4. Visible cached frames: sinks + those within the window ending at the chunk end.
        view = [
            (f, s)
            for f, s in zip(self.frame_ids[:slot], self._serials[:slot])
            if window is None or f < self.sink_frames or f >= end - window
        ]
        return CacheStep(start_frame=start_frame, num_frames=num_frames, slot=slot, view=view)

    def _slot(self, frame: int) -> int | None:
        j = bisect.bisect_left(self.frame_ids, frame)
        return j if j < len(self.frame_ids) and self.frame_ids[j] == frame else None

    def _evict(self, count: int) -> None:
        """Drop the ``count`` oldest non-sink frames, shifting the rest left (sinks stay in place)."""
        sink = min(self.sink_frames, len(self.frame_ids))
        held = len(self.frame_ids)
        tpf = self.tokens_per_frame
        with torch.no_grad():
            for buffers in (self.k, self.v):
                for buf in buffers:
                    if buf is not None and held > sink + count:
                        # clone: source and destination overlap.
                        buf[:, sink * tpf : (held - count) * tpf] = buf[:, (sink + count) * tpf : held * tpf].clone()
        evicted = set(self.frame_ids[sink : sink + count])
        del self.frame_ids[sink : sink + count], self._serials[sink : sink + count]
        for live in self._live:
            for frame in evicted & live.keys():
                del live[frame]

    # -- self-attention ----------------------------------------------------------------------------------------

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            shape = (self.batch_size, self.capacity_frames * self.tokens_per_frame, self.num_heads, self.head_dim)
            kwargs = dict(dtype=self.dtype or like.dtype, device=self.device or like.device)
            self.k[layer] = torch.zeros(shape, **kwargs)
            self.v[layer] = torch.zeros(shape, **kwargs)
        return self.k[layer], self.v[layer]

    @_not_traced
    def attend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's K/V (once per step and layer) and return the attended view (pre-RoPE).

        Args:
            layer: Layer index.
            k: ``(B, n * tokens_per_frame, H, D)`` the chunk's keys, before RoPE (live, may carry gradient).
            v: ``(B, n * tokens_per_frame, H, D)`` its values.
            step: From :meth:`begin_chunk` for this model call.

        Returns:
            ``(k_view, v_view)``, each ``(B, V * tokens_per_frame, H, D)``: the visible cached frames followed by
            the live ``k``/``v`` (``V = step.view_frames``).
        """
        tpf = self.tokens_per_frame
        expected = (self.batch_size, step.num_frames * tpf, self.num_heads, self.head_dim)
        if tuple(k.shape) != expected:
            raise ValueError(f"KVCache: layer {layer} K has shape {tuple(k.shape)}, cache expects {expected}")
        k_buf, v_buf = self._buffers(layer, k)
        recompute = layer in step.written
        if not recompute:
            a, b = step.slot * tpf, (step.slot + step.num_frames) * tpf
            with torch.no_grad():
                k_buf[:, a:b].copy_(k.detach())
                v_buf[:, a:b].copy_(v.detach())
            step.written.add(layer)
            if self.grad_mode == "straight_through" and torch.is_grad_enabled() and k.requires_grad:
                live = self._live[layer]
                for i in range(step.num_frames):
                    live[step.start_frame + i] = (k[:, i * tpf : (i + 1) * tpf], v[:, i * tpf : (i + 1) * tpf])
            if self.grad_mode == "straight_through":
                step.live_used[layer] = {f: self._live[layer][f] for f, _ in step.view if f in self._live[layer]}
        # Locate the visible frames now (eviction may have moved them since begin_chunk on recompute) and check
        # they still hold the values this step saw.
        slots = []
        for frame, serial in step.view:
            j = self._slot(frame)
            if j is None or self._serials[j] != serial:
                raise RuntimeError(
                    f"KVCache: frame {frame} attended by the chunk at start_frame={step.start_frame} was overwritten "
                    "or evicted before the activation-checkpoint recompute; keep the cache unchanged until backward"
                )
            slots.append(j)
        live_used = step.live_used.get(layer, {})
        k_parts, v_parts = [], []
        for run in _runs(slots):
            ra, rb = run[0] * tpf, (run[-1] + 1) * tpf
            frames = [self.frame_ids[j] for j in run]
            if not any(f in live_used for f in frames):
                k_parts.append(k_buf[:, ra:rb])
                v_parts.append(v_buf[:, ra:rb])
                continue
            for j, f in zip(run, frames):
                kb, vb = k_buf[:, j * tpf : (j + 1) * tpf], v_buf[:, j * tpf : (j + 1) * tpf]
                if f in live_used:
                    # Straight-through: value of the buffer (exactly: x - x.detach() is 0), gradient to live.
                    k_live, v_live = live_used[f]
                    kb = kb.to(k_live.dtype) + (k_live - k_live.detach())
                    vb = vb.to(v_live.dtype) + (v_live - v_live.detach())
                k_parts.append(kb)
                v_parts.append(vb)
        # cat copies, so nothing saved for backward aliases the (later overwritten) buffer.
        k_view = torch.cat([p.to(k.dtype) for p in k_parts] + [k], dim=1)
        v_view = torch.cat([p.to(v.dtype) for p in v_parts] + [v], dim=1)
        return k_view, v_view

    # -- cross-attention ---------------------------------------------------------------------------------------

    @_not_traced
    def get_cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached text ``(K, V)`` of a layer, each ``(B, L_text, H, D)``, or ``None``."""
        if self.cross_k[layer] is None:
            return None
        return self.cross_k[layer], self.cross_v[layer]

    @_not_traced
    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a layer's text K/V (detached) for reuse until :meth:`reset_cross`."""
        self.cross_k[layer] = k.detach()
        self.cross_v[layer] = v.detach()

    def cross_ready(self) -> bool:
        """Whether every layer has cached text K/V."""
        return all(k is not None for k in self.cross_k)


def _runs(slots: list[int]) -> list[list[int]]:
    """Split increasing slot indices into runs of consecutive slots (contiguous buffer slices)."""
    runs: list[list[int]] = []
    for j in slots:
        if runs and runs[-1][-1] + 1 == j:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs
