"""Many-step flow-matching training of a Wan transformer: the bidirectional teacher and the TF/DF baselines.

One module, three attention layouts (notes §4.5):

- ``bidirectional``: the teacher (one sigma per sample, full attention);
- ``block_causal``: diffusion forcing, DF (one sigma per chunk, causal across chunks);
- ``teacher_forcing``: TF, the noisy clip attends to a clean copy of earlier chunks (one sigma per chunk).

Flow matching (Wan's parameterisation): ``x_t = (1 - sigma) x0 + sigma eps``, the network predicts the flow
``eps - x0`` (through the ``Denoiser``, the only sigma <-> timestep boundary). Noise levels are drawn in one place,
:meth:`FlowMatchingDiffusion.sample_sigma`.

The causal layouts follow the official ``model/diffusion.py::CausalDiffusion.generator_loss`` (with
``utils/scheduler.py::FlowMatchScheduler``, trainer ``trainer/diffusion.py``), built from
``sfvideo.diffusion.forcing``:

1. per chunk an index uniform into the ``N``-point shifted training grid (``FlowMatchSchedule.sigmas``: 1 down to
   ``shift(1/N)``), drawn per frame and copied over the chunk (``forcing.sample_forcing_sigmas``, official
   ``_get_timestep(uniform_timestep=False)``);
2. TF only: the clean context noise-augmented per chunk (``noise_augmentation_max_timestep`` M > 0;
   ``forcing.context_augmentation_sigmas``) with the *same* noise tensor as the input, as officially. The official
   code indexes the descending grid with ``randint(0, M)``, so the context gets one of the M *noisiest* levels
   (``augmentation_indexing="official"``), although its comment says "add small noise to clean context latents";
   ``"low_noise"`` is that intent (the levels whose timestep ``N sigma`` is below M). The context's level is the
   model's ``clean_timestep`` (official ``aug_t``); M = 0 (the official default) keeps it clean at timestep 0;
3. loss (``losses.flow.weighted_flow_loss``): the squared error averaged over ``(C, H, W)`` per frame, times the
   schedule's training weight of the frame's level (``FlowMatchSchedule.training_weight``, the Gaussian bump of
   ``FlowMatchScheduler.set_timesteps(1000, training=True)``, mean 1 over the grid), averaged over ``(B, F)``.

The teacher keeps its own recipe: one level per sample, unweighted MSE (``loss_weight=None`` resolves to
``"schedule"`` for the causal layouts and ``"uniform"`` for the teacher), its level drawn by ``sigma_sampling``:
``grid`` (uniform on the same grid, as Wan) or ``logit_normal`` (SD3's density, Esser et al. 2024 eq. 19:
``sigma = shift(sigmoid(m + s n))``, ``n ~ N(0, 1)``; ``m > 0`` moves training towards high noise, where a
teacher decides layout and motion — the toy diagnosis in docs/toy_teacher.md).

Caption dropout (``caption_dropout``, ``forcing.drop_captions``): each sample's prompt embedding is replaced by the
negative prompt's with that probability, which trains the unconditional branch of classifier-free guidance. The
official baselines have no such option (0 reproduces them); the teacher uses it.

Randomness: everything of step ``s`` comes from one generator ``rng(0, s, rank, micro-batch)``, drawn in the order
caption dropout, levels, noise, context-augmentation levels.

Sampling (``inference_settings``): the teacher with ``euler``, TF/DF with ``causal_cfg`` (many-step, chunk by chunk,
CFG on two KV caches; official ``pipeline/causal_diffusion_inference.py``), both with the ``sampling`` group.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from sfvideo.config import NEGATIVE_PROMPT, EMAConfig, InferenceSettings, ManyStepSampling, OptimConfig
from sfvideo.diffusion.forcing import (
    AugmentationIndexing,
    drop_captions,
    forcing_batch,
    forcing_forward,
    sample_forcing_sigmas,
)
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.losses.flow import weighted_flow_loss
from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.training.base import TrainingModule


class FlowMatchingDiffusion(TrainingModule):
    """Train a transformer with flow matching (teacher, diffusion forcing or teacher forcing).

    Args:
        model: flavor name (random init), folder or checkpoint the network starts from.
        model_overrides: config overrides for a flavor.
        geometry: latent clip shape and chunking.
        attention: ``bidirectional`` (teacher), ``block_causal`` (DF) or ``teacher_forcing`` (TF).
        text_encoder: frozen prompt encoder.
        codec: the latent codec, recorded for inference; unset = the data module's (the codec that made the
            training latents), if it has one.
        negative_prompt: prompt of the unconditional branch (used for caption dropout and guidance).
        caption_dropout: probability of training a sample unconditionally (0 in the official TF/DF baselines).
        loss_weight: ``schedule`` (the flow-matching training weight per frame, official ``model/diffusion.py``)
            or ``uniform`` (plain MSE); unset = ``schedule`` for DF/TF, ``uniform`` for the teacher.
        noise_augmentation_max_timestep: TF only: noise the clean context per chunk at a level from the first
            (``official``) or the low-noise (``low_noise``) M levels of the grid; 0 = clean context (official
            default). On the 0-N timestep scale.
        augmentation_indexing: ``official`` (the M noisiest grid levels, what the official code does) or
            ``low_noise`` (levels with timestep below M, what its comment intends); see the module docstring.
        schedule: the training noise schedule: ``N`` levels from 1 down, reshaped by ``shift`` (8 in the
            official TF/DF code, the default of ``utils/wan_wrapper.py::WanDiffusionWrapper``).
        optimizer: optimizer factory (default: torch AdamW, lr 1e-3).
        warmup_steps: linear learning-rate warm-up.
        lr_decay_steps: after warm-up, cosine decay of the learning rate over this many steps down to
            ``min_lr_ratio`` of it (then constant); 0 = constant after warm-up.
        min_lr_ratio: final learning rate of the cosine decay, as a fraction of the peak.
        sigma_sampling: the teacher's training noise density: ``grid`` (uniform on the shifted grid) or
            ``logit_normal`` (see the module docstring); DF/TF always draw from the grid (official).
        logit_mean: ``m`` of ``logit_normal``.
        logit_std: ``s`` of ``logit_normal``.
        frame_level_fraction: teacher only: share of samples whose latent frames each get their own level,
            drawn independently from ``sigma_sampling`` (diffusion-forcing-style noise for a bidirectional
            model, Chen et al. 2024); the rest keep one level per sample. 0 (default) draws nothing extra, so
            earlier runs replay exactly. Why: with one level per clip the noisy clip itself shows the motion
            wherever it shows the object, so the direction word of a toy prompt is redundant for the loss and
            the toy teachers learned to ignore it (docs/toy_teacher.md "The direction word"); a sample with
            some frames nearly clean and others noisy is one where carrying content along the prompted
            motion pays.
        clean_prefix_fraction: teacher only: share of samples whose first ``clean_prefix_frames`` latent frames
            are given clean (sigma 0) and left out of the loss, image-to-video style; the rest of the clip keeps
            its levels. 0 (default) draws nothing extra. Why: one clean frame shows where the objects are but
            not where they go, so here, unlike with per-frame levels, only the direction word tells the motion of
            the noisy frames (docs/toy_teacher.md "The direction word").
        clean_prefix_frames: length of that clean prefix in latent frames; None (default) is the first chunk
            (``frames_per_chunk``), the setting of chunk-wise image-to-video; 1 shows no motion at all.
        optim: gradient clipping (off by default) and accumulation.
        ema: EMA of the weights (the exported teacher is the EMA when on).
        sampling: how the trained model is sampled (recorded for inference): steps, shift, guidance, solver.
        gradient_checkpointing: activation checkpointing per transformer block (on in the official configs).
        seed: seed of the random initialisation and of noise.
    """

    engine_modules = ("model",)
    sample_network = "model"
    ema_network = "model"

    def __init__(
        self,
        model: str = "debug",
        model_overrides: dict[str, Any] | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        attention: Literal["bidirectional", "block_causal", "teacher_forcing"] = "bidirectional",
        text_encoder: TextEncoder | None = None,
        codec: VideoCodec | None = None,
        negative_prompt: str = NEGATIVE_PROMPT,
        caption_dropout: float = 0.1,
        loss_weight: Literal["schedule", "uniform"] | None = None,
        noise_augmentation_max_timestep: int = 0,
        augmentation_indexing: AugmentationIndexing = "official",
        schedule: FlowMatchSchedule = FlowMatchSchedule(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        min_lr_ratio: float = 0.0,
        sigma_sampling: Literal["grid", "logit_normal"] = "grid",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        frame_level_fraction: float = 0.0,
        clean_prefix_fraction: float = 0.0,
        clean_prefix_frames: int | None = None,
        optim: OptimConfig = OptimConfig(grad_clip=0.0),
        ema: EMAConfig = EMAConfig(decay=0.0, start_step=0),
        sampling: ManyStepSampling = ManyStepSampling(),
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(geometry=geometry, schedule=schedule, text_encoder=text_encoder, codec=codec,
                         negative_prompt=negative_prompt, optim=optim, ema=ema, seed=seed)
        self.save_hyperparameters(ignore=["text_encoder", "codec", "optimizer"])
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"--model.init_args.caption_dropout must be in [0, 1), got {caption_dropout}")
        n = schedule.num_train_timesteps
        if not 0 <= noise_augmentation_max_timestep <= n:
            raise ValueError(
                f"--model.init_args.noise_augmentation_max_timestep must lie in [0, {n}], got "
                f"{noise_augmentation_max_timestep}"
            )
        if noise_augmentation_max_timestep and attention != "teacher_forcing":
            raise ValueError(
                "--model.init_args.noise_augmentation_max_timestep augments the clean context of teacher forcing: "
                f"it needs attention teacher_forcing, got {attention}"
            )
        if augmentation_indexing not in ("official", "low_noise"):
            raise ValueError(
                f"--model.init_args.augmentation_indexing must be official or low_noise, got {augmentation_indexing!r}"
            )
        if noise_augmentation_max_timestep and augmentation_indexing == "low_noise":
            if float(schedule.sigmas()[-1]) * n >= noise_augmentation_max_timestep:
                raise ValueError(
                    f"--model.init_args.noise_augmentation_max_timestep={noise_augmentation_max_timestep}: no level "
                    f"of the shift-{schedule.shift} grid has a timestep below it (augmentation_indexing low_noise)"
                )
        if lr_decay_steps < 0 or warmup_steps < 0:
            raise ValueError("--model.init_args.warmup_steps and lr_decay_steps must be >= 0, got "
                             f"{warmup_steps} and {lr_decay_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"--model.init_args.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if sigma_sampling not in ("grid", "logit_normal"):
            raise ValueError(f"--model.init_args.sigma_sampling must be grid or logit_normal, got {sigma_sampling!r}")
        if sigma_sampling != "grid" and attention != "bidirectional":
            raise ValueError(
                f"--model.init_args.sigma_sampling {sigma_sampling} is a teacher option: DF/TF draw per-chunk levels "
                f"from the grid as the official code does (attention is {attention})"
            )
        if logit_std <= 0:
            raise ValueError(f"--model.init_args.logit_std must be positive, got {logit_std}")
        for name, value, why in (
            ("frame_level_fraction", frame_level_fraction, "DF/TF already draw one level per chunk"),
            ("clean_prefix_fraction", clean_prefix_fraction,
             "TF gives its clean context through attention teacher_forcing"),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--model.init_args.{name} must be in [0, 1], got {value}")
            if value and attention != "bidirectional":
                raise ValueError(f"--model.init_args.{name} is a teacher option: {why} (attention is {attention})")
        prefix = geometry.frames_per_chunk if clean_prefix_frames is None else clean_prefix_frames
        if clean_prefix_fraction and not 0 < prefix < geometry.num_frames:
            raise ValueError(
                f"--model.init_args.clean_prefix_frames must be in [1, num_frames) = [1, {geometry.num_frames}) "
                f"so that noisy frames follow the clean prefix, got {prefix}"
            )
        self.clean_prefix_frames = prefix
        self.check_network_sources({"model": (model, model_overrides)})
        self.attention = attention
        if loss_weight is None:
            loss_weight = "uniform" if attention == "bidirectional" else "schedule"
        self.loss_weight = loss_weight
        self.sampling = sampling
        self.optimizer_factory = optimizer

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        h = self.hparams
        self.model = self.trainable(self.build_network(h.model, h.model_overrides),
                                    gradient_checkpointing=h.gradient_checkpointing)
        self.check_network(self.model, "model")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.codec is None and getattr(datamodule, "codec", None) is not None:
            object.__setattr__(self, "_codec", datamodule.codec)
        super().setup(stage)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(self.model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier of update ``step``: linear warm-up, then cosine down to ``min_lr_ratio``."""
        h = self.hparams
        warm = max(1, h.warmup_steps)
        if step < warm or h.lr_decay_steps == 0:
            return min(1.0, (step + 1) / warm)
        t = min(1.0, (step - warm) / h.lr_decay_steps)
        return h.min_lr_ratio + (1.0 - h.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def inference_settings(self) -> InferenceSettings:
        sampler = "euler" if self.attention == "bidirectional" else "causal_cfg"
        return InferenceSettings(geometry=self.geometry, sampler=sampler, sampling=self.sampling,
                                 negative_prompt=self.negative_prompt)

    def sample_sigma(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """The training noise levels ``(B, F)``: the one place they are drawn.

        Teacher: one level per sample (``sigma_sampling``: uniform on the shifted ``N``-point grid, or shifted
        logit-normal), repeated over the frames; with ``frame_level_fraction`` that share of samples gets one
        level per frame from the same density instead; with ``clean_prefix_fraction`` that share (drawn after)
        gets level 0 on its first ``clean_prefix_frames`` frames, which the loss leaves out. DF/TF:
        one level per chunk, an index uniform into the same grid (official ``model/diffusion.py``,
        ``forcing.sample_forcing_sigmas``).
        """
        geo = self.geometry
        if self.attention != "bidirectional":
            return sample_forcing_sigmas(self.schedule, batch, geo.num_frames, geo.frames_per_chunk, g,
                                         device=self.device)
        h = self.hparams
        sigma = self._teacher_sigma((batch,), g)[:, None].expand(batch, geo.num_frames)
        if h.frame_level_fraction > 0:  # drawn after the per-sample levels: fraction 0 replays earlier runs
            own = torch.rand((batch,), generator=g, device=g.device) < h.frame_level_fraction
            sigma = torch.where(own[:, None], self._teacher_sigma((batch, geo.num_frames), g), sigma)
        if h.clean_prefix_fraction > 0:  # drawn last, so that the other draws replay
            clean = torch.rand((batch,), generator=g, device=g.device) < h.clean_prefix_fraction
            prefix = torch.arange(geo.num_frames, device=sigma.device) < self.clean_prefix_frames
            sigma = torch.where(clean[:, None] & prefix[None], torch.zeros_like(sigma), sigma)
        return sigma

    def _teacher_sigma(self, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        """Levels of ``shape`` from the teacher's ``sigma_sampling`` density."""
        h = self.hparams
        if h.sigma_sampling == "logit_normal":
            n = torch.randn(shape, generator=g, device=g.device)
            return self.schedule.shift_sigma(torch.sigmoid(h.logit_mean + h.logit_std * n))
        u = torch.randint(0, self.schedule.num_train_timesteps, shape, generator=g, device=g.device)
        return self.schedule.shift_sigma(1.0 - u.float() / self.schedule.num_train_timesteps)

    def flow_matching_loss(self, batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss on one (micro-)batch of clips (see the module docstring for the steps)."""
        h = self.hparams
        x0 = batch["latents"].to(self.device)
        g = self.rng(0, self.global_step, self.global_rank, micro)
        prompts = list(batch["prompts"])
        if h.caption_dropout > 0:
            cond, null = self.encode(prompts)
        else:  # nothing is dropped, so the negative prompt need not be encodable (e.g. precomputed embeddings)
            cond = self.text_encoder.encode(prompts).to(self.device)
            null = cond
        context, _ = drop_captions(cond, null, h.caption_dropout, g)  # draws B uniforms either way
        sigma = self.sample_sigma(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        fb = forcing_batch(x0, noise, schedule=self.schedule, frames_per_chunk=self.geometry.frames_per_chunk,
                           generator=g, teacher_forcing=self.attention == "teacher_forcing",
                           augmentation_max_timestep=h.noise_augmentation_max_timestep,
                           augmentation_indexing=h.augmentation_indexing, sigma=sigma)
        mask = None
        if self.attention == "bidirectional":
            # The teacher takes one noise level per sample (per frame with frame_level_fraction or a clean prefix).
            per_frame = h.frame_level_fraction > 0 or h.clean_prefix_fraction > 0
            sigma = fb.sigma if per_frame else fb.sigma[:, 0]
            if h.clean_prefix_fraction > 0:
                # Level 0 marks the clean prefix (the training densities never draw 0): its target eps - x0 is
                # not observable, so it is left out of the loss.
                mask = fb.sigma > 0
            flow = self.denoiser("model").flow(fb.noisy, sigma, context, attention="bidirectional")
        else:
            flow = forcing_forward(self.denoiser("model"), fb.noisy, fb.sigma, context,
                                   frames_per_chunk=self.geometry.frames_per_chunk, clean_x=fb.clean_x,
                                   clean_sigma=fb.clean_sigma, flow=True)
        weight = fb.weight if self.loss_weight == "schedule" else torch.ones_like(fb.weight)
        return weighted_flow_loss(flow, fb.target, weight, mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        batch = {k: batch[k] for k in ("latents", "prompts")}
        lr = opt.param_groups[0]["lr"]  # the rate of this step, before the scheduler moves it
        logs = self.update("model", opt, batch, self.flow_matching_loss)
        # The EMA follows the update at once: a checkpoint saved at the end of this step (ModelCheckpoint runs
        # before the module's on_train_batch_end) then holds the EMA of exactly these weights.
        self.update_ema(self.global_step)
        self.lr_schedulers().step()
        size = batch["latents"].shape[0]
        self.log("train/loss", logs["loss"], prog_bar=True, on_step=True, batch_size=size)
        self.log("train/flow_mse", logs["flow_mse"], on_step=True, batch_size=size)
        self.log("lr", lr, on_step=True, batch_size=size)
        return logs["loss"]

