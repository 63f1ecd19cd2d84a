"""Speed-ups applied to a generator from outside: ``torch.compile`` per block and CUDA graphs of the per-chunk step.

:func:`compile_blocks` compiles each transformer block (the KV cache's python bookkeeping runs eagerly between the
compiled pieces, ``nn.kv_cache``), so one compilation serves every layer and chunk.

:class:`StepGraphs` wraps the model for the inference engine (``InferenceEngine(step_graphs=True)``) and replays
its KV-cached, no-grad forwards as CUDA graphs. A rolling cache has a fixed capacity and, once the window is full,
every denoising step and refresh of every chunk writes the same slot and reads the same view: the same kernels on
the same addresses, so one captured graph per *cache layout* (chunk slot, visible slots, shapes) serves them all;
the window fill meets a few more layouts (each captured after ``warmup`` eager calls). Per call the wrapper:

1. runs the cache's bookkeeping eagerly (``kv_cache.begin_chunk``: which slot, which frames visible, the eviction
   copy), and sets it as the cache's ``next_step``, so the model's own ``begin_chunk`` returns that layout;
2. keys the call by the layout and the addresses the graph reads -- the K/V buffers, the cached text K/V --, copies
   the inputs into the graph's static inputs and replays it, or runs eagerly and counts the key;
3. returns a copy of the static output.

Addresses stay put across sessions and prompts: a new cache gets the K/V buffers of a dead cache of the same shape
(kept in a pool here), and text K/V computed for a new prompt are copied into the cache's pinned buffers, so a
prompt switch or the next session replays the graphs already captured. Everything else a graph reads is a weight
or a RoPE table (``nn.rope.rope_table``, held by the graph's entry).

Anything else runs the model unchanged: no cache, gradient enabled, a first call of a prompt (text K/V not cached
yet), inputs not on CUDA (the CPU fallback) -- unless a ``graph_factory`` is given: :class:`EagerGraph` stands in
for a CUDA graph (a "replay" runs the forward on the static inputs), which tests the whole path on a CPU. A failed
capture is reported (``status``) and the wrapper runs eagerly from then on.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sfvideo.nn.rope import rope_table


def compile_blocks(model: nn.Module, *, dynamic: bool = True, **options: Any) -> None:
    """``torch.compile`` each of ``model.blocks`` in place (lazy: compilation happens at the first call, and a
    failure shows there; :func:`uncompile_blocks` undoes it). ``options`` go to ``nn.Module.compile``."""
    for block in model.blocks:
        block.compile(dynamic=dynamic, **options)


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager blocks after :func:`compile_blocks` (e.g. when compilation failed at the first call)."""
    for block in model.blocks:
        block._compiled_call_impl = None


class EagerGraph:
    """Stands in for a CUDA graph: ``capture`` keeps the function, ``replay`` runs it (on the static inputs).

    Used to test :class:`StepGraphs` on a CPU; the output is a fresh tensor each replay.
    """

    def capture(self, fn: Callable[[], Tensor]) -> None:
        self.fn = fn

    def replay(self) -> Tensor:
        return self.fn()


class CUDAGraph:
    """A ``torch.cuda.CUDAGraph`` of one forward: ``capture`` records it (nothing runs), ``replay`` runs it."""

    def __init__(self, pool: Any = None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], Tensor]) -> None:
        # thread_local: the decode worker may call CUDA on its own stream meanwhile.
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.out = fn()

    def replay(self) -> Tensor:
        self.graph.replay()
        return self.out


@dataclasses.dataclass
class _Entry:
    graph: Any
    static_x: Tensor
    static_t: Tensor
    holder: dict[str, Any]
    refs: Any  # tensors the graph reads that nothing else keeps alive


@dataclasses.dataclass
class _Pinned:
    """Buffers a cache was given (returned to the pool when the cache is collected)."""

    kv: tuple[list[Tensor], list[Tensor]] | None = None
    cross: dict[tuple, tuple[list[Tensor], list[Tensor]]] = dataclasses.field(default_factory=dict)


