"""ODE initialisation of the causal generator (CausVid, Yin et al. 2025; Self Forcing's ``ode_init.pt``; notes §5).

Before Self Forcing, the causal few-step generator is regressed onto the bidirectional teacher's deterministic
ODE trajectories, so it learns causality and few-step denoising before DMD:

1. Trajectories (``sfvideo.diffusion.sampling.ode_trajectories``): for a prompt, the teacher runs a many-step
   flow-matching Euler ODE (the ``ode`` group: steps, shift, CFG) from Gaussian noise; the states at the
   generator's step sigmas ``sigma_0 > ... > sigma_{S-1}`` and the final sample ``x_final`` are kept:
   ``(B, S + 1, F, C, H, W)``. The official pairs (``data.ode_pairs.CAUSVID_ODE``: 48 steps, shift 8,
   standard CFG 6, states [0, 12, 24, 36, final]) are exactly the generator's ``[1000, 750, 500, 250]`` warped at
   shift 8; other settings refine the sampling grid so the states land exactly on the step sigmas
   (``sfvideo.diffusion.sampling.ode_sigmas``).
2. Regression (``sfvideo.losses.ode``): per sample and chunk a random index ``k`` in ``[0, S)``; every frame of
   the chunk takes the state ``k`` and the timestep ``N sigma_k``; one block-causal forward (no KV cache) predicts
   x0; loss = MSE(x0_pred, x_final) over frames with ``sigma_k != 0``.

Trajectories are generated on the fly with the frozen teacher (no LMDB), optionally reused for
``reuse_trajectories`` consecutive steps (they cost ``ode.num_steps`` guided teacher forwards each), or read from a
file or folder written once by ``data.ode_pairs`` (``sfvideo ode-pairs --config configs/ode.yaml`` writes the
folder named by ``trajectories``, resumably and across ranks; then the teacher is only the generator's initial
weights and is never run).

Randomness (``TrainingModule.rng``): trajectory noise ``(0, step, rank)``, chunk indices ``(1, step, rank)``, the
choice among duplicate prompts of a file ``(2, step, rank)``; the chunk indices need no agreement across ranks
(every rank runs the same single forward whatever they are). Known limitation (notes §5): a bidirectional
teacher's ODE is not causal; Causal Forcing argues for a causal teacher. This module accepts any teacher source,
including an AR-diffusion one trained by ``training/diffusion.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from sfvideo.config import NEGATIVE_PROMPT, InferenceSettings, ManyStepSampling, OptimConfig, StepSchedule
from sfvideo.data.ode_pairs import CAUSVID_ODE, ODEPairs, check_euler, load_ode_pairs
from sfvideo.diffusion.sampling import ode_trajectories, record_sigmas_for
from sfvideo.geometry import VideoGeometry
from sfvideo.losses.ode import ode_regression_loss, sample_chunk_indices
from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.nn.precision import compute_dtype
from sfvideo.training.base import TrainingModule
from sfvideo.training.optim import ODEAdamW


@dataclass
class TrajectoryBatch:
    """A generated (or looked-up) batch of trajectories and its prompt embeddings."""

    trajectory: Tensor
    """``(B, S + 1, F, C, H, W)``."""
    cond: Tensor
    """``(B, L, D)``."""
    step: int
    """Generator step at which it was made."""


class ODEInit(TrainingModule):
    """ODE regression of the causal generator onto the teacher's trajectories (CausVid / Self Forcing ODE init).

    Args:
        teacher: the bidirectional teacher: a flavor name (random weights, for tests), a diffusers folder, an
            original Wan2.1 file or a bundled asset name (see ``training.networks.build_transformer``).
        teacher_overrides: config overrides applied to a flavor.
        generator_init: weights the causal generator starts from; unset = the teacher's weights.
        geometry: latent clip shape and chunking (``frames_per_chunk`` is the block-causal chunk).
        text_encoder: frozen prompt encoder.
        codec: frozen latent codec, recorded for inference; unset = none.
        negative_prompt: prompt of the teacher's unconditional branch.
        schedule: the generator's few-step list (the states kept per trajectory). Shift 8 reproduces the official
            pairs (states [0, 12, 24, 36] of 48 steps at shift 8 = [1000, 750, 500, 250] warped at shift 8,
            notes §5); set 5 to train on the exact timesteps the Self Forcing stage uses.
        ode: the teacher's trajectory grid and CFG (official: ``data.ode_pairs.CAUSVID_ODE``; step sigmas off
            the grid are inserted, each costing one more teacher call).
        trajectories: file or folder of precomputed trajectories (``data.ode_pairs``; a folder is written,
            resumably, by ``sfvideo ode-pairs --config <this config>``); every batch prompt must be in it. Unset =
            generate on the fly with the teacher.
        reuse_trajectories: training steps that reuse one generated batch (with fresh chunk indices); the batch
            prompts of the steps in between are ignored. Generation costs ``ode.num_steps`` guided teacher
            forwards.
        optimizer: optimizer factory of the generator (default AdamW lr 2e-6, betas (0.9, 0.999)).
        optim: gradient clipping (10 officially) and accumulation.
        gradient_checkpointing: activation checkpointing per transformer block of the generator.
        teacher_dtype: precision the frozen teacher is held in.
        seed: seed of the random initialisation (flavors), the trajectory noise and the chunk indices.
    """

    engine_modules = ("generator",)
    counters = ("generator_steps",)

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Frozen networks for the strategies: the teacher, unless trajectories come from a file (then none)."""
        return ("teacher",) if self.hparams.trajectories is None else ()

    def __init__(
        self,
        teacher: str = "debug",
        teacher_overrides: dict[str, Any] | None = None,
        generator_init: str | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        text_encoder: TextEncoder | None = None,
        codec: VideoCodec | None = None,
        negative_prompt: str = NEGATIVE_PROMPT,
        schedule: StepSchedule = StepSchedule(shift=CAUSVID_ODE.shift),
        ode: ManyStepSampling = CAUSVID_ODE,
        trajectories: str | None = None,
        reuse_trajectories: int = 1,
        optimizer: OptimizerCallable = ODEAdamW,
        optim: OptimConfig = OptimConfig(),
        gradient_checkpointing: bool = False,
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(geometry=geometry, schedule=schedule, text_encoder=text_encoder, codec=codec,
                         negative_prompt=negative_prompt, optim=optim, ema=None, seed=seed)
        self.save_hyperparameters(ignore=["text_encoder", "codec", "optimizer"])
        if reuse_trajectories < 1:
            raise ValueError(f"--model.init_args.reuse_trajectories must be >= 1, got {reuse_trajectories}")
        check_euler(ode)
        self.ode = ode
        # float64, so the kept states match the many-step grid points exactly (timesteps are fp32 at the model).
        self.step_sigmas = schedule.generator_sigmas(dtype=torch.float64)
        if abs(float(self.step_sigmas[0]) - 1.0) > 1e-6:
            raise ValueError(
                f"--model.init_args.schedule.denoising_steps must start at {schedule.num_train_timesteps} (pure noise)"
            )
        self.check_network_sources({"teacher": (teacher, teacher_overrides), "generator_init": (generator_init, None)})
        self.optimizer_factory = optimizer
        self.trajectory_cache: TrajectoryBatch | None = None
        self._pairs: ODEPairs | None = None
        self._pair_rows: dict[str, list[int]] | None = None

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if hasattr(self, "generator"):
            return
        h = self.hparams
        teacher = self.build_network(h.teacher, h.teacher_overrides)
        self.check_network(teacher, "teacher")
        generator = self.build_network(h.generator_init) if h.generator_init else copy.deepcopy(teacher)
        self.generator = self.trainable(generator, gradient_checkpointing=h.gradient_checkpointing)
        if h.trajectories is None:
            self.teacher = self.frozen(teacher, h.teacher_dtype)
        # With a trajectories file the teacher only supplied initial weights; it is dropped.

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.generator.parameters())

    def inference_settings(self) -> InferenceSettings:
        return InferenceSettings(geometry=self.geometry, sampler="few_step", schedule=self.schedule,
                                 negative_prompt=self.negative_prompt)

    # ------------------------------------------------------------------ trajectories
    @torch.no_grad()
    def generate_trajectories(self, prompts: list[str]) -> TrajectoryBatch:
        """Teacher ODE trajectories for a prompt batch, noise seeded with ``(0, step, rank)``."""
        geo = self.geometry
        cond, uncond = self.encode(prompts)
        teacher_dtype = compute_dtype(self.teacher)
        g = self.rng(0, self.generator_steps, self.global_rank)
        noise = torch.randn(geo.latent_shape(len(prompts)), generator=g, device=self.device, dtype=teacher_dtype)
        traj = ode_trajectories(
            self.denoiser("teacher"),
            noise,
            cond.to(teacher_dtype),
            uncond.to(teacher_dtype),
            step_sigmas=self.step_sigmas,
            schedule=self.ode.schedule,
            num_steps=self.ode.num_steps,
            guidance_scale=self.ode.guidance_scale,
            guidance=self.ode.guidance,
        )
        return TrajectoryBatch(trajectory=traj.to(compute_dtype(self.generator)), cond=cond, step=self.generator_steps)

    def pairs(self) -> ODEPairs:
        """The trajectories file, read once and checked against the step list and geometry."""
        if self._pairs is None:
            path = self.hparams.trajectories
            pairs = load_ode_pairs(path)
            want = record_sigmas_for(self.step_sigmas)
            if pairs.sigmas.shape != want.shape or not torch.allclose(pairs.sigmas, want, atol=1e-5, rtol=0):
                raise ValueError(
                    f"{path}: states at sigmas {pairs.sigmas.tolist()} differ from this run's step sigmas + 0 "
                    f"{want.tolist()} (check --model.init_args.schedule)"
                )
            clip = tuple(self.geometry.latent_shape(1)[1:])
            if tuple(pairs.state_shape[1:]) != clip:
                got = tuple(pairs.state_shape[1:])
                raise ValueError(f"{path}: latent clips {got} differ from the geometry's {clip}")
            self._pairs, self._pair_rows = pairs, pairs.rows_by_prompt()
        return self._pairs

    def lookup_trajectories(self, prompts: list[str]) -> TrajectoryBatch:
        """Precomputed trajectories of the batch prompts (one row per prompt, seeded choice among duplicates)."""
        pairs = self.pairs()
        assert self._pair_rows is not None
        g = self.rng(2, self.generator_steps, self.global_rank, device="cpu")
        rows = []
        for p in prompts:
            options = self._pair_rows.get(p)
            if options is None:
                raise KeyError(f"prompt {p!r} is not in the trajectories file {self.hparams.trajectories}")
            rows.append(options[int(torch.randint(len(options), (1,), generator=g))])
        traj = pairs.take(rows).to(self.device, compute_dtype(self.generator))
        cond, _ = self.encode(prompts)
        return TrajectoryBatch(trajectory=traj, cond=cond, step=self.generator_steps)

    def trajectory_batch(self, prompts: list[str]) -> TrajectoryBatch:
        """This step's trajectories: looked up, reused, or freshly generated every ``reuse_trajectories`` steps."""
        if self.hparams.trajectories is not None:
            return self.lookup_trajectories(prompts)
        cache = self.trajectory_cache
        if cache is None or self.generator_steps - cache.step >= self.hparams.reuse_trajectories:
            self.trajectory_cache = cache = self.generate_trajectories(prompts)
        return cache

    # ------------------------------------------------------------------ the algorithm
    def regression_loss(self, data: TrajectoryBatch, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The ODE regression loss of one (micro-)batch of trajectories at seeded chunk indices."""
        geo = self.geometry
        index = sample_chunk_indices(
            data.trajectory.shape[0],
            geo.num_frames,
            geo.frames_per_chunk,
            len(self.step_sigmas),
            self.rng(1, self.generator_steps, self.global_rank, *([micro] if micro else [])),
            device=self.device,
        )
        return ode_regression_loss(self.denoiser("generator"), data.trajectory, self.step_sigmas, index, data.cond,
                                   frames_per_chunk=geo.frames_per_chunk)

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        data = self.trajectory_batch(list(batch["generator"]))
        micro = {"trajectory": data.trajectory, "cond": data.cond}
        logs = self.update("generator", opt, micro,
                           lambda part, i: self.regression_loss(TrajectoryBatch(**part, step=data.step), i))
        self.generator_steps += 1
        metrics = {f"train/{k}": v for k, v in logs.items()}
        metrics["steps/generator"] = float(self.generator_steps)
        metrics["lr/generator"] = opt.param_groups[0]["lr"]
        self.log_dict(metrics, on_step=True, batch_size=1)
        self.log("train/loss_bar", logs["loss"], prog_bar=True, on_step=True, logger=False, batch_size=1)
        return logs["loss"]

    def export_generator(self) -> nn.Module:
        """The trained causal generator (a ``WanTransformer``; save it with ``export_diffusers``)."""
        return self.generator
