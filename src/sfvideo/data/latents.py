"""Latent data for the distillation modules that need it: CausVid-style DF/TF + DMD (the generator's input is
noised data) and SF-GAN (the discriminator's real samples).

``training.distillation.Distillation`` takes per-role batches ``{"generator": part, "critic": part}`` (each update
draws its own, as the official loop does); a part here is ``{"prompts": [B], "latents": (B, F, C, H, W)}``.

- :class:`ToyLatentDataModule`: rendered toy-world clips encoded by the toy codec (``data.toy``), for the toy
  configs;
- ``training.latent_data.ODELatentDataModule``: teacher samples from an ODE-pairs file, for the real Wan teacher
  (it reads ``training.ode_pairs`` files, so it lives in the training layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from sfvideo.data.toy import ToyVideoDataModule, ToyVideoStream

__all__ = ["ROLES", "RoleSplit", "ToyLatentDataModule"]

ROLES = ("generator", "critic")
"""The updates of one distillation iteration, each with its own part of the batch."""


class RoleSplit(IterableDataset):
    """A stream of ``{"prompts", "latents", ...}`` batches of ``2 B`` as ``{"generator": first B, "critic": last B}``
    (each part keeps ``prompts`` and ``latents``)."""

    def __init__(self, stream: Iterable[dict[str, Any]]) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]:
        for batch in self.stream:
            half = len(batch["prompts"]) // 2
            parts = {ROLES[0]: slice(0, half), ROLES[1]: slice(half, 2 * half)}
            yield {role: {"prompts": list(batch["prompts"][s]), "latents": batch["latents"][s]}
                   for role, s in parts.items()}  # fmt: skip


class ToyLatentDataModule(ToyVideoDataModule):
    """Toy-world clips as latents for distillation: ``batch_size`` clips per rank for each of the generator and the
    critic update (rendered as one batch of ``2 batch_size`` and split). Arguments as ``data.toy.ToyVideoDataModule``;
    prompts come from the training split only."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = ToyVideoStream(self.world, self.codec, 2 * self.batch_size, self.seed, rank,
                                self.two_object_fraction, self._batches_consumed)  # fmt: skip
        return DataLoader(RoleSplit(stream), batch_size=None, num_workers=min(self.num_workers, 1),
                          persistent_workers=self.num_workers > 0)
