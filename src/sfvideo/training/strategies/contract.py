"""The contract between a training module with several networks and the strategies that distribute them.

Lightning's stock ``DeepSpeedStrategy`` wraps the whole LightningModule in one engine with one optimizer; the
strategies of this package (``deepspeed.py``, ``fsdp2.py``) keep each trainable network separate. A module they
can run satisfies :class:`MultiNetworkModule` (``sfvideo.training.base.TrainingModule`` does; the test module
``tests/training/_dist_module.py`` mimics it):

* class attributes ``engine_modules`` (trainable networks, in the order of the optimizers returned by
  ``configure_optimizers``) and ``frozen_modules`` (no optimizer);
* every forward of a network goes through :func:`network` (``module.net(name)``): under DeepSpeed this is the
  engine, whose forward installs the ZeRO gradient hooks; elsewhere the plain submodule;
* manual optimization: ``manual_backward(loss)``, :func:`clip_network_gradients`, ``opt.step()``,
  ``opt.zero_grad()``. Gradient accumulation is owned by the module for every strategy: divide the loss by ``k``
  and step every ``k`` micro-batches (DeepSpeed engines run with ``managed_gradient_accumulation=False`` so
  ``engine.step()`` is the accumulation boundary);
* ``grad_clip``: the max gradient norm the module clips each network to (0 = off); DeepSpeed engines clip with it;
* no gradient of one trainable network flows through another's backward (DMD guarantees it with
  ``no_grad``/``detach``);
* state that differs per rank (the sharded EMA) goes under ``checkpoint[RANK_LOCAL_KEY]`` in
  ``on_save_checkpoint``; both strategies write it to one file per rank (``rank_local.py``) and give it back in
  ``on_load_checkpoint``. Other strategies leave it in the ordinary checkpoint.

A strategy may provide two hooks, looked up by name: ``strategy.network(name)`` (the callable to run network
``name`` through) and ``strategy.clip_network_gradients(module, name, optimizer, max_norm) -> Tensor``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = [
    "MultiNetworkModule",
    "check_trainable_params_covered",
    "clip_network_gradients",
    "engine_module_names",
    "frozen_module_names",
    "gather_full_state_dict",
    "network",
]


@runtime_checkable
class MultiNetworkModule(Protocol):
    """What the multi-network strategies need from a LightningModule (see the module docstring)."""

    engine_modules: tuple[str, ...]
    """Trainable networks (attribute names), in the order of the optimizers from ``configure_optimizers``."""
    frozen_modules: tuple[str, ...]
    """Frozen networks: no optimizer, sharded or replicated by the strategy, never saved."""

    @property
    def grad_clip(self) -> float:
        """Max total gradient norm of each network (0 = no clipping)."""
        ...

    def net(self, name: str) -> nn.Module:
        """The callable to run network ``name`` through (:func:`network`)."""
        ...


def engine_module_names(module: nn.Module) -> tuple[str, ...]:
    """The trainable networks of ``module`` (``module.engine_modules``), in optimizer order."""
    names = tuple(getattr(module, "engine_modules", ()))
    if not names:
        raise ValueError(f"{type(module).__name__}.engine_modules is empty or missing: name the trainable networks")
    return names


def frozen_module_names(module: nn.Module) -> tuple[str, ...]:
    """The frozen networks of ``module`` (``module.frozen_modules``, default none)."""
    return tuple(getattr(module, "frozen_modules", ()))


def _strategy(module: pl.LightningModule) -> Any:
    try:
        return module.trainer.strategy
    except RuntimeError:  # not attached to a Trainer (a module used on its own)
        return None


def network(module: pl.LightningModule, name: str) -> nn.Module:
    """The callable to run network ``name`` of ``module`` through.

    Returns the DeepSpeed engine wrapping ``module.<name>`` under ``MultiEngineDeepSpeedStrategy`` (forward must
    go through it so ZeRO's gradient hooks run and ZeRO-3 gathers parameters), otherwise the submodule itself
    (FSDP2 installs its hooks on the submodule). The hook a strategy provides is ``strategy.network(name)``.
    """
    getter = getattr(_strategy(module), "network", None)
    if getter is not None:
        return getter(name)
    return getattr(module, name)


def clip_network_gradients(module: pl.LightningModule, name: str, optimizer: Any, max_norm: float) -> Tensor:
    """Clip network ``name``'s gradients to total norm ``max_norm`` as the strategy requires; returns the norm.

    The one clipping path of every training module: the strategy's ``clip_network_gradients`` hook where it has
    one (DeepSpeed clips inside ``engine.step()`` and reports the previous step's norm; FSDP2 clips DTensor
    gradients), else ``torch.nn.utils.clip_grad_norm_`` over the network's parameters that have a gradient.
    """
    hook = getattr(_strategy(module), "clip_network_gradients", None)
    if hook is not None:
        return hook(module, name, optimizer, max_norm)
    params = [p for p in getattr(module, name).parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()


def check_trainable_params_covered(module: nn.Module, names: tuple[str, ...], strategy: str) -> None:
    """Raise unless every trainable parameter of ``module`` belongs to one of the networks ``names``."""
    stray = [
        n for n, p in module.named_parameters() if p.requires_grad and not any(n.startswith(f"{e}.") for e in names)
    ]
    if stray:
        raise ValueError(
            f"{strategy}: trainable parameters outside engine_modules {names} would never be synchronised: "
            f"{stray[:3]}{' ...' if len(stray) > 3 else ''}; freeze them or add their network to engine_modules"
        )


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
