"""Multi-GPU strategies for training several networks with their own optimizers (generator + critic).

Lightning's stock ``DeepSpeedStrategy`` wraps the whole LightningModule in one engine with one optimizer, and
FSDP1 (``FSDPStrategy``) wraps it in one root FSDP unit whose state breaks under several backwards per step
(docs/distributed.md). This module provides two strategies that keep each trainable network separate:

* :class:`MultiEngineDeepSpeedStrategy`: one DeepSpeed engine per (trainable network, optimizer), ZeRO 1/2/3,
  optional CPU offload, the frozen teacher optionally partitioned as an optimizer-less ZeRO-3 engine.
* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` plus ``fully_shard`` per transformer block and
  per network, applied by the strategy (the LightningModule needs no ``configure_model`` for it).

Contract with the LightningModule (``sfvideo.training.module`` follows it; ``tests/training/_dist_module.py``
mimics it):

* class attributes ``engine_modules = ("generator", "critic")`` (trainable networks, in the order of the
  optimizers returned by ``configure_optimizers``) and ``frozen_modules = ("teacher",)`` (no optimizer);
* every forward of a network goes through :func:`network` (``self.net(name)`` in the module): under DeepSpeed
  this is the engine, whose forward installs the ZeRO gradient hooks; elsewhere the plain submodule;
* manual optimization: ``self.manual_backward(loss)``, :func:`clip_gradients`, ``opt.step()``,
  ``opt.zero_grad()``. Gradient accumulation is owned by the module for every strategy: divide the loss by
  ``k`` and step every ``k`` micro-batches (DeepSpeed engines run with ``managed_gradient_accumulation=False``
  so ``engine.step()`` is the accumulation boundary);
* no gradient of one trainable network flows through another's backward (DMD guarantees it with
  ``no_grad``/``detach``);
* state that differs per rank (the sharded EMA) goes under ``checkpoint[RANK_LOCAL_KEY]`` in
  ``on_save_checkpoint``; both strategies write it to one file per rank and give it back in
  ``on_load_checkpoint``. Other strategies leave it in the ordinary checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer, _init_optimizers_and_lr_schedulers
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy
from lightning.pytorch.strategies.model_parallel import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    import deepspeed

__all__ = [
    "RANK_LOCAL_KEY",
    "FSDP2Strategy",
    "MultiEngineDeepSpeedStrategy",
    "ShardedEMA",
    "clip_gradients",
    "engine_module_names",
    "frozen_module_names",
    "gather_full_state_dict",
    "network",
]

RANK_LOCAL_KEY = "rank_local"
"""Checkpoint key for per-rank state (e.g. ``{"generator_ema": ema.state_dict()}``). A value that is a dict with
``"replicated": True`` is identical on every rank and is written once (by rank 0)."""

_RANK_LOCAL_DIR = "rank_local"


# ---------------------------------------------------------------------------------------------------------------
# 1. The module-facing API
# ---------------------------------------------------------------------------------------------------------------


def engine_module_names(module: nn.Module) -> tuple[str, ...]:
    """The trainable networks of ``module`` (``module.engine_modules``), in optimizer order."""
    names = tuple(getattr(module, "engine_modules", ()))
    if not names:
        raise ValueError(f"{type(module).__name__}.engine_modules is empty or missing: name the trainable networks")
    return names


def frozen_module_names(module: nn.Module) -> tuple[str, ...]:
    """The frozen networks of ``module`` (``module.frozen_modules``, default none)."""
    return tuple(getattr(module, "frozen_modules", ()))


def network(module: pl.LightningModule, name: str) -> nn.Module:
    """The callable to run network ``name`` of ``module`` through.

    Returns the DeepSpeed engine wrapping ``module.<name>`` under :class:`MultiEngineDeepSpeedStrategy` (forward
    must go through it so ZeRO's gradient hooks run and ZeRO-3 gathers parameters), otherwise the submodule itself
    (FSDP2 installs its hooks on the submodule). The hook a strategy provides is ``strategy.network(name)``.
    """
    trainer = module._trainer
    getter = getattr(trainer.strategy, "network", None) if trainer is not None else None
    if getter is not None:
        return getter(name)
    return getattr(module, name)


def clip_gradients(module: pl.LightningModule, optimizer: Optimizer | LightningOptimizer, max_norm: float) -> None:
    """Clip the gradients of one optimizer's parameters to total norm ``max_norm``, as the strategy requires.

    Under DeepSpeed the engine clips inside ``opt.step()`` with ``gradient_clipping`` from its config, so this
    only checks that the value agrees with the strategy's; elsewhere it calls ``module.clip_gradients`` (which
    handles FSDP2's DTensor gradients). ``max_norm <= 0`` disables clipping.
    """
    strategy = module.trainer.strategy
    if isinstance(strategy, MultiEngineDeepSpeedStrategy):
        strategy._check_clipping(max_norm)
        return
    if max_norm > 0:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def gather_full_state_dict(module: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
    """Full (unsharded) parameters of ``module`` as CPU tensors. Collective: every rank must call it.

    Handles ZeRO-3 partitions (gathered one parameter at a time, so peak memory is one full tensor), FSDP2
    DTensors and plain tensors. With ``rank0_only`` other ranks get an empty dict.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    keep = not rank0_only or rank == 0
    out: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_tensor"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().cpu().clone() if keep else None
        elif isinstance(p, DTensor):
            full = p.full_tensor().detach().cpu()
        else:
            full = p.detach().cpu().clone()
        if keep:
            out[name] = full
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Sharded EMA
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# 3. Per-rank checkpoint files (shared by both strategies)
# ---------------------------------------------------------------------------------------------------------------


def _save_rank_local(ckpt_dir: Path, state: Mapping[str, Any] | None, rank: int, world_size: int) -> None:
    if not state:
        return
    folder = ckpt_dir / _RANK_LOCAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    own = {k: v for k, v in state.items() if not (isinstance(v, Mapping) and v.get("replicated"))}
    shared = {k: v for k, v in state.items() if k not in own}
    torch.save({"world_size": world_size, "state": own}, folder / f"rank_{rank:05d}.pt")
    if rank == 0 and shared:
        torch.save({"world_size": world_size, "state": shared}, folder / "replicated.pt")


def _load_rank_local(ckpt_dir: Path, rank: int, world_size: int) -> dict[str, Any] | None:
    folder = ckpt_dir / _RANK_LOCAL_DIR
    if not folder.is_dir():
        return None
    own_file = folder / f"rank_{rank:05d}.pt"
    if not own_file.is_file():
        raise FileNotFoundError(f"{own_file} is missing: per-rank state must be resumed with the same world size")
    own = torch.load(own_file, map_location="cpu", weights_only=False)
    if own["world_size"] != world_size:
        raise ValueError(
            f"{own_file}: saved with world size {own['world_size']} but resuming with {world_size}; the sharded "
            "state (EMA) needs the same world size"
        )
    state = dict(own["state"])
    shared_file = folder / "replicated.pt"
    if shared_file.is_file():
        state.update(torch.load(shared_file, map_location="cpu", weights_only=False)["state"])
    return state


def _check_trainable_params_covered(module: nn.Module, names: tuple[str, ...], strategy: str) -> None:
    stray = [
        n for n, p in module.named_parameters() if p.requires_grad and not any(n.startswith(f"{e}.") for e in names)
    ]
    if stray:
        raise ValueError(
            f"{strategy}: trainable parameters outside engine_modules {names} would never be synchronised: "
            f"{stray[:3]}{' ...' if len(stray) > 3 else ''}; freeze them or add their network to engine_modules"
        )


def _deep_update(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# ---------------------------------------------------------------------------------------------------------------
# 4. DeepSpeed: one engine per trainable network
# ---------------------------------------------------------------------------------------------------------------


class MultiEngineDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO with one engine per trainable network (generator, critic) and its own optimizer.

    What differs from Lightning's ``DeepSpeedStrategy``:

    * ``deepspeed.initialize`` runs once per name in ``module.engine_modules`` with the matching optimizer from
      ``configure_optimizers``; the LightningModule itself is not wrapped. Frozen networks
      (``module.frozen_modules``) get no optimizer; under ZeRO-3 with ``partition_frozen`` they become
      optimizer-less engines, so a 14B teacher is partitioned too.
    * ``manual_backward(loss)`` becomes ``engine.backward(loss)`` of the one trainable network that ran a
      grad-enabled forward since the last backward (the strategy watches the engines' forwards; several raise an
      error), so each network's forward must go through :func:`network`. Each ``opt.step()`` becomes that
      network's ``engine.step()`` (clipping from ``gradient_clipping``, ZeRO step, zero_grad).
    * Gradient accumulation: engines run with ``managed_gradient_accumulation=False``; gradients of several
      backwards accumulate and ``opt.step()`` is the boundary, exactly as for the other strategies.
    * Checkpoints: a directory with one DeepSpeed tag per engine (``<ckpt>/generator``, ``<ckpt>/critic``),
      Lightning's own state (loops, schedulers, callbacks, module hooks) stored with the first tag, and per-rank
      state (``checkpoint[RANK_LOCAL_KEY]``, e.g. the sharded EMA) in ``<ckpt>/rank_local/``. Frozen networks are
      not saved (they come from their pretrained weights). Resume needs the same world size.
    * Runs on CPU for tests (``DS_ACCELERATOR=cpu``, gloo): the CUDA-only checks are skipped there.

    YAML::

        trainer:
          precision: bf16-mixed
          strategy:
            class_path: sfvideo.training.strategies.MultiEngineDeepSpeedStrategy
            init_args: {stage: 2, bf16: true, gradient_clipping: 10.0}
    """

    strategy_name = "multi_engine_deepspeed"

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        bf16: bool = False,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        partition_frozen: bool = True,
        gradient_clipping: float = 0.0,
        zero_init: bool = False,
        pin_memory: bool = False,
        overrides: dict[str, Any] | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        logging_level: int = logging.WARNING,
    ) -> None:
        """Configure it; each argument is an ``init_args`` key in YAML.

        Args:
            stage: ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.
            bf16: bf16 parameters and compute with fp32 master weights in the optimizer; needs
                ``Trainer(precision="bf16-mixed")`` (so inputs are cast). Frozen networks are cast to bf16 too.
            offload_optimizer: keep optimizer states (and the step) on CPU (ZeRO-Offload).
            offload_params: keep ZeRO-3 parameter partitions on CPU (needs ``stage=3``).
            partition_frozen: under ZeRO-3, partition frozen networks as optimizer-less engines; otherwise they are
                replicated on every rank (and Lightning's model summary is disabled, since it assumes ZeRO-3
                partitioned every parameter). Ignored for stages 1 and 2 (frozen networks are replicated).
            gradient_clipping: total-norm clipping applied by each engine in ``step()`` (0 = off). Must equal the
                ``max_norm`` the module passes to :func:`clip_gradients`.
            zero_init: under ZeRO-3, build networks created in ``configure_model`` inside ``deepspeed.zero.Init``
                (partitioned at construction; pretrained weights must then be loaded through
                ``deepspeed.zero.GatheredParameters``). Off by default: networks are built whole, then partitioned.
            pin_memory: pin CPU-offloaded states (faster transfers; needs CUDA).
            overrides: DeepSpeed config entries merged (recursively) over the generated config, e.g.
                ``{"zero_optimization": {"reduce_bucket_size": 5.0e7}}``.
            process_group_backend: ``nccl`` on GPU, ``gloo`` on CPU by default.
            timeout: collective timeout.
            logging_level: DeepSpeed's logging level.
        """
        if stage not in (1, 2, 3):
            raise ValueError(f"MultiEngineDeepSpeedStrategy: stage must be 1, 2 or 3, got {stage}")
        if offload_params and stage != 3:
            raise ValueError(f"MultiEngineDeepSpeedStrategy: offload_params needs stage=3, got stage={stage}")
        if gradient_clipping < 0:
            raise ValueError(f"MultiEngineDeepSpeedStrategy: gradient_clipping must be >= 0, got {gradient_clipping}")
        super().__init__(
            zero_optimization=True,
            stage=stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_params,
            pin_memory=pin_memory,
            process_group_backend=process_group_backend,
            timeout=timeout,
            logging_level=logging_level,
        )
        assert self.config is not None
        zero = self.config["zero_optimization"]
        if stage == 1:
            # managed_gradient_accumulation=False allows overlap_comm only with gradient partitioning (stage >= 2).
            zero["overlap_comm"] = False
        self.config["zero_allow_untested_optimizer"] = True
        self.config["gradient_clipping"] = float(gradient_clipping)
        self.config["gradient_accumulation_steps"] = 1
        self.config["managed_gradient_accumulation"] = False
        if bf16:
            self.config["bf16"] = {"enabled": True}
        _deep_update(self.config, overrides or {})
        self.stage = stage
        self.bf16 = bf16
        self.partition_frozen = partition_frozen
        self.zero_init = zero_init
        self._engines: dict[str, deepspeed.DeepSpeedEngine] = {}
        self._frozen_engines: dict[str, deepspeed.DeepSpeedEngine] = {}
        self._engine_of_optimizer: dict[int, deepspeed.DeepSpeedEngine] = {}
        self._pending_backward: set[str] = set()

    # -- CPU support: the parent insists on CUDA devices with index == local rank ----------------------------

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.strategies.deepspeed import _validate_device_index_selection

        assert self.parallel_devices is not None
        if self.root_device.type == "cuda":
            _validate_device_index_selection(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _ds_args(self) -> argparse.Namespace:
        index = self.root_device.index
        return argparse.Namespace(device_rank=self.local_rank if index is None else index)

    # -- config -----------------------------------------------------------------------------------------------

    def _format_batch_size_and_grad_accum_config(self) -> None:
        # The parent puts Trainer(accumulate_grad_batches) and gradient_clip_val here; both are the module's
        # business under manual optimization, so only the (logging-only) micro batch size is filled in.
        assert isinstance(self.config, dict)
        if self.lightning_module is None:
            return
        if "train_micro_batch_size_per_gpu" not in self.config:
            try:
                batch = self._auto_select_batch_size()
            except AttributeError:  # a loader that yields whole batches (batch_size=None) has no batch sampler
                batch = 1
            self.config["train_micro_batch_size_per_gpu"] = batch

    def _frozen_config(self) -> dict[str, Any]:
        assert isinstance(self.config, dict)
        zero = {k: v for k, v in self.config["zero_optimization"].items() if k != "offload_optimizer"}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.config.get("train_micro_batch_size_per_gpu", 1),
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
        }
        if self.config.get("bf16", {}).get("enabled"):
            cfg["bf16"] = {"enabled": True}
        return cfg

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        if self.zero_init:
            with super().model_sharded_context():
                yield
        else:
            self._init_config_if_needed()
            yield

    # -- engines ----------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer) -> None:
        precision = self.precision_plugin.precision
        if self.bf16 and not precision.startswith("bf16"):
            raise ValueError(
                f"MultiEngineDeepSpeedStrategy(bf16=True) needs Trainer(precision='bf16-mixed'), got '{precision}'"
            )
        super().setup(trainer)
        if self.zero_stage_3 and not self.partition_frozen and frozen_module_names(self.lightning_module):
            # Lightning's DeepSpeedSummary asserts every parameter is ZeRO-3 partitioned; replicated frozen
            # networks break that, so the summary is skipped rather than crash (notes §1.3).
            from lightning.pytorch.callbacks import ModelSummary

            kept = [cb for cb in trainer.callbacks if not isinstance(cb, ModelSummary)]
            if len(kept) != len(trainer.callbacks):
                rank_zero_info("MultiEngineDeepSpeedStrategy: model summary disabled (ZeRO-3 with replicated teacher)")
                trainer.callbacks = kept

    def _initialize_deepspeed_train(self, model: nn.Module) -> None:
        import deepspeed

        assert isinstance(model, pl.LightningModule)
        names = engine_module_names(model)
        if "optimizer" in self.config:
            raise ValueError("MultiEngineDeepSpeedStrategy: put optimizers in configure_optimizers, not the DS config")
        optimizers, scheduler_configs = _init_optimizers_and_lr_schedulers(model)
        if len(optimizers) != len(names):
            raise ValueError(
                f"{type(model).__name__}.configure_optimizers returned {len(optimizers)} optimizers but "
                f"engine_modules names {len(names)} networks {names}; they must match one to one, in order"
            )
        _check_trainable_params_covered(model, names, type(self).__name__)
        self._engines, self._engine_of_optimizer = {}, {}
        ds_optimizers = []
        for name, optimizer in zip(names, optimizers):
            net = getattr(model, name)
            owned = {id(p) for p in net.parameters()}
            foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
            if foreign:
                raise ValueError(f"optimizer for {name!r} holds {len(foreign)} parameters that are not in {name!r}")
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=self._ds_args(), config=self.config, model=net, optimizer=optimizer, dist_init_required=False
            )
            engine.register_forward_hook(self._record_forward(name))
            self._engines[name] = engine
            self._engine_of_optimizer[id(ds_optimizer)] = engine
            ds_optimizers.append(ds_optimizer)
        self._setup_frozen(model)
        self._set_deepspeed_activation_checkpointing()
        self.optimizers = ds_optimizers
        self.lr_scheduler_configs = scheduler_configs
        self.model = model

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:

        assert isinstance(model, pl.LightningModule)
        self._engines = {}
        for name in engine_module_names(model):
            net = getattr(model, name)
            if self.zero_stage_3:
                self._engines[name] = self._optimizerless_engine(net)
            else:
                net.to(self.root_device)
        self._setup_frozen(model)
        self.model = model

    def _optimizerless_engine(self, net: nn.Module) -> Any:
        """A ZeRO-3 engine without optimizer: partitions ``net`` for forward-only use."""
        import deepspeed

        return deepspeed.initialize(
            args=self._ds_args(), config=self._frozen_config(), model=net, model_parameters=[], dist_init_required=False
        )[0]

    def _setup_frozen(self, model: pl.LightningModule) -> None:

        self._frozen_engines = {}
        # bf16 may come from bf16=True or from Trainer(precision="bf16-*") (Lightning fills the config).
        bf16 = bool(self.config.get("bf16", {}).get("enabled"))
        for name in frozen_module_names(model):
            net = getattr(model, name)
            if any(p.requires_grad for p in net.parameters()):
                raise ValueError(f"frozen network {name!r} has parameters with requires_grad=True; freeze it first")
            if self.zero_stage_3 and self.partition_frozen:
                self._frozen_engines[name] = self._optimizerless_engine(net)
            else:
                net.to(self.root_device, dtype=torch.bfloat16 if bf16 else None)

    def network(self, name: str) -> nn.Module:
        """The engine of network ``name`` if it has one, else the submodule (see :func:`network`)."""
        engine = self._engines.get(name) or self._frozen_engines.get(name)
        return engine if engine is not None else getattr(self.lightning_module, name)

    def _check_clipping(self, max_norm: float) -> None:
        configured = float(self.config.get("gradient_clipping", 0.0))
        if abs(configured - max(max_norm, 0.0)) > 1e-12:
            raise ValueError(
                f"max_norm={max_norm} differs from MultiEngineDeepSpeedStrategy(gradient_clipping={configured}); "
                "DeepSpeed clips inside engine.step(), set the strategy's gradient_clipping to match"
            )

    def clip_network_gradients(self, module: pl.LightningModule, name: str, optimizer: Any, max_norm: float) -> Tensor:
        """Check ``max_norm`` against ``gradient_clipping`` (the engine clips in ``step()``) and return the total
        gradient norm DeepSpeed measured at this network's *previous* step (NaN before the first): the norm of the
        current gradients is only computed inside ``engine.step()``, from the partitioned buffers."""
        self._check_clipping(max_norm)
        norm = self._engines[name].get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    @property
    def engines(self) -> dict[str, deepspeed.DeepSpeedEngine]:
        """Trainable engines by network name (the frozen ones are in ``frozen_engines``)."""
        return dict(self._engines)

    @property
    def frozen_engines(self) -> dict[str, deepspeed.DeepSpeedEngine]:
        return dict(self._frozen_engines)

    # -- backward and step ------------------------------------------------------------------------------------

    def _record_forward(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                self._pending_backward.add(name)

        return hook

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # The backward goes to the one engine that ran a grad-enabled forward since the last backward:
        # engine.backward() brackets the whole backward with the ZeRO prologue/epilogue. (A plain
        # loss.backward() relies on hooks on each forward's outputs, which break when the engine ran several
        # grad-enabled forwards, as a rollout does: DeepSpeed 0.19.8 raises KeyError in the ZeRO epilogue.)
        assert self.lightning_module is not None
        pending = [name for name in self._engines if name in self._pending_backward]
        self._pending_backward.clear()
        if len(pending) > 1:
            raise RuntimeError(
                f"MultiEngineDeepSpeedStrategy: the loss follows grad-enabled forwards of several trainable networks "
                f"{pending}; run the others under torch.no_grad() (one trainable network per backward)"
            )
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        if pending:
            retain_graph = bool(kwargs.pop("retain_graph", False))
            if args or kwargs:
                raise TypeError(f"MultiEngineDeepSpeedStrategy.backward takes only retain_graph, got {args} {kwargs}")
            # GAS is 1 (the module owns accumulation), so scale_wrt_gas would be a no-op anyway.
            self._engines[pending[0]].backward(closure_loss, retain_graph=retain_graph, scale_wrt_gas=False)
        else:
            closure_loss.backward(*args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(
        self, optimizer: Optimizer, closure: Any, model: pl.LightningModule | nn.Module | None = None, **kwargs: Any
    ) -> Any:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        engine = self._engine_of_optimizer.get(id(optimizer))
        if engine is None:
            raise ValueError("MultiEngineDeepSpeedStrategy.optimizer_step: optimizer belongs to no engine")
        model = model or self.lightning_module
        closure()
        self.precision_plugin._after_closure(model, optimizer)
        return engine.step(**kwargs)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the engines save the networks

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return {}  # the engines save the (partitioned) optimizer states

    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        rank_local = checkpoint.pop(RANK_LOCAL_KEY, None)
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        for i, (name, engine) in enumerate(self._engines.items()):
            # Explicit tags: every engine rewrites the shared ``latest`` file, so loading never relies on it.
            engine.save_checkpoint(str(path), tag=name, client_state=client if i == 0 else {}, save_latest=False)
        _save_rank_local(path, rank_local, self.global_rank, self.world_size)
        self.barrier("multi_engine_save")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.lightning_module is not None
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            raise NotImplementedError(
                f"{type(self).__name__} loads checkpoints only to resume fit; export the weights with "
                "gather_full_state_dict / ShardedEMA.full_state_dict for evaluation"
            )
        missing = [name for name in self._engines if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} is not a {type(self).__name__} checkpoint: no tag folder for {missing}")
        client_state: dict[str, Any] = {}
        for i, (name, engine) in enumerate(self._engines.items()):
            load_path, state = engine.load_checkpoint(
                str(path),
                tag=name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading,
            )
            if load_path is None:
                raise FileNotFoundError(f"DeepSpeed could not load tag {name!r} from {path}")
            if i == 0:
                client_state = dict(state or {})
        rank_local = _load_rank_local(path, self.global_rank, self.world_size)
        if rank_local is not None:
            client_state[RANK_LOCAL_KEY] = rank_local
        return client_state


# ---------------------------------------------------------------------------------------------------------------
# 5. FSDP2: fully_shard per block and per network
# ---------------------------------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) per transformer block and per network, on Lightning's ``ModelParallelStrategy``.

    In ``setup`` (before the optimizers are built), for each trainable network in ``module.engine_modules``:
    ``fully_shard`` each child of ``network.<block_attr>`` (the transformer blocks: parameters are gathered one
    block at a time), then the network itself (the rest: embeddings, head). Frozen networks are sharded the same
    way when ``shard_frozen``, otherwise replicated. A module that already applied ``fully_shard`` in its own
    ``configure_model`` is left as it is. The device mesh is 1-D data parallel over all ranks.

    Checkpoints are ``ModelParallelStrategy``'s distributed checkpoints (a DCP folder with both optimizers)
    plus per-rank state in ``<ckpt>/rank_local/``. ``self.clip_gradients`` works on the DTensor gradients, so
    :func:`clip_gradients` simply calls it.

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
        _check_trainable_params_covered(module, names, type(self).__name__)
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
        assert self.model is not None and self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        self._shard_networks(self.lightning_module)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def clip_network_gradients(self, module: pl.LightningModule, name: str, optimizer: Any, max_norm: float) -> Tensor:
        """Clip network ``name``'s sharded gradients to total norm ``max_norm``; returns the (full) norm."""
        params = [p for p in getattr(module, name).parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the norm of a sharded gradient set is itself a (replicated) DTensor
        return norm.detach()

    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Any | None = None) -> None:
        rank_local = checkpoint.pop(RANK_LOCAL_KEY, None)
        super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        if rank_local:
            if not self._save_distributed_checkpoint:
                raise ValueError("FSDP2Strategy: per-rank state (sharded EMA) needs save_distributed_checkpoint=True")
            _save_rank_local(path, rank_local, self.global_rank, self.world_size)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        state = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            rank_local = _load_rank_local(path, self.global_rank, self.world_size)
            if rank_local is not None:
                state[RANK_LOCAL_KEY] = rank_local
        return state
