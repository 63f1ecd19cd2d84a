"""Teacher samples from an ODE-pairs file as distillation data (``training.ode_pairs``; the official LMDB of ODE
pairs, whose final state ``batch["ode_latent"][:, -1]`` is CausVid's clean latent and SF-GAN's real sample).

Batches are ``{"generator": part, "critic": part}`` with ``part = {"prompts": [B], "latents": (B, F, C, H, W)}``
(``training.distillation.Distillation``). Rows are drawn like prompts (``data.prompts.PromptStream``: an infinite,
seeded, rank-split permutation per epoch), and the data position is restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from sfvideo.data.prompts import PromptStream
from sfvideo.training.ode_pairs import ODEPairs, load_ode_pairs

__all__ = ["ODELatentDataModule"]


class _RowsToLatents(IterableDataset):
    """Batches of row indices (``{role: [rows]}``) as ``{role: {"prompts", "latents"}}``."""

    def __init__(self, rows: Iterable[dict[str, list[int]]], prompts: list[str], latents: Tensor) -> None:
        super().__init__()
        self.rows, self.prompts, self.latents = rows, prompts, latents

    def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]:
        for batch in self.rows:
            yield {role: {"prompts": [self.prompts[i] for i in rows], "latents": self.latents[rows].float()}
                   for role, rows in batch.items()}  # fmt: skip


class ODELatentDataModule(L.LightningDataModule):
    """(prompt, latent) pairs of a trajectories file written by ``training.ode_pairs.generate_ode_pairs``.

    Args:
        trajectories: the file (``(N, S + 1, F, C, H, W)`` states per prompt).
        batch_size: pairs per rank for each of the generator and the critic update.
        state: which state of each trajectory is the latent: -1 = the final ODE state, a teacher sample (official).
        seed: seed of the shared permutation of rows.
    """

    def __init__(self, trajectories: str, batch_size: int = 1, state: int = -1, seed: int = 0) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"--data.init_args.batch_size must be positive, got {batch_size}")
        self.trajectories, self.batch_size, self.state, self.seed = trajectories, batch_size, state, seed
        self.pairs: ODEPairs | None = None
        self._batches_consumed = 0

    def setup(self, stage: str) -> None:
        if self.pairs is None:
            self.pairs = load_ode_pairs(self.trajectories)
            states = self.pairs.trajectories.shape[1]
            if not -states <= self.state < states:
                raise ValueError(f"--data.init_args.state={self.state} outside the {states} states of "
                                 f"{self.trajectories}")  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        assert self.pairs is not None
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        rows = PromptStream(list(range(len(self.pairs.prompts))), self.batch_size, self.seed, rank, world,
                            start_batch=self._batches_consumed)  # fmt: skip
        latents = self.pairs.trajectories[:, self.state]
        return DataLoader(_RowsToLatents(rows, self.pairs.prompts, latents), batch_size=None, num_workers=0)

    def count_consumed_batch(self) -> None:
        self._batches_consumed += 1

    def state_dict(self) -> dict:
        return {"batches_consumed": self._batches_consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._batches_consumed = int(state_dict.get("batches_consumed", 0))
