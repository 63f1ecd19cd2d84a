"""A tiny two-network LightningModule that follows the sfvideo training contract, plus a runner script.

Used only by ``tests/training/test_strategies.py``, which runs this file as a subprocess (Lightning then launches
the other ranks by re-running the same command line)::

    DS_ACCELERATOR=cpu python tests/training/_dist_module.py --strategy zero2,fsdp2 --devices 2 --root /tmp/run \
        --accumulate 2 --max-steps 8 --resume-at 4

Every rank writes ``<root>/<strategy>/results/rank<r>.pt`` at the end of each fit: full parameters and EMA,
local Adam moments, counters, losses and the engine types, so the test can compare ranks and runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sfvideo.checkpoints import RANK_LOCAL_KEY
from sfvideo.training.ema import ShardedEMA
from sfvideo.training.strategies import (
    FSDP2Strategy,
    MultiEngineDeepSpeedStrategy,
    clip_network_gradients,
    gather_full_state_dict,
    network,
)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class TinyNet(nn.Module):
    """Input projection, ``depth`` residual blocks under ``.blocks`` (FSDP2 shards each), output projection."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class TwoNetworkModule(pl.LightningModule):
    """DMD-shaped alternation of generator and critic updates, with gradient accumulation and a sharded EMA."""

    engine_modules = ("generator", "critic")
    frozen_modules = ("teacher",)

    def __init__(
        self,
        dim: int = 8,
        depth: int = 2,
        accumulate: int = 1,
        batch_size: int = 2,
        max_norm: float = 0.5,
        lr: float = 1e-2,
        ema_decay: float = 0.8,
        ema_start: int = 1,
        results_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.accumulate = accumulate
        self.batch_size = batch_size
        self.max_norm = max_norm
        self.lr = lr
        self.results_dir = results_dir
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            self.generator = TinyNet(dim, depth)
            self.critic = TinyNet(dim, depth)
            self.teacher = TinyNet(dim, depth)
        self.teacher.requires_grad_(False).eval()
        self.data = torch.randn(64, dim, generator=torch.Generator().manual_seed(1))
        self.micro_steps = 0
        self.generator_steps = 0
        self.critic_steps = 0
        self.ema = ShardedEMA(decay=ema_decay, start_step=ema_start)
        self.history: list[tuple[float, float]] = []
        self.grad_norms: list[tuple[str, float]] = []
        self._micro: list[tuple[float, float]] = []

    def net(self, name: str) -> nn.Module:
        return network(self, name)

    def configure_optimizers(self):
        return [
            torch.optim.AdamW(self.generator.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=0.01),
            torch.optim.AdamW(self.critic.parameters(), lr=self.lr / 2, betas=(0.9, 0.99), weight_decay=0.01),
        ]

    def _micro_batch(self) -> torch.Tensor:
        # Rows come from the module's own micro-batch counter, not from Lightning's batch_idx / sampler (which
        # replay a batch when resuming from an end-of-epoch checkpoint): micro-batch m of rank r takes rows
        # [(m·W + r)·b, (m·W + r + 1)·b), so W ranks × b and 1 rank × W·b see the same samples per step.
        world, b = self.trainer.world_size, self.batch_size
        start = (self.micro_steps * world + self.global_rank) * b
        rows = torch.arange(start, start + b) % len(self.data)
        x = self.data[rows].to(self.device)
        strategy = self.trainer.strategy
        if isinstance(strategy, MultiEngineDeepSpeedStrategy) and strategy.bf16:
            x = x.to(torch.bfloat16)  # DeepSpeed bf16 engines hold bf16 weights and do not cast inputs
        return x

    def _clip(self, name: str, optimizer) -> None:
        # The one clipping path of the training modules: the strategy's per-network hook where there is one.
        has_hook = hasattr(self.trainer.strategy, "clip_network_gradients")
        norm = clip_network_gradients(self, name, optimizer, self.max_norm)
        if has_hook:
            self.grad_norms.append((name, float(norm)))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # Windows of ``accumulate`` micro-batches alternate between the generator (even windows) and the critic
        # (odd windows): within a window only one network changes, so k micro-batches of b equal one batch of k·b.
        x = self._micro_batch()
        k = self.accumulate
        window, position = divmod(self.micro_steps, k)
        boundary = position == k - 1
        self.micro_steps += 1
        opt_g, opt_c = self.optimizers()
        generator, critic, teacher = self.net("generator"), self.net("critic"), self.net("teacher")

        if window % 2 == 0:
            # Generator: two chained forwards with grad (a rollout calls the generator several times), DMD-style
            # direction (critic − teacher) with both under no_grad.
            y = generator(0.5 * generator(x))
            with torch.no_grad():
                direction = critic(y) - teacher(y)
            loss = 0.5 * ((y - (y - direction).detach()) ** 2).mean()
            self.manual_backward(loss / k)
            if boundary:
                self._clip("generator", opt_g)
                opt_g.step()
                opt_g.zero_grad()
                self.generator_steps += 1
                self.ema.update(self.generator, self.generator_steps)
        else:
            # Critic on detached generator samples.
            with torch.no_grad():
                y = generator(0.5 * generator(x))
            loss = ((critic(y) - x) ** 2).mean()
            self.manual_backward(loss / k)
            if boundary:
                self._clip("critic", opt_c)
                opt_c.step()
                opt_c.zero_grad()
                self.critic_steps += 1

        self._micro.append((float(loss.detach()), float(x.sum())))
        if boundary:
            losses, data = zip(*self._micro)
            self.history.append((sum(losses) / k, sum(data)))
            self._micro = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(64), batch_size=1)  # only drives the loop; data comes from _micro_batch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["counters"] = {
            "micro_steps": self.micro_steps,
            "generator_steps": self.generator_steps,
            "critic_steps": self.critic_steps,
        }
        # Losses differ per rank, so they are rank-local state like the sharded EMA.
        checkpoint[RANK_LOCAL_KEY] = {"generator_ema": self.ema.state_dict(), "history": {"values": self.history}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.micro_steps = checkpoint["counters"]["micro_steps"]
        self.generator_steps = checkpoint["counters"]["generator_steps"]
        self.critic_steps = checkpoint["counters"]["critic_steps"]
        self.history = list(checkpoint[RANK_LOCAL_KEY]["history"]["values"])
        self.ema.load_state_dict(checkpoint[RANK_LOCAL_KEY]["generator_ema"])

    def on_train_end(self) -> None:
        if self.results_dir is None:
            return
        strategy = self.trainer.strategy
        optimizers = list(self.trainer.optimizers)
        results = {
            "rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "global_step": self.trainer.global_step,
            "micro_steps": self.micro_steps,
            "generator_steps": self.generator_steps,
            "critic_steps": self.critic_steps,
            "history": list(self.history),
            "grad_norms": list(self.grad_norms),
            "networks": {n: type(self.net(n)).__name__ for n in ("generator", "critic", "teacher")},
            "num_optimizers": len(optimizers),
            "params": {n: gather_full_state_dict(getattr(self, n), rank0_only=False) for n in self._all_nets()},
            "ema": self.ema.full_state_dict(self.generator, rank0_only=False),
            "ema_num_updates": self.ema.num_updates,
            "moments": [_local_moments(opt) for opt in optimizers],
            "teacher_in_optimizer": _teacher_in_optimizers(self.teacher, optimizers),
            "engine_steps": {n: e.global_steps for n, e in getattr(strategy, "engines", {}).items()},
        }
        out = Path(self.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / f"rank{self.global_rank}.pt")

    @staticmethod
    def _all_nets() -> tuple[str, ...]:
        return ("generator", "critic", "teacher")


def _inner_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer that holds the Adam state (inside Lightning's and DeepSpeed's wrappers)."""
    opt = getattr(opt, "_optimizer", opt)
    if type(opt).__module__.startswith("deepspeed"):
        opt = opt.optimizer  # ZeRO wrapper -> the client AdamW over this rank's flat fp32 partitions
    return opt


def _local_moments(opt) -> dict[str, torch.Tensor | int]:
    """This rank's Adam moments, flattened, plus the total numel of the states (to bound what is optimised)."""
    inner = _inner_optimizer(opt)
    avg, sq, steps = [], [], []
    for state in inner.state.values():
        for key, bucket in (("exp_avg", avg), ("exp_avg_sq", sq)):
            t = state[key]
            t = t.to_local() if hasattr(t, "to_local") else t
            bucket.append(t.detach().float().flatten().cpu())
        steps.append(float(state["step"]))
    return {
        "exp_avg": torch.cat(avg) if avg else torch.zeros(0),
        "exp_avg_sq": torch.cat(sq) if sq else torch.zeros(0),
        "steps": steps,
    }


def _teacher_in_optimizers(teacher: nn.Module, optimizers) -> bool:
    teacher_ids = {id(p) for p in teacher.parameters()}
    for opt in optimizers:
        opt = getattr(opt, "_optimizer", opt)
        groups = [g["params"] for g in opt.param_groups]
        groups += list(getattr(opt, "bit16_groups", []) or []) + list(getattr(opt, "fp16_groups", []) or [])
        if any(id(p) in teacher_ids for group in groups for p in group):
            return True
    return False


class _Ticks(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def build_strategy(name: str):
    if name == "single":
        return "auto"
    if name.startswith("zero"):
        return MultiEngineDeepSpeedStrategy(
            stage=int(name[4]),
            bf16=name.endswith("_bf16"),
            gradient_clipping=0.5,
            partition_frozen=not name.endswith("_replicated"),
        )
    if name == "fsdp2":
        return FSDP2Strategy(shard_frozen=True)
    raise ValueError(f"unknown --strategy {name}")


def _fit(args: argparse.Namespace, strategy: str, max_steps: int, resume: bool) -> None:
    root = Path(args.root) / strategy
    model = TwoNetworkModule(accumulate=args.accumulate, batch_size=args.batch_size, results_dir=str(root / "results"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=build_strategy(strategy),
        max_steps=max_steps,
        precision="bf16-mixed" if strategy.endswith("_bf16") else "32-true",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(root),
        use_distributed_sampler=False,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)],
    )
    trainer.fit(model, ckpt_path="last" if resume else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--strategy",
        required=True,
        help="comma-separated list of: single, zero1, zero2, zero3, zero2_bf16, zero3_bf16, zero3_replicated, fsdp2",
    )
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--root", required=True)
    parser.add_argument(
        "--resume-at",
        type=int,
        default=0,
        help="first fit to this many steps, then a fresh Trainer "
        "and module resume from ckpt_path='last' up to --max-steps (0: one uninterrupted fit)",
    )
    args = parser.parse_args()
    # Each rank is a process of its own: the suite's per-process thread count (tests/conftest.py).
    torch.set_num_threads(int(os.environ.get("SFVIDEO_TEST_THREADS", "1")))
    # Several strategies run one after the other in the same processes (the process group is reused), which
    # saves the start-up of a launch per strategy.
    for strategy in args.strategy.split(","):
        if args.resume_at:
            _fit(args, strategy, args.resume_at, resume=False)
        _fit(args, strategy, args.max_steps, resume=bool(args.resume_at))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
