"""Distribution-matching distillation of a causal few-step generator: one loop over two typed axes.

**Where the generator's samples come from** (``source``, :data:`SampleSource`; both the generator and the critic
step draw their own):

- ``self_forcing``: the generator's own KV-cached autoregressive rollout (Algorithm 1; official
  ``pipeline/self_forcing_training.py`` and ``model/base.py::SelfForcingModel._run_generator``), optionally longer
  than the teacher window (``rollout.rollout_frames``: random length, last window re-encoded, gradient mask;
  ``diffusion/long_rollout.py``);
- ``diffusion_forcing``: CausVid-style DF: data (or ODE-final) latents noised per chunk to a random entry of the
  step list, one block-causal forward, no self-rollout (official ``model/causvid.py::CausVid._run_generator``);
- ``teacher_forcing``: CausVid-style TF: the same input, with the clean latents as context through the
  teacher-forcing mask (official ``teacher_forcing: true``).

**The distribution loss** is the subclass: :meth:`Distillation.generator_objective` and
:meth:`Distillation.critic_objective` (``training/module.py``: DMD, ``training/sid.py``: SiD, ``training/gan.py``:
GAN). Everything else is shared: networks, encoders, data, strategies, checkpoints, the EMA, inference.

One ``training_step`` is one iteration of the official loop (``trainer/distillation.py::Trainer.train``)::

    if iteration % optim.critic_updates_per_generator_update == 0:        # 5 officially
        x = sample(generator, batch_g, grad=True)                         # the source above
        step(generator, generator_objective(x))                           # the critic is a constant here
        ema.update(generator)                                             # once it exists (ema.start_step)
    x = sample(generator, batch_c, grad=False)                            # its own draw, its own batch
    step(critic, critic_objective(x))
    iteration += 1                                                        # = critic_steps

The critic is a constant of the generator update: its parameters are frozen for the whole update (forward and
backward), so a loss that backpropagates *through* it (SiD, GAN) leaves it no gradient, which the official trainers
obtain by zeroing the critic's gradients before its step (SiD) or ``requires_grad_(False)`` (GAN). Such a loss calls
the plain critic (:meth:`Distillation.constant_denoiser`), not its DeepSpeed engine, since an engine accepts one
trainable network per backward.

Batches: ``{"generator": part, "critic": part}``, each part a prompt list (``data.prompts.PromptDataModule``) or
``{"prompts": [...], "latents": (B, F, C, H, W)}`` (``data.latents.ToyLatentDataModule``,
``data.latents.ODELatentDataModule``), which the DF/TF sources and the GAN's real samples need.

Randomness (``TrainingModule.rng``; ``step`` is the iteration counter ``critic_steps``): rank-shared decisions
``(0, role, step)`` (exit steps) and ``(3, role, step)`` (long-rollout length); per-rank noise
``(1, role, step, rank, micro-batch)`` and the loss's noise level ``(2, role, step, rank, micro-batch)``. They are
re-derived from the counters, so a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from sfvideo.config import NEGATIVE_PROMPT, CriticOptimConfig, EMAConfig, InferenceSettings, RolloutConfig, StepSchedule
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.forcing import causvid_generator_input, forcing_forward
from sfvideo.diffusion.long_rollout import sample_rollout_chunks, teacher_window, window_frame_mask
from sfvideo.diffusion.rollout import last_window_start, sample_exit_steps, self_forcing_rollout
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import stream_cache
from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.training.base import TrainingModule
from sfvideo.training.optim import CriticAdamW, GeneratorAdamW

__all__ = ["CRITIC", "GENERATOR", "Distillation", "GeneratorSample", "RoleBatch", "SampleSource", "role_batch"]

GENERATOR, CRITIC = 0, 1
"""Roles in the random streams (``rng(purpose, role, ...)``)."""

SampleSource = Literal["self_forcing", "diffusion_forcing", "teacher_forcing"]
"""Where the generator's samples come from (see the module docstring)."""


@dataclass
class RoleBatch:
    """One role's part of a batch."""

    prompts: list[str]
    latents: Tensor | None
    """Data or teacher latents ``(B, F, C, H, W)``, None for prompt-only data."""


def role_batch(part: Any) -> RoleBatch:
    """A prompt list or a ``{"prompts", "latents"}`` mapping as a :class:`RoleBatch`."""
    if isinstance(part, Mapping):
        return RoleBatch(prompts=list(part["prompts"]), latents=part.get("latents"))
    return RoleBatch(prompts=list(part), latents=None)


