"""DeepSpeed ZeRO with one engine per trainable network (``MultiEngineDeepSpeedStrategy``).

See ``contract.py`` for what the LightningModule provides. Runs on CPU for tests (``DS_ACCELERATOR=cpu``, gloo).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from sfvideo.checkpoints import RANK_LOCAL_KEY
from sfvideo.training.strategies.contract import (
    check_trainable_params_covered,
    engine_module_names,
    frozen_module_names,
)
from sfvideo.training.strategies.rank_local import load_rank_local, save_rank_local

if TYPE_CHECKING:
    import deepspeed

__all__ = ["MultiEngineDeepSpeedStrategy"]


def _deep_update(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


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
      state (``checkpoint[RANK_LOCAL_KEY]``, e.g. the sharded EMA) in ``<ckpt>/<RANK_LOCAL_KEY>/``. Frozen networks are
      not saved (they come from their pretrained weights). Resume needs the same world size.
    * Runs on CPU for tests (``DS_ACCELERATOR=cpu``, gloo): the CUDA-only checks are skipped there.

    YAML::

        trainer:
          precision: bf16-mixed
          strategy:
            class_path: sfvideo.training.strategies.MultiEngineDeepSpeedStrategy
            init_args: {stage: 2, bf16: true}   # gradient_clipping: the module's optim.grad_clip
    """

    strategy_name = "multi_engine_deepspeed"

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        bf16: bool = False,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        partition_frozen: bool = True,
        gradient_clipping: float | None = None,
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
            gradient_clipping: total-norm clipping applied by each engine in ``step()`` (0 = off). Unset: the
                module's ``grad_clip`` (``model.init_args.optim.grad_clip``); set, it must equal it.
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
        if gradient_clipping is not None and gradient_clipping < 0:
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
        self.config["gradient_clipping"] = None if gradient_clipping is None else float(gradient_clipping)
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
        if self.root_device.type == "cuda":
            super().setup_distributed()  # validates the device indices, then the same three steps
            return
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
        # The base Strategy's optimizer set-up (DeepSpeedStrategy's own defers to its single engine).
        Strategy.setup_optimizers(self, model.trainer)
        optimizers, scheduler_configs = self.optimizers, self.lr_scheduler_configs
        if len(optimizers) != len(names):
            raise ValueError(
                f"{type(model).__name__}.configure_optimizers returned {len(optimizers)} optimizers but "
                f"engine_modules names {len(names)} networks {names}; they must match one to one, in order"
            )
        check_trainable_params_covered(model, names, type(self).__name__)
        if self.config["gradient_clipping"] is None:  # unset: the module's own max norm
            self.config["gradient_clipping"] = float(getattr(model, "grad_clip", 0.0) or 0.0)
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
        configured = float(self.config.get("gradient_clipping") or 0.0)
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
        engine = self._engines.get(name)
        norm = engine.get_global_grad_norm() if engine is not None else None
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

    def save_checkpoint(
        self, checkpoint: dict, filepath: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        rank_local = checkpoint.pop(RANK_LOCAL_KEY, None)
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        for i, (name, engine) in enumerate(self._engines.items()):
            # Explicit tags: every engine rewrites the shared ``latest`` file, so loading never relies on it.
            engine.save_checkpoint(str(path), tag=name, client_state=client if i == 0 else {}, save_latest=False)
        save_rank_local(path, rank_local, self.global_rank, self.world_size)
        self.barrier("multi_engine_save")

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
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
        rank_local = load_rank_local(path, self.global_rank, self.world_size)
        if rank_local is not None:
            client_state[RANK_LOCAL_KEY] = rank_local
        return client_state
