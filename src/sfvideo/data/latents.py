"""Latent data for the distillation modules that need it: CausVid-style DF/TF + DMD (the generator's input is
noised data) and SF-GAN (the discriminator's real samples).

``training.distillation.Distillation`` takes per-role batches ``{"generator": part, "critic": part}``: each update
of an iteration has its own batch, as the official loop calls ``next(dataloader)`` once per update
(``trainer/distillation.py``, ``trainer/gan.py``). :class:`RoleBatches` makes them from consecutive batches of a
latent stream (``{"prompts": [B], "latents": (B, F, C, H, W)}``), so ``batch_size`` keeps its meaning (clips per
rank and update) and the data position counts both:

- :class:`ToyLatentDataModule`: rendered toy-world clips encoded by the toy codec (``data.toy.ToyVideoDataModule``),
  for the toy configs;
- :class:`ODELatentDataModule`: teacher samples, the final states of an ODE-pairs file or folder
  (``data.ode_pairs.ODEPairsDataModule``; the official LMDB's ``ode_latent[:, -1]``, CausVid's clean latents and
  SF-GAN's real samples), for the real Wan teacher.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from sfvideo.data.ode_pairs import ODEPairsDataModule
from sfvideo.data.toy import ToyVideoDataModule

__all__ = ["ROLES", "ODELatentDataModule", "RoleBatches", "ToyLatentDataModule", "per_role"]

ROLES = ("generator", "critic")
"""The updates of one distillation iteration, in order, each with its own batch."""


class RoleBatches(IterableDataset):
    """Consecutive batches ``{"prompts", "latents", ...}`` of a stream as ``{"generator": b_k, "critic": b_k+1}``
    (each part keeps ``prompts`` and ``latents``)."""

    def __init__(self, stream: Iterable[dict[str, Any]]) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]:
        batches = iter(self.stream)
        while True:
            parts = {}
            for role in ROLES:
                batch = next(batches, None)
                if batch is None:
                    return
                parts[role] = {"prompts": list(batch["prompts"]), "latents": batch["latents"]}
            yield parts


def per_role(loader: DataLoader) -> DataLoader:
    """``loader`` (over an iterable stream, ``batch_size=None``) yielding :class:`RoleBatches` instead."""
    return DataLoader(RoleBatches(loader.dataset), batch_size=None, num_workers=loader.num_workers,
                      persistent_workers=loader.persistent_workers)


class ToyLatentDataModule(ToyVideoDataModule):
    """Toy-world clips as distillation batches: ``batch_size`` clips per rank for each of the generator and the
    critic update. Arguments as ``data.toy.ToyVideoDataModule`` (prompts from the training split only)."""

    def train_dataloader(self) -> DataLoader:
        return per_role(super().train_dataloader())

    def count_consumed_batch(self) -> None:
        for _ in ROLES:  # one stream batch per role
            super().count_consumed_batch()


class ODELatentDataModule(ODEPairsDataModule):
    """Teacher samples from an ODE-pairs file or folder as distillation batches: ``batch_size`` (prompt, final
    state) pairs per rank for each of the generator and the critic update. Arguments as
    ``data.ode_pairs.ODEPairsDataModule`` (``state=-1``: the final ODE state)."""

    def train_dataloader(self) -> DataLoader:
        return per_role(super().train_dataloader())

    def count_consumed_batch(self) -> None:
        for _ in ROLES:
            super().count_consumed_batch()