class StepGraphs:
    """The model's cached no-grad forwards as graphs, one per cache layout (see the module docstring).

    Args:
        model: The generator (``WanTransformer``-like; ``blocks`` may be compiled).
        warmup: Eager calls of a layout before it is captured.
        max_graphs: Graphs kept (least recently used dropped beyond).
        graph_factory: Makes a graph (``capture(fn)``, ``replay() -> output``); None = :class:`CUDAGraph` for CUDA
            inputs, eager otherwise.
        enabled: False passes every call through (an "off" switch that keeps the same code path).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup: int = 1,
        max_graphs: int = 32,
        graph_factory: Callable[[], Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.warmup, self.max_graphs, self.factory = warmup, max_graphs, graph_factory
        self.enabled = enabled
        self.error: str | None = None
        """Why graphs were switched off (a failed capture), else None."""
        self.counts: Counter[str] = Counter()
        """``eager`` (passed through or warming up), ``captured``, ``replayed`` calls."""
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self._free: dict[tuple, list[Any]] = {}  # pooled buffers by (kind, shape, dtype, device)
        self._pinned: weakref.WeakKeyDictionary[Any, _Pinned] = weakref.WeakKeyDictionary()
        self._pool: Any = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def status(self) -> str:
        """``on``, ``off`` or ``failed: ...`` (for reports)."""
        if self.error is not None:
            return f"failed: {self.error}"
        return "on" if self.enabled else "off"

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, *, kv_cache: Any = None, start_frame: int = 0,
                 **kwargs: Any) -> Tensor:
        if (kv_cache is None or not self.enabled or torch.is_grad_enabled() or kwargs.get("return_block_features")
                or not hasattr(kv_cache, "begin_chunk") or (self.factory is None and x.device.type != "cuda")):
            self.counts["eager"] += 1
            return self.model(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, **kwargs)
        self._pin_kv(kv_cache, x)
        step = kv_cache.begin_chunk(start_frame, x.shape[1], kwargs.get("window_frames"))
        key = self._key(x, timestep, kv_cache, step, kwargs)
        if key is None or self._seen[key] < self.warmup and key not in self._graphs:
            if key is not None:
                self._seen[key] += 1
            self.counts["eager"] += 1
            kv_cache.next_step = _fresh(step)
            out = self.model(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, **kwargs)
            self._pin_cross(kv_cache)
            return out
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, x, timestep, context, kv_cache, step, start_frame, kwargs)
            except Exception as e:  # an optimisation: report it and go on eagerly
                self.enabled = False
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                self.counts["eager"] += 1
                kv_cache.next_step = _fresh(step)
                return self.model(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, **kwargs)
            self.counts["captured"] += 1
        else:
            self._graphs.move_to_end(key)
            self.counts["replayed"] += 1
        entry.static_x.copy_(x)
        entry.static_t.copy_(timestep)
        entry.holder.update(cache=kv_cache, step=step, context=context, start_frame=start_frame)
        try:
            return entry.graph.replay().clone()
        finally:
            entry.holder.clear()  # a graph must not keep its cache alive (the pool reuses a dead cache's buffers)
            kv_cache.next_step = None

    # ------------------------------------------------------------------ keys and capture
    def _key(self, x: Tensor, timestep: Tensor, cache: Any, step: Any, kwargs: dict[str, Any]) -> tuple | None:
        """The layout and addresses a graph of this call depends on; None while some are not fixed yet."""
        if not cache.cross_ready() or any(k is None for k in cache.k):
            return None
        ids = cache.frame_ids
        view_slots = tuple(ids.index(frame) for frame, _ in step.view)
        buffers = tuple(t.data_ptr() for t in (*cache.k, *cache.v, *cache.cross_k, *cache.cross_v))
        options = tuple(sorted((k, v) for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, str))))
        return (tuple(x.shape), x.dtype, str(x.device), tuple(timestep.shape), timestep.dtype, step.slot,
                step.num_frames, view_slots, buffers, options)

    def _capture(self, key: tuple, x: Tensor, timestep: Tensor, context: Tensor, cache: Any, step: Any,
                 start_frame: int, kwargs: dict[str, Any]) -> _Entry:
        if self.factory is not None:
            graph = self.factory()
        else:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time, in order
            graph = CUDAGraph(self._pool)
        static_x, static_t = x.clone(), timestep.clone()
        # What the python side of a forward needs: a CUDA graph's runs only at the capture; EagerGraph's replays
        # run the forward again, on the current call's cache, layout and frame.
        holder: dict[str, Any] = {"cache": cache, "step": step, "context": context, "start_frame": start_frame}
        model = self.model

        def forward() -> Tensor:
            kv = holder["cache"]
            kv.next_step = _fresh(holder["step"])
            return model(static_x, static_t, holder["context"], kv_cache=kv, start_frame=holder["start_frame"],
                         **kwargs)

        try:
            graph.capture(forward)
        finally:
            holder.clear()
        _, p_h, p_w = self.model.config.patch_size
        refs = rope_table(len(step.view) + step.num_frames, x.shape[3] // p_h, x.shape[4] // p_w,
                          self.model.config.attention_head_dim, x.device)
        entry = _Entry(graph, static_x, static_t, holder, refs)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ stable addresses
    def _take(self, kind: str, shape: tuple, dtype: torch.dtype, device: torch.device, n: int) -> list[Tensor]:
        free = self._free.get((kind, shape, dtype, str(device)))
        if free:
            return free.pop()
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]

    def _give_back(self, kind: str, buffers: list[Tensor]) -> None:
        b = buffers[0]
        self._free.setdefault((kind, tuple(b.shape), b.dtype, str(b.device)), []).append(buffers)

    def _pinned_of(self, cache: Any) -> _Pinned:
        pinned = self._pinned.get(cache)
        if pinned is None:
            pinned = self._pinned[cache] = _Pinned()
            weakref.finalize(cache, self._release, pinned)
        return pinned

    def _release(self, pinned: _Pinned) -> None:
        if pinned.kv is not None:
            self._give_back("k", pinned.kv[0])
            self._give_back("v", pinned.kv[1])
        for k, v in pinned.cross.values():
            self._give_back("cross_k", k)
            self._give_back("cross_v", v)

    def _pin_kv(self, cache: Any, x: Tensor) -> None:
        """Give a new cache pooled K/V buffers (the same addresses as a dead cache of the same shape)."""
        if not all(k is None for k in cache.k):
            return
        shape = (cache.batch_size, cache.capacity_frames * cache.tokens_per_frame, cache.num_heads, cache.head_dim)
        dtype, device = cache.dtype or x.dtype, cache.device or x.device
        n = cache.num_layers
        k, v = self._take("k", shape, dtype, device, n), self._take("v", shape, dtype, device, n)
        self._pinned_of(cache).kv = (k, v)
        cache.k[:], cache.v[:] = list(k), list(v)

    def _pin_cross(self, cache: Any) -> None:
        """Copy freshly computed text K/V into the cache's pinned buffers (same addresses for every prompt)."""
        if not cache.cross_ready():
            return
        first = cache.cross_k[0]
        sig = (tuple(first.shape), first.dtype, str(first.device))
        pinned = self._pinned_of(cache)
        if sig not in pinned.cross:
            n = cache.num_layers
            pinned.cross[sig] = (self._take("cross_k", sig[0], first.dtype, first.device, n),
                                 self._take("cross_v", sig[0], first.dtype, first.device, n))
        ks, vs = pinned.cross[sig]
        for layer in range(cache.num_layers):
            k, v = cache.cross_k[layer], cache.cross_v[layer]
            if k.data_ptr() != ks[layer].data_ptr():
                cache.set_cross(layer, ks[layer].copy_(k), vs[layer].copy_(v))


def _fresh(step: Any) -> Any:
    """The same layout as a new step (no layer has written it yet), for one more forward."""
    return dataclasses.replace(step, written=set(), live_used={})
