"""Per-rank checkpoint files: state that differs per rank (the sharded EMA) next to a folder checkpoint.

Both multi-network strategies save ``checkpoint[RANK_LOCAL_KEY]`` with :func:`save_rank_local` into
``<ckpt>/<RANK_LOCAL_KEY>/rank_<r>.pt`` (and ``replicated.pt`` for entries marked ``"replicated": True``, written
once by rank 0) and give it back with :func:`load_rank_local`. Resume needs the same world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sfvideo.checkpoints import RANK_LOCAL_KEY

__all__ = ["load_rank_local", "save_rank_local"]


def save_rank_local(ckpt_dir: Path, state: Mapping[str, Any] | None, rank: int, world_size: int) -> None:
    """Write this rank's entries of ``state`` (and, on rank 0, the replicated ones) under ``ckpt_dir``."""
    if not state:
        return
    folder = Path(ckpt_dir) / RANK_LOCAL_KEY
    folder.mkdir(parents=True, exist_ok=True)
    own = {k: v for k, v in state.items() if not (isinstance(v, Mapping) and v.get("replicated"))}
    shared = {k: v for k, v in state.items() if k not in own}
    torch.save({"world_size": world_size, "state": own}, folder / f"rank_{rank:05d}.pt")
    if rank == 0 and shared:
        torch.save({"world_size": world_size, "state": shared}, folder / "replicated.pt")


def load_rank_local(ckpt_dir: Path, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's state written by :func:`save_rank_local`, or None when ``ckpt_dir`` holds none."""
    folder = Path(ckpt_dir) / RANK_LOCAL_KEY
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
