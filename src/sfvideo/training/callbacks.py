"""Callbacks: periodic evaluation of the generator on a fixed prompt set, with samples people can look at; the
progress bar of the distillation modules in generator steps; the training clock (time, peak memory and
snapshots of a run, for ``sfvideo reproduce``); ``torch.compile`` of the trained networks' blocks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from sfvideo.metrics.vbench.models import VBenchModelPaths


class SampleEvaluator(L.Callback):
    """Every ``every_n_generator_steps`` generator updates (and at the end of training): generate videos for a fixed
    prompt set with the module's inference engine (its EMA when ``use_ema``), write mp4s and a PNG contact sheet
    under ``<run>/samples/step_<n>/``, log the contact sheet to TensorBoard and, with a ``scorer``, its metrics
    (``eval/<metric>``).

    Args:
        prompts: the fixed prompt set.
        every_n_generator_steps: evaluation period in generator updates (0 = only at the end).
        scorer: ``scorer(videos (B, T, 3, H, W) in [-1, 1], prompts) -> {metric: value}``, e.g.
            ``sfvideo.evaluation.score_toy_videos`` (the toy world's exact metrics); unset = no metrics.
        seed: noise seed (the same videos every evaluation, so progress is comparable).
        use_ema: evaluate the generator's EMA once it exists.
        write_videos: write mp4s and contact sheets, and log the videos to TensorBoard as GIFs (metrics are logged
            either way).
        vbench: VBench model files; when given, the VBench quality dimensions, their per-clip drift and coherence
            (``vbench/*``, ``sfvideo.metrics.vbench.training``) are logged too; absent models are reported missing.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_generator_steps: int = 20,
        scorer: Callable[[torch.Tensor, Sequence[str]], dict[str, Any]] | None = None,
        seed: int = 1234,
        use_ema: bool = False,
        write_videos: bool = True,
        vbench: VBenchModelPaths | None = None,
    ) -> None:
        super().__init__()
        if every_n_generator_steps < 0:
            raise ValueError(f"every_n_generator_steps must be >= 0, got {every_n_generator_steps}")
        if not prompts:
            raise ValueError("SampleEvaluator: prompts is empty")
        self.every = every_n_generator_steps
        self.prompts = list(prompts)
        self.scorer = scorer
        self.seed = seed
        self.use_ema = use_ema
        self.write_videos = write_videos
        self._last_step = -1
        self.vbench = None
        if vbench is not None:
            from sfvideo.metrics.vbench.training import VBenchSampleLogger

            self.vbench = VBenchSampleLogger(vbench)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = getattr(module, "generator_steps", trainer.global_step)
        if self.every and step != self._last_step and step % self.every == 0:
            self._last_step = step
            self.evaluate(trainer, module, step)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        step = getattr(module, "generator_steps", trainer.global_step)
        if step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, module, step)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: Any, step: int) -> dict[str, float]:
        if not trainer.is_global_zero or module.codec is None:
            return {}
        net = getattr(module, module.sample_network)
        was_training = net.training
        net.eval()
        try:
            # Before the EMA starts (or without one) the trained weights are evaluated.
            engine = module.inference_engine(use_ema=self.use_ema and getattr(module, "ema_ready", False))
            video = engine.decode(engine.generate(self.prompts, seed=self.seed)).clamp(-1, 1).float().cpu()
        finally:
            net.train(was_training)
        scores: dict[str, float] = {}
        if self.scorer is not None:
            raw = self.scorer(video, self.prompts)
            scores = {f"eval/{k}": float(v) for k, v in raw.items() if torch.as_tensor(v).numel() == 1}
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)
        if self.vbench is not None:
            scores.update(self.vbench(trainer, video, device=module.device))
        if self.write_videos:
            self._write(trainer, video, step)
        return scores

    def _write(self, trainer: L.Trainer, video: torch.Tensor, step: int) -> None:
        from sfvideo.video import contact_sheet, save_contact_sheet, write_mp4

        root = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{step:06d}"
        root.mkdir(parents=True, exist_ok=True)
        for i, (clip, prompt) in enumerate(zip(video, self.prompts, strict=True)):
            write_mp4(root / f"{i:02d}_{prompt.replace(' ', '_')[:80]}.mp4", clip)
        save_contact_sheet(root / "contact_sheet.png", video, columns=video.shape[1])
        (root / "prompts.txt").write_text("\n".join(self.prompts) + "\n")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                sheet = torch.from_numpy(contact_sheet(video, columns=video.shape[1]))
                experiment.add_image("samples/contact_sheet", sheet, global_step=trainer.global_step, dataformats="HWC")
        from sfvideo.metrics.vbench.training import log_sample_videos

        log_sample_videos(trainer, video)


class FinalLastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` at the end of training when the final step was not saved.

    Lightning 2.6's ``ModelCheckpoint(save_last=True, every_n_train_steps=K)`` refreshes ``last.ckpt`` only when it
    saves at a multiple of ``K`` (and at the end only if it never saved at all): a 120-step run with ``K = 100`` ends
    with ``last.ckpt`` at step 100, and what ``export``, ``--ckpt_path last``, the demo and ``reproduce`` read is 20
    steps stale. ``sfvideo fit`` adds this callback; it saves every such ``ModelCheckpoint``'s last checkpoint once
    more when training ends at a step none of them saved. An interrupted run is not "ended": its last checkpoint
    stays the last periodic one, which is what an exact resume needs.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.fast_dev_run:
            return
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_last", False) and cb._last_global_step_saved != trainer.global_step:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))


class CompileBlocks(L.Callback):
    """``torch.compile`` every transformer block of the module's trained networks (``engine_modules``) before
    training starts, applied from outside the model (``inference.graphs.compile_blocks``; each block compiles at
    its first call, forward and backward).

    Parameters and checkpoint keys are unchanged (``nn.Module.compile`` keeps the module), so a run with and without
    it resume each other's checkpoints. Measured on the toy teacher (6 blocks, batch 16, one thread of the 2-core
    Zen 4 machine, 2026-12-03): 1.28x per step in fp32 and 1.19x on top of bf16 autocast, after about 100 s of
    compilation; a win on long runs only. Add it with ``--trainer.callbacks+=sfvideo.training.callbacks.CompileBlocks``.

    Args:
        backend: the ``torch.compile`` backend (``eager`` checks the wiring without code generation).
        dynamic: compile for dynamic shapes (False: one graph per shape; training shapes are fixed).
    """

    def __init__(self, backend: str = "inductor", dynamic: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.dynamic = dynamic
        self.compiled: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        from sfvideo.inference.graphs import compile_blocks

        self.compiled = []  # a second fit with the same callback starts over
        for name in getattr(pl_module, "engine_modules", ()):
            net = getattr(pl_module, name, None)
            if net is not None and hasattr(net, "blocks"):
                compile_blocks(net, dynamic=self.dynamic, backend=self.backend)
                self.compiled.append(name)
        if not self.compiled:
            raise ValueError(f"CompileBlocks: {type(pl_module).__name__} trains no network with transformer blocks")


class GeneratorStepProgressBar(RichProgressBar):
    """The training bar of the distillation modules in generator updates: ``generator steps 3/10`` against the
    run's limit (``--trainer.max_steps`` / ``max_generator_steps``, see ``Distillation.generator_step_limit``),
    instead of batches against Lightning's ``global_step`` (which counts both networks' updates) and an epoch
    count. ``sfvideo fit`` uses it in place of Lightning's default bar for these modules."""

    def _limit(self) -> int | None:
        return getattr(self.trainer.lightning_module, "generator_step_limit", None)

    @property
    def total_train_batches(self) -> int | float:  # noqa: D102
        limit = self._limit()
        return float("inf") if limit is None else limit

    def _get_train_description(self, current_epoch: int) -> str:
        return "generator steps"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if self.train_progress_bar_id is None:  # one bar for the whole run, not one per pass over the data
            super().on_train_epoch_start(trainer, pl_module)
            self._update(self.train_progress_bar_id, getattr(pl_module, "generator_steps", 0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # noqa: D102
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, getattr(pl_module, "generator_steps", 0))
        self._update_metrics(trainer, pl_module)
        self.refresh()


def _reset_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory counter of ``device`` and return the memory in use now (bytes).

    CUDA: the caching allocator's peak of allocated bytes. CPU: the process's resident-set high-water mark
    (``VmHWM``), reset through ``/proc/self/clear_refs`` (Linux; where that is refused the mark keeps the process's
    whole history, and the JSON says so).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status("VmRSS")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is no such file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TrainingClock(L.Callback):
    """Time and peak memory of a training run, per iteration, and checkpoints at chosen generator updates.

    Writes ``path`` (JSON) at the end of training: per trainer iteration the generator-update counter (the module's
    ``generator_steps``, or the global step for single-network modules), the seconds since training started, and
    the iteration's own seconds; the peak memory of the run (CUDA: allocated bytes; CPU: resident-set high-water
    mark since set-up, and the resident set at set-up); and the snapshots. A snapshot is a full checkpoint written
    at generator update ``n`` for each ``n`` in ``snapshot_steps`` into ``snapshot_dir``; the time spent writing it
    is left out of the training clock, so metric-vs-wall-clock curves measure training only.

    Args:
        path: the JSON file.
        snapshot_steps: generator updates after which to write a checkpoint (empty: none).
        snapshot_dir: where snapshots go (``snapshot_<n>.ckpt``); needed with ``snapshot_steps``.
    """

    def __init__(self, path: str, snapshot_steps: Sequence[int] = (), snapshot_dir: str | None = None) -> None:
        super().__init__()
        if snapshot_steps and snapshot_dir is None:
            raise ValueError("TrainingClock: snapshot_steps needs snapshot_dir")
        self.path = Path(path)
        self.snapshot_steps = sorted(set(int(s) for s in snapshot_steps))
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.iterations: list[dict[str, float]] = []
        self.snapshots: list[dict[str, Any]] = []
        self._device = torch.device("cpu")
        self._rss_at_setup = 0
        self._start = 0.0
        self._paused = 0.0
        self._batch_start = 0.0

    @staticmethod
    def _counter(trainer: L.Trainer, module: Any) -> int:
        return int(getattr(module, "generator_steps", trainer.global_step))

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        self._device = trainer.strategy.root_device
        self._rss_at_setup = _reset_peak_memory(self._device)

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._start = time.perf_counter()
        self._paused = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._start - self._paused

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        now = self._now()
        step = self._counter(trainer, module)
        self.iterations.append({"generator_steps": step, "seconds": now, "iteration_seconds": now - self._batch_start})
        if self.snapshot_dir is not None and step in self.snapshot_steps and not any(
            s["generator_steps"] == step for s in self.snapshots
        ):
            t0 = time.perf_counter()
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            path = self.snapshot_dir / f"snapshot_{step}.ckpt"
            trainer.save_checkpoint(path)
            self.snapshots.append({"generator_steps": step, "seconds": now, "path": str(path)})
            self._paused += time.perf_counter() - t0

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_rank != 0:
            return
        peak = _peak_memory(self._device)
        record = {
            "device": str(self._device),
            "memory_kind": "cuda_max_allocated" if self._device.type == "cuda" else "process_peak_rss",
            "peak_memory_bytes": peak,
            "memory_at_setup_bytes": self._rss_at_setup,
            "train_seconds": self._now(),
            "iterations": self.iterations,
            "snapshots": self.snapshots,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=1) + "\n")
