"""FSDP2 (``fully_shard``) per transformer block and per network (``FSDP2Strategy``).

See ``contract.py`` for what the LightningModule provides.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sfvideo.checkpoints import RANK_LOCAL_KEY
from sfvideo.training.strategies.contract import (
    check_trainable_params_covered,
    engine_module_names,
    frozen_module_names,
)
from sfvideo.training.strategies.rank_local import load_rank_local, save_rank_local

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) per transformer block and per network, on Lightning's ``ModelParallelStrategy``.

    In ``setup`` (before the optimizers are built), for each trainable network in ``module.engine_modules``:
    ``fully_shard`` each child of ``network.<block_attr>`` (the transformer blocks: parameters are gathered one
    block at a time), then the network itself (the rest: embeddings, head). Frozen networks are sharded the same
    way when ``shard_frozen``, otherwise replicated. A module that already applied ``fully_shard`` in its own
    ``configure_model`` is left as it is. The device mesh is 1-D data parallel over all ranks.

    Checkpoints are ``ModelParallelStrategy``'s distributed checkpoints (a DCP folder with both optimizers)
    plus per-rank state in ``<ckpt>/<RANK_LOCAL_KEY>/``. :meth:`clip_network_gradients` clips one network's
    DTensor gradients.

    YAML::

        trainer:
          strategy:
            class_path: sfvideo.training.strategies.FSDP2Strategy
            init_args: {bf16: true, shard_frozen: true}
    """

    strategy_name = "sfvideo_fsdp2"

    def __init__(
        self,
        block_attr: str = "blocks",
        shard_frozen: bool = True,
        bf16: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """Configure it; each argument is an ``init_args`` key in YAML.

        Args:
            block_attr: attribute of each network holding its transformer blocks (a sequence of modules), each
                sharded as its own FSDP unit; a network without it is sharded as one unit.
            shard_frozen: shard frozen networks (teacher) too; otherwise each rank holds a full copy.
            bf16: FSDP2 mixed precision: bf16 parameters for compute, fp32 sharded masters and fp32 gradient
                reduction; frozen networks are stored in bf16. Use with ``Trainer(precision="32-true")``.
            reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3-like memory);
                ``False`` keeps them until backward (ZeRO-2-like, fewer all-gathers).
            save_distributed_checkpoint: one shard file per rank (``True``) or a single full file on rank 0.
            process_group_backend: ``nccl`` on GPU, ``gloo`` on CPU by default.
            timeout: collective timeout.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.block_attr = block_attr
        self.shard_frozen = shard_frozen
        self.bf16 = bf16
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Pure data parallelism: one mesh dimension over every rank (the parent's "auto" means TP within a node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def _shard(self, net: nn.Module, mesh: Any, mp_policy: Any) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(net, FSDPModule):
            return
        for block in getattr(net, self.block_attr, ()):
            fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(net, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=self.reshard_after_forward)

    def _shard_networks(self, module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        names = engine_module_names(module)
        check_trainable_params_covered(module, names, type(self).__name__)
        mesh = self.device_mesh["data_parallel"]
        if self.bf16:
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp_policy = MixedPrecisionPolicy()
        for name in names:
            self._shard(getattr(module, name), mesh, mp_policy)
        for name in frozen_module_names(module):
            net = getattr(module, name)
            if any(p.requires_grad for p in net.parameters()):
                raise ValueError(f"frozen network {name!r} has parameters with requires_grad=True; freeze it first")
            if self.bf16:
                net.to(torch.bfloat16)
            if self.shard_frozen:
                self._shard(net, mesh, mp_policy)

    def setup(self, trainer: pl.Trainer) -> None:
        # ModelParallelStrategy.setup minus its "configure_model must apply the parallelism" check: here the
        # strategy applies it, before the optimizers are created so they hold the sharded (DTensor) parameters.
        # Networks are built whole (never on the meta device: nothing to materialise) and the optimizers are
        # created here, after the move to the device, with empty state (nothing to move).
        assert self.model is not None and self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        self._shard_networks(self.lightning_module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def clip_network_gradients(self, module: pl.LightningModule, name: str, optimizer: Any, max_norm: float) -> Tensor:
        """Clip network ``name``'s sharded gradients to total norm ``max_norm``; returns the (full) norm."""
        params = [p for p in getattr(module, name).parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the norm of a sharded gradient set is itself a (replicated) DTensor
        return norm.detach()

    def save_checkpoint(
        self, checkpoint: dict, filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        rank_local = checkpoint.pop(RANK_LOCAL_KEY, None)
        super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        if rank_local:
            if not self._save_distributed_checkpoint:
                raise ValueError("FSDP2Strategy: per-rank state (sharded EMA) needs save_distributed_checkpoint=True")
            save_rank_local(path, rank_local, self.global_rank, self.world_size)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        state = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            rank_local = load_rank_local(path, self.global_rank, self.world_size)
            if rank_local is not None:
                state[RANK_LOCAL_KEY] = rank_local
        return state
