"""Exponential moving average of a network, sharded like its parameters (ZeRO-3 partition, FSDP2 shard, or whole).

``ShardedEMA`` is the EMA of every training module (``ema`` config group, ``sfvideo.config.EMAConfig``). It is
per-rank state: modules store ``ema.state_dict()`` under ``checkpoint[RANK_LOCAL_KEY]`` and the strategies write
that to one file per rank (``sfvideo.training.strategies.rank_local``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["ShardedEMA"]


def _local_shard(p: Tensor) -> Tensor:
    """The part of parameter ``p`` this rank owns: ZeRO-3 flat partition, FSDP2 local shard, or ``p`` itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor  # (partition_numel,), padded so every rank's partition has the same size
    if isinstance(p, DTensor):
        return p.to_local()
    return p.detach()


def _layout(p: Tensor) -> str:
    return "zero3" if hasattr(p, "ds_tensor") else "dtensor" if isinstance(p, DTensor) else "full"


class ShardedEMA:
    """Exponential moving average of a network, kept in fp32 with the same sharding as its parameters.

    Each rank holds only what it owns: the flat ZeRO-3 partition (``param.ds_tensor``), the FSDP2 local shard
    (``param.to_local()``), or the full tensor where parameters are replicated (one device, DDP, ZeRO-1/2; there
    every rank holds the same copy and the checkpoint stores it once). No full copy is gathered per step, unlike
    the official ``EMA_FSDP`` (a full fp32 CPU copy on every rank, refreshed with ``summon_full_params``).

    Update rule, from ``start_step`` on (the first call at or after it copies the weights):
    ``ema = decay · ema + (1 − decay) · param``. Under bf16 strategies ``param`` is the bf16 working copy (ZeRO) or
    the fp32 sharded parameter (FSDP2); the EMA itself is always fp32.

    Usage in a LightningModule::

        self.ema = ShardedEMA(decay=0.99, start_step=200)
        ...after each generator step: self.ema.update(self.generator, step=self.generator_steps)
        on_save_checkpoint: checkpoint[RANK_LOCAL_KEY] = {"generator_ema": self.ema.state_dict()}
        on_load_checkpoint: self.ema.load_state_dict(checkpoint[RANK_LOCAL_KEY]["generator_ema"])
        export: weights = self.ema.full_state_dict(self.generator)  # collective; full tensors on rank 0
    """

    def __init__(self, decay: float = 0.99, start_step: int = 0) -> None:
        """Create an empty EMA; it starts at the first ``update`` with ``step >= start_step``.

        Args:
            decay: EMA decay per update, in [0, 1).
            start_step: first step (the caller's counter, e.g. generator steps) at which the EMA exists.
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ShardedEMA: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {}
        self.layouts: dict[str, str] = {}

    @property
    def initialized(self) -> bool:
        return bool(self.shadow)

    @staticmethod
    def _params(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
        for name, p in module.named_parameters():
            if p.requires_grad:
                yield name, p

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> bool:
        """Fold the current parameters of ``module`` into the EMA; returns whether anything was done."""
        if step < self.start_step:
            return False
        if not self.initialized:
            for name, p in self._params(module):
                self.shadow[name] = _local_shard(p).detach().float().clone()
                self.layouts[name] = _layout(p)
            self.num_updates = 1
            return True
        for name, p in self._params(module):
            local = _local_shard(p)
            ema = self.shadow.get(name)
            if ema is None or ema.shape != local.shape:
                raise ValueError(
                    f"ShardedEMA: parameter {name!r} has local shape {tuple(local.shape)} but the EMA holds "
                    f"{None if ema is None else tuple(ema.shape)} (resumed with another world size or strategy?)"
                )
            if ema.device != local.device:  # after load_state_dict on CPU
                ema = self.shadow[name] = ema.to(local.device)
            ema.lerp_(local.float(), 1.0 - self.decay)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """This rank's EMA. ``replicated`` tells checkpoint writers that every rank holds the same values."""
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()},
            "layouts": dict(self.layouts),
            "replicated": all(v == "full" for v in self.layouts.values()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's EMA (tensors move to the parameters' device at the next update)."""
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        self.layouts = dict(state["layouts"])

    @torch.no_grad()
    def full_state_dict(self, module: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
        """Full fp32 EMA weights as CPU tensors, keyed like ``module.named_parameters()``. Collective.

        ``module`` provides the sharding metadata (ZeRO-3 ``ds_numel``/``ds_shape``, DTensor mesh/placements).
        Gathers one parameter at a time; with ``rank0_only`` other ranks get an empty dict.
        """
        if not self.initialized:
            raise RuntimeError("ShardedEMA.full_state_dict: the EMA has not started yet (no update at >= start_step)")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        keep = not rank0_only or rank == 0
        out: dict[str, Tensor] = {}
        for name, p in self._params(module):
            ema = self.shadow[name]
            layout = self.layouts[name]
            if layout == "zero3":
                ema = ema.to(p.ds_tensor.device)
                parts = [torch.empty_like(ema) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, ema)
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            elif layout == "dtensor":
                ema = ema.to(p.to_local().device)
                full = DTensor.from_local(
                    ema, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                ).full_tensor()
            else:
                full = ema
            if keep:
                out[name] = full.cpu().clone()
        return out
