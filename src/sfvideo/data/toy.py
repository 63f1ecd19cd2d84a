"""The toy world as training data: rendered videos encoded to latents, on the fly, for the teacher and baselines.

Each rank renders its own scenes: sample i of rank r at step s uses seed ``hash(seed, r, s, i)`` and a prompt from
the training split, so nothing is stored and every run is reproducible. The held-out attribute combinations
(``sfvideo.toy.world.heldout_prompts``) never appear.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sfvideo.toy.encoders import ToyCodec
from sfvideo.toy.world import ToyWorldConfig, render_batch, sample_prompts


class ToyVideoStream(IterableDataset):
    """Infinite stream of ``{"prompts": [...], "latents": (B, F, C, h, w), "seeds": (B,)}`` batches.

    ``num_scenes > 0`` fixes the data to that many (prompt, scene seed) pairs, drawn once from ``seed``
    (rank-independent, so every rank sees the same set); each batch then samples them uniformly with replacement.
    """

    def __init__(
        self,
        world: ToyWorldConfig,
        codec: ToyCodec,
        batch_size: int,
        seed: int,
        rank: int,
        two_object_fraction: float = 0.0,
        start_batch: int = 0,
        num_scenes: int = 0,
    ) -> None:
        super().__init__()
        self.world, self.codec, self.batch_size = world, codec, batch_size
        self.seed, self.rank, self.start_batch = seed, rank, start_batch
        self.two_object_fraction = two_object_fraction
        self.scenes: list[tuple[str, int]] = []
        if num_scenes > 0:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
            prompts = sample_prompts(num_scenes, g, split="train", two_object_fraction=two_object_fraction)
            seeds = torch.randint(0, 2**31 - 1, (num_scenes,), generator=g).tolist()
            self.scenes = list(zip(prompts, seeds))

    def __iter__(self) -> Iterator[dict]:
        step = self.start_batch
        while True:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + step)
            if self.scenes:
                picks = torch.randint(len(self.scenes), (self.batch_size,), generator=g).tolist()
                prompts = [self.scenes[i][0] for i in picks]
                seeds = torch.tensor([self.scenes[i][1] for i in picks])
            else:
                prompts = sample_prompts(self.batch_size, g, split="train",
                                         two_object_fraction=self.two_object_fraction)
                seeds = torch.randint(0, 2**31 - 1, (self.batch_size,), generator=g)
            with torch.no_grad():
                video = render_batch(prompts, seeds.tolist(), self.world)
                latents = self.codec.encode(video)
            yield {"prompts": prompts, "latents": latents, "seeds": seeds}
            step += 1


class ToyVideoDataModule(L.LightningDataModule):
    """Rendered toy-world clips as latents (for flow-matching training of the teacher and the TF/DF baselines).

    Args:
        world: rendering and physics parameters of the toy world.
        spatial_stride: pixel-unshuffle factor of the toy codec (latent = ``3·s²`` channels at ``H/s × W/s``).
        batch_size: clips per rank per step.
        two_object_fraction: share of scenes with two objects.
        seed: seed of prompts and scenes.
        num_scenes: 0 = a new scene for every sample (the default); ``n > 0`` = a fixed set of ``n`` training
            scenes (the overfit test).
        num_workers: rendering processes (1 renders the next batch while the model trains on this one).
    """

    def __init__(
        self,
        world: ToyWorldConfig = ToyWorldConfig(),
        spatial_stride: int = 4,
        batch_size: int = 8,
        two_object_fraction: float = 0.0,
        seed: int = 0,
        num_scenes: int = 0,
        num_workers: int = 1,
    ) -> None:
        super().__init__()
        self.num_workers = num_workers
        if num_scenes < 0:
            raise ValueError(f"--data.init_args.num_scenes must be >= 0, got {num_scenes}")
        self.num_scenes = num_scenes
        if batch_size <= 0:
            raise ValueError(f"--data.init_args.batch_size must be positive, got {batch_size}")
        self.world = world
        self.codec = ToyCodec(spatial_stride=spatial_stride)
        self.batch_size, self.two_object_fraction, self.seed = batch_size, two_object_fraction, seed
        self._batches_consumed = 0

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = ToyVideoStream(
            self.world, self.codec, self.batch_size, self.seed, rank, self.two_object_fraction, self._batches_consumed,
            num_scenes=self.num_scenes,
        )
        # One stream per rank; with a worker process the stream is rendered there (a single worker keeps the
        # order and the resume position exact).
        return DataLoader(stream, batch_size=None, num_workers=min(self.num_workers, 1),
                          persistent_workers=self.num_workers > 0)

    def count_consumed_batch(self) -> None:
        self._batches_consumed += 1

    def state_dict(self) -> dict:
        return {"batches_consumed": self._batches_consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._batches_consumed = int(state_dict.get("batches_consumed", 0))
