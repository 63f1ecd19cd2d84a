"""Self Forcing with DMD as a LightningModule (Huang et al. 2025, Algorithm 1; Yin et al. 2024 eq. 7–8).

Roles (never mixed): ``generator`` = the causal few-step student, ``teacher`` = frozen real score μ_real,
``critic`` = trainable fake score μ_fake. One iteration (``training_step``) is the official loop (notes §3.7):
a generator update every ``critic_updates_per_generator_update``-th iteration, then one critic update, each on its
own prompt batch and its own Self Forcing rollout.

Every trainable network is reached through ``self.net(name)``: the strategy's engine for it when the strategy
wraps one per network (DeepSpeed, see ``training/strategies``), else the plain module. No gradient of one
trainable network flows through another's backward: the DMD target is computed under no_grad and the critic
trains on detached rollouts.

Randomness (``TrainingModule.rng``): decisions every rank must share (exit steps) come from ``(0, role, step)``,
identical on all ranks (no collectives in model code); noise from ``(1, role, step, rank, micro-batch)`` and the DMD
noise level from ``(2, role, step, rank, micro-batch)``, different per rank; ``step`` is the critic step counter.
Both are re-derived from the counters, so a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from sfvideo.config import (
    NEGATIVE_PROMPT,
    CriticOptimConfig,
    DMDConfig,
    EMAConfig,
    InferenceSettings,
    RolloutConfig,
    StepSchedule,
)
from sfvideo.diffusion.rollout import last_window_start, sample_exit_steps, self_forcing_rollout
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import stream_cache
from sfvideo.losses.critic import critic_loss
from sfvideo.losses.dmd import dmd_loss
from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.training.base import TrainingModule
from sfvideo.training.optim import CriticAdamW, GeneratorAdamW

GENERATOR, CRITIC = 0, 1
"""Roles in the random streams (``rng(purpose, role, ...)``)."""


class SelfForcingDMD(TrainingModule):
    """Self Forcing training of a causal generator with the DMD loss.

    Args:
        teacher: the bidirectional teacher: a flavor name (``debug``, ``toy``, ``1.3B``, ``14B``: random weights,
            for tests and benchmarks), a diffusers model folder, an original Wan2.1 file, or a bundled asset name.
        teacher_overrides: config overrides applied to a flavor.
        generator_init: weights the causal generator starts from (an ODE-initialised checkpoint, a diffusers
            folder, or a Self Forcing checkpoint); unset = the teacher's weights.
        critic_init: weights of the critic; unset = the teacher's weights (the official recipe).
        geometry: latent clip shape and chunking.
        text_encoder: frozen prompt encoder (e.g. ``sfvideo.toy.encoders.ToyTextEncoder`` or
            ``sfvideo.nn.umt5.UMT5TextEncoder``).
        codec: frozen latent codec, used to decode samples and recorded for inference; unset = none.
        negative_prompt: prompt of the unconditional branch of classifier-free guidance.
        schedule: the generator's few-step list on the shifted flow-matching grid.
        rollout: the Self Forcing rollout (exit steps, context noise, window, gradient through the cache).
        dmd: teacher guidance and the DMD / critic timestep range.
        optim: gradient clipping, accumulation and the critic:generator update ratio.
        generator_optimizer / critic_optimizer: optimizer factories (defaults: the official AdamW settings).
        ema: EMA of the generator.
        max_generator_steps: stop after this many generator updates (Lightning's ``max_steps`` counts every
            optimizer step of both networks).
        gradient_checkpointing: activation checkpointing per transformer block for generator and critic.
        teacher_dtype: precision the frozen teacher is held in (no fp32 master weights needed).
        seed: seed of shared decisions and of noise.
    """

    engine_modules = ("generator", "critic")
    frozen_modules = ("teacher",)
    counters = ("generator_steps", "critic_steps")

    def __init__(
        self,
        teacher: str = "debug",
        teacher_overrides: dict[str, Any] | None = None,
        generator_init: str | None = None,
        critic_init: str | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        text_encoder: TextEncoder | None = None,
        codec: VideoCodec | None = None,
        negative_prompt: str = NEGATIVE_PROMPT,
        schedule: StepSchedule = StepSchedule(),
        rollout: RolloutConfig = RolloutConfig(),
        dmd: DMDConfig = DMDConfig(),
        optim: CriticOptimConfig = CriticOptimConfig(),
        generator_optimizer: OptimizerCallable = GeneratorAdamW,
        critic_optimizer: OptimizerCallable = CriticAdamW,
        ema: EMAConfig = EMAConfig(),
        max_generator_steps: int | None = None,
        gradient_checkpointing: bool = False,
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(geometry=geometry, schedule=schedule, text_encoder=text_encoder, codec=codec,
                         negative_prompt=negative_prompt, optim=optim, ema=ema, seed=seed)
        self.save_hyperparameters(ignore=["text_encoder", "codec", "generator_optimizer", "critic_optimizer"])
        self.rollout_config, self.dmd = rollout, dmd
        self._validate()
        self.check_network_sources({"teacher": (teacher, teacher_overrides), "generator_init": (generator_init, None),
                                    "critic_init": (critic_init, None)})
        self.step_sigmas = schedule.generator_sigmas()
        self.generator_optimizer = generator_optimizer
        self.critic_optimizer = critic_optimizer

    # ------------------------------------------------------------------ set-up
    def _validate(self) -> None:
        g, r = self.geometry, self.rollout_config
        if r.rollout_frames is not None and (r.rollout_frames < g.num_frames or r.rollout_frames % g.frames_per_chunk):
            raise ValueError(
                f"--model.init_args.rollout.rollout_frames={r.rollout_frames} must be >= geometry.num_frames="
                f"{g.num_frames} and a multiple of geometry.frames_per_chunk={g.frames_per_chunk}"
            )
        if r.window_frames is not None and (
            r.window_frames < g.frames_per_chunk or r.window_frames % g.frames_per_chunk
        ):
            raise ValueError(
                f"--model.init_args.rollout.window_frames={r.window_frames} must be a positive multiple of "
                f"geometry.frames_per_chunk={g.frames_per_chunk}"
            )

    def configure_model(self) -> None:
        if hasattr(self, "teacher"):
            return
        h = self.hparams
        teacher = self.build_network(h.teacher, h.teacher_overrides)
        self.check_network(teacher, "teacher")
        ckpt = h.gradient_checkpointing
        self.generator = self.trainable(
            self.build_network(h.generator_init) if h.generator_init else copy.deepcopy(teacher),
            gradient_checkpointing=ckpt,
        )
        self.critic = self.trainable(
            self.build_network(h.critic_init) if h.critic_init else copy.deepcopy(teacher), gradient_checkpointing=ckpt
        )
        self.teacher = self.frozen(teacher, h.teacher_dtype)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            self.generator_optimizer(self.generator.parameters()),
            self.critic_optimizer(self.critic.parameters()),
        ]

    def inference_settings(self) -> InferenceSettings:
        r = self.rollout_config
        return InferenceSettings(geometry=self.geometry, sampler="few_step", schedule=self.schedule,
                                 context_noise=r.context_noise, window_frames=r.window_frames,
                                 cache_grad_mode=r.cache_grad_mode, negative_prompt=self.negative_prompt)

    # ------------------------------------------------------------------ the algorithm
    def rollout(self, cond: torch.Tensor, *, grad: bool, role: int, micro: int) -> torch.Tensor:
        """Self Forcing rollout (Algorithm 1): the generator's own KV-cached autoregressive sample.

        Returns the last ``geometry.num_frames`` latent frames ``(B, F, C, H, W)``; with ``grad`` only the exit
        step of each chunk in that window carries gradient.
        """
        r, geo = self.rollout_config, self.geometry
        frames = r.rollout_frames or geo.num_frames
        exits = sample_exit_steps(
            frames // geo.frames_per_chunk,
            len(self.step_sigmas),
            self.rng(0, role, self.critic_steps),
            same_across_chunks=r.same_exit_across_chunks,
            last_step_only=r.last_step_only,
        )
        ng = self.rng(1, role, self.critic_steps, self.global_rank, micro)
        noise = torch.randn(geo.latent_shape(cond.shape[0], frames), generator=ng, device=self.device,
                            dtype=self.generator.compute_dtype)
        # Every frame stays in the cache: gradient may reach any earlier chunk (straight_through).
        cache = stream_cache(self.generator, geo, cond.shape[0], frames, window_frames=r.window_frames,
                             grad_mode=r.cache_grad_mode, rolling=False)
        window_start = last_window_start(frames, geo.num_frames)
        result = self_forcing_rollout(
            self.denoiser("generator"),
            noise,
            cond,
            step_sigmas=self.step_sigmas.to(self.device),
            frames_per_chunk=geo.frames_per_chunk,
            kv_cache=cache,
            exit_steps=exits,
            context_sigma=r.context_noise / self.schedule.num_train_timesteps,
            noise_generator=ng,
            grad_enabled=grad,
            grad_from_frame=window_start,
        )
        return result.x0[:, window_start:]

    def dmd_sigma_and_noise(self, x: torch.Tensor, role: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.rng(2, role, self.critic_steps, self.global_rank, micro)
        sigma = self.schedule.sample_dmd_sigma(
            x.shape[0], g, min_timestep=self.dmd.min_timestep, max_timestep=self.dmd.max_timestep, device=x.device
        )
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return sigma, noise

    def generator_loss(self, prompts: list[str], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond = self.encode(prompts)
        x = self.rollout(cond, grad=True, role=GENERATOR, micro=micro)
        sigma, noise = self.dmd_sigma_and_noise(x, role=GENERATOR, micro=micro)
        return dmd_loss(
            x,
            teacher=self.denoiser("teacher"),
            critic=self.denoiser("critic"),
            cond=cond,
            uncond=uncond,
            sigma=sigma,
            noise=noise,
            guidance_scale=self.dmd.guidance_scale,
        )

    def critic_loss(self, prompts: list[str], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, _ = self.encode(prompts)
        with torch.no_grad():
            x = self.rollout(cond, grad=False, role=CRITIC, micro=micro)
        sigma, noise = self.dmd_sigma_and_noise(x, role=CRITIC, micro=micro)
        return critic_loss(x, critic=self.denoiser("critic"), context=cond, sigma=sigma, noise=noise)

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        opt_generator, opt_critic = self.optimizers()
        logs: dict[str, torch.Tensor] = {}
        if self.critic_steps % self.optim.critic_updates_per_generator_update == 0:
            gen_logs = self.update("generator", opt_generator, batch["generator"], self.generator_loss)
            self.generator_steps += 1
            self.update_ema(self.generator_steps)
            logs.update({f"train/generator_{k}": v for k, v in gen_logs.items()})
        critic_logs = self.update("critic", opt_critic, batch["critic"], self.critic_loss)
        self.critic_steps += 1
        logs.update({f"train/critic_{k}": v for k, v in critic_logs.items()})
        self.log_metrics(logs, opt_generator, opt_critic)

    def log_metrics(self, logs: dict[str, torch.Tensor], opt_generator: Any, opt_critic: Any) -> None:
        logs = {k.replace("generator_dmd_", "dmd_"): v for k, v in logs.items()}
        logs["steps/generator"] = float(self.generator_steps)
        logs["steps/critic"] = float(self.critic_steps)
        logs["lr/generator"] = opt_generator.param_groups[0]["lr"]
        logs["lr/critic"] = opt_critic.param_groups[0]["lr"]
        progress = {"train/generator_loss", "train/critic_loss", "steps/generator"}
        self.log_dict({k: v for k, v in logs.items() if k not in progress}, on_step=True, batch_size=1)
        self.log_dict({k: v for k, v in logs.items() if k in progress}, prog_bar=True, on_step=True, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        max_steps = self.hparams.max_generator_steps
        if max_steps is not None and self.generator_steps >= max_steps:
            # Stop on generator steps, not on Lightning's global_step (which counts both optimizers).
            if self.critic_steps % self.optim.critic_updates_per_generator_update == 0:
                self.trainer.should_stop = True

    @torch.no_grad()
    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> dict[str, torch.Tensor]:
        """Both losses on a fixed prompt draw, without updates (``sfvideo validate`` / ``test``)."""
        _, gen_logs = self.generator_loss(batch["generator"], micro=batch_idx)
        critic, critic_logs = self.critic_loss(batch["critic"], micro=batch_idx)
        stage = "test" if self.trainer.testing else "val"
        logs = {f"{stage}/{k}": v.float() for k, v in {**gen_logs, **critic_logs}.items()}
        self.log_dict(logs, on_epoch=True, batch_size=len(batch["generator"]))
        return logs

    def test_step(self, batch: dict[str, list[str]], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx)
