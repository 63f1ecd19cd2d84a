"""Prompt data for data-free distillation: a text file with one prompt per line (VidProS-style), or a function
returning the prompts (the toy world's ``sfvideo.toy.world.train_prompts``).

Self Forcing with DMD needs no videos: each iteration draws one batch of prompts for the generator update and
another for the critic update (notes §3.7). The sampler is infinite, seeded, and split across ranks: rank r
takes every world_size-th index of one shared permutation per epoch, so ranks never draw the same prompt in a pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sfvideo.files import read_prompt_file


class PromptStream(IterableDataset):
    """Infinite, seeded, rank-split stream of prompt batches ``{"generator": [...], "critic": [...]}``.

    Args:
        prompts: the prompt list.
        batch_size: prompts per batch and per role (per rank).
        seed: base seed; the permutation of epoch e uses ``seed + e`` on every rank (shared), and each rank
            reads its own stride of it.
        rank / world_size: position of this process; read from torch.distributed when left at None.
        start_batch: batches of this rank to skip (exact resume of the data position).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _indices(self) -> Iterator[int]:
        rank, world = self._rank_world()
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(len(self.prompts), generator=g).tolist()
            # With fewer prompts than ranks every rank still needs data: wrap the permutation.
            while len(perm) < world:
                perm = perm + perm
            yield from perm[rank::world]
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        if get_worker_info() is not None and get_worker_info().num_workers > 1:
            raise RuntimeError("PromptStream is meant for num_workers <= 1 (prompts are cheap to read)")
        it = self._indices()
        batch_index = 0
        while True:
            gen = [self.prompts[next(it)] for _ in range(self.batch_size)]
            crit = [self.prompts[next(it)] for _ in range(self.batch_size)]
            if batch_index >= self.start_batch:
                yield {"generator": gen, "critic": crit}
            batch_index += 1


class PromptDataModule(L.LightningDataModule):
    """Prompts from a text file (one per line) or from a function (e.g. the toy world's training split).

    Args:
        prompts_file: text file with one prompt per line; blank lines are skipped.
        prompt_source: a function returning the prompts, used when there is no ``prompts_file`` (the toy configs
            set ``sfvideo.toy.world.train_prompts``).
        batch_size: prompts per rank for each of the generator and the critic updates (times the
            module's gradient accumulation micro-batches).
        seed: seed of the shared prompt permutation.
        predict_prompts_file: prompts for ``sfvideo predict`` (defaults to ``prompts_file``).
        val_batches: batches of ``sfvideo validate`` / ``test`` (a fixed draw, seeded apart from training).
    """

    def __init__(
        self,
        prompts_file: str | None = None,
        prompt_source: Callable[[], Sequence[str]] | None = None,
        batch_size: int = 1,
        seed: int = 0,
        predict_prompts_file: str | None = None,
        val_batches: int = 2,
    ) -> None:
        super().__init__()
        if prompts_file is None and prompt_source is None:
            raise ValueError("PromptDataModule: set --data.init_args.prompts_file (or prompt_source)")
        self.prompts_file = prompts_file
        self.prompt_source = prompt_source
        self.batch_size = batch_size
        self.seed = seed
        self.predict_prompts_file = predict_prompts_file
        self.val_batches = val_batches
        self._batches_consumed = 0
        if batch_size <= 0:
            raise ValueError(f"--data.init_args.batch_size must be positive, got {batch_size}")
        for key, path in (("prompts_file", prompts_file), ("predict_prompts_file", predict_prompts_file)):
            if path is not None and Path(path).is_dir():
                raise FileNotFoundError(f"--data.init_args.{key} {path} is a directory, not a file of prompts")
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--data.init_args.{key} {path}: no such file")

    def _prompts(self) -> list[str]:
        if self.prompts_file is not None:
            return read_prompt_file(self.prompts_file)
        return list(self.prompt_source())

    def setup(self, stage: str) -> None:
        self.prompts = self._prompts()

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        # Resume at the same data position: Lightning restores `_batches_consumed` through state_dict().
        stream = PromptStream(self.prompts, self.batch_size, self.seed, rank, world, start_batch=self._batches_consumed)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        stream = iter(PromptStream(self.prompts, self.batch_size, self.seed + 1_000_003, rank=0, world_size=1))
        batches = [next(stream) for _ in range(self.val_batches)]
        return DataLoader(batches, batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        path = self.predict_prompts_file or self.prompts_file
        prompts = read_prompt_file(path) if path else self.prompts
        return DataLoader(prompts, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def count_consumed_batch(self) -> None:
        self._batches_consumed += 1

    def state_dict(self) -> dict:
        return {"batches_consumed": self._batches_consumed, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._batches_consumed = int(state_dict.get("batches_consumed", 0))
