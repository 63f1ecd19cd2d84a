"""Many-step flow-matching training of a Wan transformer: the bidirectional teacher and the TF/DF baselines.

One module, three attention layouts (notes §4.5, ``model/diffusion.py`` of the official code):

- ``bidirectional``: the teacher (one sigma per sample, full attention);
- ``block_causal``: diffusion forcing (one sigma per chunk, causal across chunks);
- ``teacher_forcing``: the noisy clip attends to a clean copy of earlier chunks (one sigma per chunk).

Flow matching (Wan's parameterisation): ``x_t = (1 − σ) x0 + σ ε``, the network predicts the flow ``ε − x0``,
loss = MSE. Sigmas are drawn uniformly on the 1000-step grid and shifted (``FlowMatchSchedule.shift``).
Caption dropout (the prompt replaced by the negative prompt with probability ``caption_dropout``) trains the
unconditional branch used by classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from sfvideo.diffusion.schedule import FlowMatchSchedule, add_noise, flow_target
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import TextEncoder
from sfvideo.training.networks import PromptConditioning, build_transformer, network_configs
from sfvideo.training.strategies import RANK_LOCAL_KEY, ShardedEMA


class FlowMatchingDiffusion(PromptConditioning, L.LightningModule):
    """Train a transformer with flow matching (teacher, diffusion forcing or teacher forcing).

    Args:
        model: flavor name (random init), folder or checkpoint the network starts from.
        model_overrides: config overrides for a flavor.
        geometry: latent clip shape and chunking.
        attention: ``bidirectional`` (teacher), ``block_causal`` (DF) or ``teacher_forcing`` (TF).
        text_encoder: frozen prompt encoder; unset = the toy world's.
        negative_prompt: prompt of the unconditional branch (used for caption dropout).
        caption_dropout: probability of training a sample unconditionally.
        shift: timestep shift of the schedule.
        optimizer: optimizer factory (default: torch AdamW, lr 1e-3).
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA of the weights (the exported teacher is the EMA when > 0).
        seed: seed of the random initialisation and of noise.
    """

    def __init__(
        self,
        model: str = "debug",
        model_overrides: dict[str, Any] | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        attention: Literal["bidirectional", "block_causal", "teacher_forcing"] = "bidirectional",
        text_encoder: TextEncoder | None = None,
        negative_prompt: str = "",
        caption_dropout: float = 0.1,
        shift: float = 5.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        ema_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder", "optimizer"])
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"--model.caption_dropout must be in [0, 1), got {caption_dropout}")
        self.geometry = geometry
        self.schedule = FlowMatchSchedule(shift=shift)
        self.optimizer_factory = optimizer
        self.set_text_encoder(text_encoder)
        self.ema = ShardedEMA(decay=ema_decay) if ema_decay > 0 else None

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        self.model = build_transformer(
            self.hparams.model, overrides=self.hparams.model_overrides, seed=self.hparams.seed
        )

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(self.model.parameters())
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def sample_sigma(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """One sigma per sample (teacher) or per chunk repeated over its frames (DF/TF): ``(B, F)``."""
        geo = self.geometry
        n = batch if self.hparams.attention == "bidirectional" else batch * geo.num_chunks
        u = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=g, device=g.device)
        sigma = self.schedule.shift_sigma(1.0 - u.float() / self.schedule.num_train_timesteps)
        if self.hparams.attention == "bidirectional":
            return sigma[:, None].expand(batch, geo.num_frames)
        return sigma.view(batch, geo.num_chunks).repeat_interleave(geo.frames_per_chunk, dim=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"].to(self.device)
        prompts = list(batch["prompts"])
        g = torch.Generator(device=self.device).manual_seed(
            self.hparams.seed * 1_000_003 + self.global_step * 97 + self.global_rank
        )
        drop = torch.rand(len(prompts), generator=g, device=self.device) < self.hparams.caption_dropout
        prompts = [self.hparams.negative_prompt if d else p for p, d in zip(prompts, drop.tolist())]
        context = self.text_encoder.encode(prompts).to(self.device)
        sigma = self.sample_sigma(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        xt = add_noise(x0, noise, sigma)
        kwargs: dict[str, Any] = {
            "attention": self.hparams.attention,
            "frames_per_chunk": self.geometry.frames_per_chunk,
        }
        if self.hparams.attention == "teacher_forcing":
            kwargs["clean_x"] = x0
        timestep = sigma * self.schedule.num_train_timesteps
        if self.hparams.attention == "bidirectional":
            timestep = timestep[:, 0]
        flow = self.model(xt, timestep, context, **kwargs)
        loss = torch.nn.functional.mse_loss(flow.float(), flow_target(x0, noise).float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=x0.shape[0])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "count_consumed_batch"):
            dm.count_consumed_batch()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sfvideo"] = {"configs": network_configs(self, ("model",))}
        if self.ema is not None:
            checkpoint.setdefault(RANK_LOCAL_KEY, {})["model_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ema = (checkpoint.get(RANK_LOCAL_KEY) or {}).get("model_ema")
        if ema is not None and self.ema is not None:
            self.ema.load_state_dict(ema)