@dataclass
class GeneratorSample:
    """What the generator produced for the losses."""

    x: Tensor
    """``(B, F, C, H, W)`` clean latents as the teacher and critic see them (``geometry.num_frames`` frames); with
    gradient to the generator when drawn with ``grad``."""
    mask: Tensor | None
    """``(F,)`` bool: frames that enter the generator's loss; None = all (notes §3.5)."""
    num_frames: int
    """Frames the generator produced (the rollout length; ``F`` unless the rollout was longer)."""


class Distillation(TrainingModule):
    """A causal few-step generator distilled from a frozen teacher against a trainable critic (the module docstring).

    Subclasses give the distribution loss (:meth:`generator_objective`, :meth:`critic_objective`) and call
    ``super().__init__(**kwargs)``; the arguments below are shared by all of them.

    Args:
        teacher: the bidirectional teacher: a flavor name (``debug``, ``toy``, ``1.3B``, ``14B``: random weights,
            for tests and benchmarks), a diffusers model folder, an original Wan2.1 file, or a bundled asset name.
        teacher_overrides: config overrides applied to a flavor.
        generator_init: weights the causal generator starts from (an ODE-initialised checkpoint, a diffusers
            folder, or a Self Forcing checkpoint); unset = the teacher's weights.
        critic_init: weights of the critic; unset = the teacher's weights (the official recipe).
        geometry: latent clip shape and chunking (``num_frames`` is the teacher's window).
        text_encoder: frozen prompt encoder (e.g. ``sfvideo.toy.encoders.ToyTextEncoder`` or
            ``sfvideo.nn.umt5.UMT5TextEncoder``).
        codec: frozen latent codec: decodes samples, re-encodes the first latent of long rollouts, and is recorded
            for inference; unset = none.
        negative_prompt: prompt of the unconditional branch of classifier-free guidance.
        schedule: the generator's few-step list on the shifted flow-matching grid.
        source: where the generator's samples come from: ``self_forcing`` (its own rollout), ``diffusion_forcing``
            or ``teacher_forcing`` (CausVid-style, on the batch's latents).
        rollout: the Self Forcing rollout (exit steps, context noise, window, gradient through the cache, length).
        optim: gradient clipping, accumulation, the critic:generator update ratio and the recipe's effective batch.
        generator_optimizer / critic_optimizer: optimizer factories (defaults: the official AdamW settings of the
            14B-teacher DMD recipe).
        ema: EMA of the generator; ``ema.start_step`` counts trainer iterations (critic updates), as officially.
        max_generator_steps: stop after this many generator updates (>= 1; unset: no limit). ``--trainer.max_steps``
            counts generator updates too for these modules (Lightning's ``global_step`` counts both networks'
            optimizer steps); the smaller limit applies.
        gradient_checkpointing: activation checkpointing per transformer block for generator and critic.
        teacher_dtype: precision the frozen teacher is held in (no fp32 master weights needed).
        seed: seed of shared decisions and of noise.
    """

    engine_modules = ("generator", "critic")
    counters = ("generator_steps", "critic_steps")
    uses_teacher: bool = True
    """Whether the loss calls the teacher; if not, it only provides initial weights and is dropped once built."""

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Frozen networks for the strategies: the teacher, when the loss uses it."""
        return ("teacher",) if self.uses_teacher else ()

    def __init__(
        self,
        *,
        teacher: str = "debug",
        teacher_overrides: dict[str, Any] | None = None,
        generator_init: str | None = None,
        critic_init: str | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        text_encoder: TextEncoder | None = None,
        codec: VideoCodec | None = None,
        negative_prompt: str = NEGATIVE_PROMPT,
        schedule: StepSchedule = StepSchedule(),
        source: SampleSource = "self_forcing",
        rollout: RolloutConfig = RolloutConfig(),
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
        self.source, self.rollout_config = source, rollout
        self._validate()
        self.check_network_sources({"teacher": (teacher, teacher_overrides), "generator_init": (generator_init, None),
                                    "critic_init": (critic_init, None)})
        self.step_sigmas = schedule.generator_sigmas()
        self.generator_optimizer = generator_optimizer
        self.critic_optimizer = critic_optimizer

    # ------------------------------------------------------------------ set-up
    def _validate(self) -> None:
        g, r = self.geometry, self.rollout_config
        steps = self.hparams.max_generator_steps
        if steps is not None and steps < 1:
            raise ValueError(f"--model.init_args.max_generator_steps must be >= 1 (unset: no limit), got {steps}")
        if r.rollout_frames is not None and (r.rollout_frames < g.num_frames or r.rollout_frames % g.frames_per_chunk):
            raise ValueError(
                f"--model.init_args.rollout.rollout_frames={r.rollout_frames} must be >= geometry.num_frames="
                f"{g.num_frames} and a multiple of geometry.frames_per_chunk={g.frames_per_chunk}"
            )
        if r.rollout_frames is not None and r.rollout_frames > g.num_frames:
            if self.source != "self_forcing":
                raise ValueError(f"--model.init_args.rollout.rollout_frames applies to source=self_forcing, not "
                                 f"{self.source} (whose samples are the data's clips)")  # fmt: skip
            if self.codec is None:
                raise ValueError(
                    f"--model.init_args.rollout.rollout_frames={r.rollout_frames} > geometry.num_frames="
                    f"{g.num_frames} needs model.init_args.codec: the teacher window's first latent is re-encoded "
                    "through it"
                )
            if g.frames_per_chunk >= g.num_frames:
                raise ValueError(f"long rollouts mask the window's first chunk: geometry.num_frames={g.num_frames} "
                                 f"must exceed frames_per_chunk={g.frames_per_chunk}")  # fmt: skip
        if r.window_frames is not None and (
            r.window_frames < g.frames_per_chunk or r.window_frames % g.frames_per_chunk
        ):
            raise ValueError(
                f"--model.init_args.rollout.window_frames={r.window_frames} must be a positive multiple of "
                f"geometry.frames_per_chunk={g.frames_per_chunk}"
            )

    def configure_model(self) -> None:
        if hasattr(self, "generator"):
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
        if self.uses_teacher:
            self.teacher = self.frozen(teacher, h.teacher_dtype)
        self.configure_critic()

    def configure_critic(self) -> None:
        """Additions to the critic (the GAN's discriminator head); none by default."""

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

    def training_record(self) -> dict[str, Any]:
        record = super().training_record()
        return {**record, "source": self.source, "cache_grad_mode": self.rollout_config.cache_grad_mode,
                "rollout_frames": self.rollout_config.rollout_frames, "iteration": self.critic_steps,
                "iteration_unit": "critic updates (official trainer step)"}

    # ------------------------------------------------------------------ helpers of the losses
    @contextmanager
    def constant(self, name: str) -> Iterator[None]:
        """Network ``name``'s trainable parameters frozen inside the block (forward and backward): it gets no
        gradient from what runs there."""
        params = [p for p in getattr(self, name).parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def constant_denoiser(self, name: str, **model_kwargs: Any) -> Denoiser:
        """Network ``name`` as a :class:`Denoiser` over the plain module (not its DeepSpeed engine): for a loss
        that backpropagates through a network held :meth:`constant` (an engine accepts one trainable network per
        backward; ZeRO-3 still gathers the plain module's weights through its hooks)."""
        n = self.schedule.num_train_timesteps
        return Denoiser(getattr(self, name), num_train_timesteps=n, model_kwargs=model_kwargs)

    def score_sigma_and_noise(
        self, x: Tensor, role: int, micro: int, *, min_timestep: float, max_timestep: float
    ) -> tuple[Tensor, Tensor]:
        """Noise level per sample (the official DMD/critic recipe: uniform timestep, shifted, clamped) and noise."""
        g = self.rng(2, role, self.critic_steps, self.global_rank, micro)
        sigma = self.schedule.sample_dmd_sigma(x.shape[0], g, min_timestep=min_timestep, max_timestep=max_timestep,
                                               device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return sigma, noise

    # ------------------------------------------------------------------ the generator's samples
    def rollout(self, cond: Tensor, *, grad: bool, role: int, micro: int) -> GeneratorSample:
        """Self Forcing rollout (Algorithm 1): the generator's own KV-cached autoregressive sample.

        The length is ``geometry.num_frames``, or with ``rollout.rollout_frames`` a rank-shared draw in whole
        chunks from ``[geometry.num_frames, rollout_frames]``; then the teacher's window is the last
        ``geometry.num_frames`` latents with the first re-encoded through the codec (``teacher_window``) and, for
        lengths above the minimum, the first chunk of the window leaves the loss (``window_frame_mask``). With
        ``grad`` only the exit step of each chunk in that window carries gradient.
        """
        r, geo = self.rollout_config, self.geometry
        fpc, window = geo.frames_per_chunk, geo.num_frames
        frames = window
        if r.rollout_frames is not None:
            shared = self.rng(3, role, self.critic_steps, device="cpu")  # the same length on every rank
            frames = fpc * sample_rollout_chunks(window, r.rollout_frames, fpc, shared)
        exits = sample_exit_steps(
            frames // fpc,
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
        result = self_forcing_rollout(
            self.denoiser("generator"),
            noise,
            cond,
            step_sigmas=self.step_sigmas.to(self.device),
            frames_per_chunk=fpc,
            kv_cache=cache,
            exit_steps=exits,
            context_sigma=r.context_noise / self.schedule.num_train_timesteps,
            noise_generator=ng,
            grad_enabled=grad,
            grad_from_frame=last_window_start(frames, window),
        )
        x = teacher_window(result.x0, self.codec, window) if frames > window else result.x0
        mask = window_frame_mask(frames, min_frames=window, window_frames=window, frames_per_chunk=fpc,
                                 device=self.device)
        return GeneratorSample(x=x, mask=mask, num_frames=frames)

    def forcing_sample(self, data: RoleBatch, cond: Tensor, *, grad: bool, role: int, micro: int) -> GeneratorSample:
        """CausVid-style sample: the batch's latents noised per chunk to a random entry of the step list, denoised
        in one block-causal (DF) or teacher-forcing (TF, clean latents as context) forward of the generator."""
        latents = data.latents
        if latents is None:
            raise ValueError(
                f"source={self.source} needs latents in the batch: use a latent data module "
                "(sfvideo.data.latents.ToyLatentDataModule, sfvideo.data.latents.ODELatentDataModule)"
            )
        want = tuple(self.geometry.latent_shape(len(data.prompts)))
        if tuple(latents.shape) != want:
            raise ValueError(f"batch latents {tuple(latents.shape)} do not match the geometry's {want} "
                             "(model.init_args.geometry)")  # fmt: skip
        x0 = latents.to(self.device, self.generator.compute_dtype)
        g = self.rng(1, role, self.critic_steps, self.global_rank, micro)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        fpc = self.geometry.frames_per_chunk
        inputs = causvid_generator_input(x0, noise, step_sigmas=self.step_sigmas, frames_per_chunk=fpc, generator=g,
                                         teacher_forcing=self.source == "teacher_forcing")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = forcing_forward(self.denoiser("generator"), inputs.noisy, inputs.sigma, cond, frames_per_chunk=fpc,
                                clean_x=inputs.clean_x)
        # Official: no gradient mask (``gradient_mask = None  # timestep != 0``).
        return GeneratorSample(x=x, mask=None, num_frames=x.shape[1])

    def generator_sample(self, data: RoleBatch, cond: Tensor, *, grad: bool, role: int, micro: int) -> GeneratorSample:
        """The generator's sample from this run's ``source``."""
        if self.source == "self_forcing":
            return self.rollout(cond, grad=grad, role=role, micro=micro)
        return self.forcing_sample(data, cond, grad=grad, role=role, micro=micro)

    # ------------------------------------------------------------------ the distribution loss (subclasses)
    def generator_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss on its sample (gradient through ``sample.x``); the critic is :meth:`constant`."""
        raise NotImplementedError

    def critic_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic's loss on a no-grad generator sample."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the algorithm
    def generator_loss(self, batch: Any, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        data = role_batch(batch)
        cond, uncond = self.encode(data.prompts)
        sample = self.generator_sample(data, cond, grad=True, role=GENERATOR, micro=micro)
        return self.generator_objective(sample, data, cond, uncond, micro)

    def critic_loss(self, batch: Any, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        data = role_batch(batch)
        cond, uncond = self.encode(data.prompts)
        with torch.no_grad():
            sample = self.generator_sample(data, cond, grad=False, role=CRITIC, micro=micro)
        return self.critic_objective(sample, data, cond, uncond, micro)

    def generator_update_due(self) -> bool:
        """A generator update in this iteration (every ``critic_updates_per_generator_update``-th, official)."""
        return self.critic_steps % self.optim.critic_updates_per_generator_update == 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_generator, opt_critic = self.optimizers()
        self.report_effective_batch(len(role_batch(batch["generator"]).prompts))
        self.start_ema_when_due()
        logs: dict[str, Tensor] = {}
        if self.generator_update_due():
            with self.constant("critic"):
                gen_logs = self.update("generator", opt_generator, batch["generator"], self.generator_loss)
            self.generator_steps += 1
            self.update_generator_ema()
            logs.update({f"train/generator_{k}": v for k, v in gen_logs.items()})
        critic_logs = self.update("critic", opt_critic, batch["critic"], self.critic_loss)
        self.critic_steps += 1
        logs.update({f"train/critic_{k}": v for k, v in critic_logs.items()})
        self.log_metrics(logs, opt_generator, opt_critic)

    # ------------------------------------------------------------------ EMA (official trainer/distillation.py)
    def start_ema_when_due(self) -> None:
        """Create the EMA from the current weights once the iteration counter reaches ``ema.start_step``.

        Official: after ``self.step += 1`` makes ``step >= ema_start_step`` the EMA is built from the weights then,
        and its first update follows the next generator step; checking at the start of the iteration is the same
        moment. With ``start_step`` 0 it is built from the initial (loaded) weights; the official code builds it
        before loading ``generator_ckpt`` (from the base Wan weights), which this fixes.
        """
        if self.ema is not None and not self.ema.initialized:
            self.ema.update(self.generator, step=self.critic_steps)

    def update_generator_ema(self) -> None:
        """Fold the generator into its EMA after a generator update, once the EMA exists."""
        if self.ema_ready:
            self.ema.update(self.generator, step=self.critic_steps)

    # ------------------------------------------------------------------ logging, stopping, validation
    def log_metrics(self, logs: dict[str, Tensor], opt_generator: Any, opt_critic: Any) -> None:
        for prefix in ("dmd_", "sid_", "gan_"):
            logs = {k.replace(f"generator_{prefix}", prefix): v for k, v in logs.items()}
        logs["steps/generator"] = float(self.generator_steps)
        logs["steps/critic"] = float(self.critic_steps)
        logs["batch/effective"] = float(self.effective_batch or 0)
        logs["lr/generator"] = opt_generator.param_groups[0]["lr"]
        logs["lr/critic"] = opt_critic.param_groups[0]["lr"]
        progress = {"train/generator_loss", "train/critic_loss", "steps/generator"}
        self.log_dict({k: v for k, v in logs.items() if k not in progress}, on_step=True, batch_size=1)
        self.log_dict({k: v for k, v in logs.items() if k in progress}, prog_bar=True, on_step=True, batch_size=1)

    @property
    def generator_step_limit(self) -> int | None:
        """Generator updates this run stops after: the smaller of ``max_generator_steps`` and
        ``--trainer.max_steps`` (which these modules count in generator updates); None = no limit."""
        limits = [n for n in (self.hparams.max_generator_steps, self._trainer_max_steps) if n is not None]
        return min(limits) if limits else None

    _trainer_max_steps: int | None = None

    def on_fit_start(self) -> None:
        # Lightning's global_step counts every optimizer step of both networks (1 + N per generator update), so
        # --trainer.max_steps would stop mid-way; take it over as a limit in generator updates.
        loop = self.trainer.fit_loop.epoch_loop
        if loop.max_steps > 0:
            self._trainer_max_steps = loop.max_steps
            loop.max_steps = -1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        limit = self.generator_step_limit
        if limit is not None and self.generator_steps >= limit:
            # Stop on generator steps, at the end of a whole generator:critic cycle.
            if self.critic_steps % self.optim.critic_updates_per_generator_update == 0:
                self.trainer.should_stop = True

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Both losses on a fixed draw, without updates (``sfvideo validate`` / ``test``)."""
        _, gen_logs = self.generator_loss(batch["generator"], micro=batch_idx)
        _, critic_logs = self.critic_loss(batch["critic"], micro=batch_idx)
        stage = "test" if self.trainer.testing else "val"
        logs = {f"{stage}/{k}": v.float() for k, v in {**gen_logs, **critic_logs}.items()}
        self.log_dict(logs, on_epoch=True, batch_size=len(role_batch(batch["generator"]).prompts))
        return logs

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx)
