"""Multi-GPU strategies for training several networks with their own optimizers (generator + critic).

Lightning's stock ``DeepSpeedStrategy`` wraps the whole LightningModule in one engine with one optimizer, and
FSDP1 (``FSDPStrategy``) wraps it in one root FSDP unit whose state breaks under several backwards per step
(docs/distributed.md). The strategies here keep each trainable network separate:

* :class:`MultiEngineDeepSpeedStrategy` (``deepspeed.py``): one DeepSpeed engine per (trainable network,
  optimizer), ZeRO 1/2/3, optional CPU offload, the frozen teacher optionally partitioned as an optimizer-less
  ZeRO-3 engine.
* :class:`FSDP2Strategy` (``fsdp2.py``): Lightning's ``ModelParallelStrategy`` plus ``fully_shard`` per
  transformer block and per network, applied by the strategy.

The module contract is ``contract.py`` (:class:`MultiNetworkModule`); per-rank checkpoint files are
``rank_local.py``; the sharded EMA is ``sfvideo.training.ema``.
"""

from sfvideo.training.strategies.contract import (
    MultiNetworkModule,
    check_trainable_params_covered,
    clip_network_gradients,
    engine_module_names,
    frozen_module_names,
    gather_full_state_dict,
    network,
)
from sfvideo.training.strategies.deepspeed import MultiEngineDeepSpeedStrategy
from sfvideo.training.strategies.fsdp2 import FSDP2Strategy
from sfvideo.training.strategies.rank_local import load_rank_local, save_rank_local

__all__ = [
    "FSDP2Strategy",
    "MultiEngineDeepSpeedStrategy",
    "MultiNetworkModule",
    "check_trainable_params_covered",
    "clip_network_gradients",
    "engine_module_names",
    "frozen_module_names",
    "gather_full_state_dict",
    "load_rank_local",
    "network",
    "save_rank_local",
]
