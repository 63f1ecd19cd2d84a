"""Many-step flow-matching training of a Wan transformer: the bidirectional teacher and the TF/DF baselines.

One module, three attention layouts (notes §4.5, ``model/diffusion.py`` of the official code):

- ``bidirectional``: the teacher (one sigma per sample, full attention);
- ``block_causal``: diffusion forcing (one sigma per chunk, causal across chunks);
- ``teacher_forcing``: the noisy clip attends to a clean copy of earlier chunks (one sigma per chunk).

Flow matching (Wan's parameterisation): ``x_t = (1 − σ) x0 + σ ε``, the network predicts the flow ``ε − x0``
(through the ``Denoiser``, the only σ ↔ timestep boundary), loss = MSE. Sigmas are drawn uniformly on the
1000-step grid and shifted (:meth:`FlowMatchingDiffusion.sample_sigma`, ``schedule.shift``). Caption dropout
(the prompt replaced by the negative prompt with probability ``caption_dropout``) trains the unconditional branch
used by classifier-free guidance.

Randomness: dropout, sigmas and noise of step ``s`` come from ``rng(0, s, rank, micro-batch)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from sfvideo.config import NEGATIVE_PROMPT, EMAConfig, InferenceSettings, ManyStepSampling, OptimConfig
from sfvideo.diffusion.schedule import FlowMatchSchedule, add_noise, flow_target
from sfvideo.geometry import VideoGeometry
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
        negative_prompt: prompt of the unconditional branch (used for caption dropout).
        caption_dropout: probability of training a sample unconditionally.
        schedule: the training noise schedule (its ``shift`` reshapes the uniform sigmas).
        optimizer: optimizer factory (default: torch AdamW, lr 1e-3).
        warmup_steps: linear learning-rate warm-up.
        optim: gradient clipping (off by default) and accumulation.
        ema: EMA of the weights (the exported teacher is the EMA when on).
        sampling: how the trained model is sampled (recorded for inference): steps, shift and guidance.
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
        schedule: FlowMatchSchedule = FlowMatchSchedule(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        optim: OptimConfig = OptimConfig(grad_clip=0.0),
        ema: EMAConfig = EMAConfig(decay=0.0, start_step=0),
        sampling: ManyStepSampling = ManyStepSampling(),
        seed: int = 0,
    ) -> None:
        super().__init__(geometry=geometry, schedule=schedule, text_encoder=text_encoder, codec=codec,
                         negative_prompt=negative_prompt, optim=optim, ema=ema, seed=seed)
        self.save_hyperparameters(ignore=["text_encoder", "codec", "optimizer"])
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"--model.init_args.caption_dropout must be in [0, 1), got {caption_dropout}")
        self.check_network_sources({"model": (model, model_overrides)})
        self.attention = attention
        self.sampling = sampling
        self.optimizer_factory = optimizer

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        self.model = self.trainable(self.build_network(self.hparams.model, self.hparams.model_overrides))
        self.check_network(self.model, "model")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.codec is None and getattr(datamodule, "codec", None) is not None:
            object.__setattr__(self, "_codec", datamodule.codec)
        super().setup(stage)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(self.model.parameters())
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def inference_settings(self) -> InferenceSettings:
        sampler = "euler" if self.attention == "bidirectional" else "causal_cfg"
        return InferenceSettings(geometry=self.geometry, sampler=sampler, sampling=self.sampling,
                                 negative_prompt=self.negative_prompt)

    def sample_sigma(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """One sigma per sample (teacher) or per chunk repeated over its frames (DF/TF): ``(B, F)``."""
        geo = self.geometry
        n = batch if self.attention == "bidirectional" else batch * geo.num_chunks
        u = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=g, device=g.device)
        sigma = self.schedule.shift_sigma(1.0 - u.float() / self.schedule.num_train_timesteps)
        if self.attention == "bidirectional":
            return sigma[:, None].expand(batch, geo.num_frames)
        return sigma.view(batch, geo.num_chunks).repeat_interleave(geo.frames_per_chunk, dim=1)

    def flow_matching_loss(self, batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between the predicted flow and ``noise - x0`` on one (micro-)batch of clips."""
        x0 = batch["latents"].to(self.device)
        prompts = list(batch["prompts"])
        g = self.rng(0, self.global_step, self.global_rank, micro)
        drop = torch.rand(len(prompts), generator=g, device=self.device) < self.hparams.caption_dropout
        prompts = [self.negative_prompt if d else p for p, d in zip(prompts, drop.tolist())]
        context = self.text_encoder.encode(prompts).to(self.device)
        sigma = self.sample_sigma(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        xt = add_noise(x0, noise, sigma)
        kwargs: dict[str, Any] = {"attention": self.attention, "frames_per_chunk": self.geometry.frames_per_chunk}
        if self.attention == "teacher_forcing":
            kwargs["clean_x"] = x0
        # The teacher takes one noise level per sample, the causal layouts one per frame.
        sigma_in = sigma[:, 0] if self.attention == "bidirectional" else sigma
        flow = self.denoiser("model").flow(xt, sigma_in, context, **kwargs)
        loss = torch.nn.functional.mse_loss(flow.float(), flow_target(x0, noise).float())
        return loss, {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        batch = {k: batch[k] for k in ("latents", "prompts")}
        lr = opt.param_groups[0]["lr"]  # the rate of this step, before the scheduler moves it
        logs = self.update("model", opt, batch, self.flow_matching_loss)
        self.lr_schedulers().step()
        size = batch["latents"].shape[0]
        self.log("train/loss", logs["loss"], prog_bar=True, on_step=True, batch_size=size)
        self.log("lr", lr, on_step=True, batch_size=size)
        return logs["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema(self.global_step)
