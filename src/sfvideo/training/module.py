"""Self Forcing with DMD as a LightningModule (Huang et al. 2025, Algorithm 1; Yin et al. 2024 eq. 7–8).

Roles (never mixed): ``generator`` = the causal few-step student, ``teacher`` = frozen real score μ_real,
``critic`` = trainable fake score μ_fake. One iteration (``training_step``) is the official loop (notes §3.7):
a generator update every ``critic_updates_per_generator_update``-th iteration, then one critic update, each on its
own prompt batch and its own Self Forcing rollout.

Every trainable network is reached through ``self.net(name)``: the strategy's engine for it when the strategy
wraps one per network (DeepSpeed, see ``training/strategies.py``), else the plain module. No gradient of one
trainable network flows through another's backward: the DMD target is computed under no_grad and the critic
trains on detached rollouts.

Randomness: decisions every rank must share (exit steps) come from a generator seeded with ``(seed, step)``,
identical on all ranks (no collectives in model code); noise comes from ``(seed, rank, step)``, different per rank.
Both are re-derived from the step counters, so a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import sample_exit_steps, self_forcing_rollout
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.losses.critic import critic_loss
from sfvideo.losses.dmd import dmd_loss
from sfvideo.nn.interfaces import TextEncoder, VideoCodec
from sfvideo.seeding import mix_seed
from sfvideo.training.networks import PromptConditioning, build_transformer, freeze, network_configs
from sfvideo.training.optim import CriticAdamW, GeneratorAdamW
from sfvideo.training.strategies import RANK_LOCAL_KEY, ShardedEMA, network

WAN_NEGATIVE_PROMPT = ""
"""Default negative prompt (the unconditional branch of classifier-free guidance)."""


class SelfForcingDMD(PromptConditioning, L.LightningModule):
    """Self Forcing training of a causal generator with the DMD loss.

    Args:
        teacher: the bidirectional teacher: a flavor name (``debug``, ``toy``, ``1.3B``, ``14B``: random weights,
            for tests and benchmarks), a diffusers model folder, an original Wan2.1 file, or a bundled asset name.
        teacher_overrides: config overrides applied to a flavor.
        generator_init: weights the causal generator starts from (an ODE-initialised checkpoint, a diffusers
            folder, or a Self Forcing checkpoint); unset = the teacher's weights.
        critic_init: weights of the critic; unset = the teacher's weights (the official recipe).
        geometry: latent clip shape and chunking.
        text_encoder: frozen prompt encoder (``sfvideo.toy.encoders.ToyTextEncoder`` or
            ``sfvideo.nn.umt5.UMT5TextEncoder``); unset = the toy world's.
        codec: frozen latent codec, used only to decode samples; unset = none.
        negative_prompt: prompt of the unconditional branch of classifier-free guidance.
        shift: timestep shift of the flow-matching schedule (5 in the paper).
        denoising_steps: the generator's few-step list before warping.
        warp_denoising_steps: map the list through the shifted grid (1000, 937.5, 833.3, 625 for shift 5).
        guidance_scale: teacher guidance, official convention ``cond + g·(cond − uncond)``.
        dmd_min_timestep / dmd_max_timestep: clamp of the DMD/critic timestep (on the 0–1000 scale).
        context_noise: timestep of the noise added to a chunk before it is written to the KV cache (0 = clean).
        same_exit_across_chunks: one exit step for all chunks (official default) or one per chunk.
        last_step_only: always exit at the last step.
        rollout_frames: latent frames per training rollout (≥ geometry.num_frames); when longer, gradient and
            loss cover only the last ``geometry.num_frames`` frames (notes §3.5).
        window_frames: attention window of the generator during the rollout (the paper's trick: the last chunk
            cannot see the first); unset = global attention.
        cache_grad_mode: ``truncate`` (cached K/V carry no gradient into earlier chunks) or ``straight_through``
            (the official code's behaviour, notes §3.6).
        critic_updates_per_generator_update: N critic updates per generator update (5 officially).
        accumulate_micro_batches: gradient accumulation: each update averages this many micro-batches of the
            data module's batch (the prompt batch is split into equal parts).
        generator_optimizer / critic_optimizer: optimizer factories (defaults: the official AdamW settings).
        grad_clip: max gradient norm of each network (10 officially); 0 disables.
        ema_decay: EMA decay of the generator; 0 disables the EMA.
        ema_start_step: generator step at which the EMA starts (a copy of the weights).
        max_generator_steps: stop after this many generator updates (Lightning's ``max_steps`` counts every
            optimizer step of both networks).
        gradient_checkpointing: activation checkpointing per transformer block for generator and critic.
        teacher_dtype: precision the frozen teacher is held in (no fp32 master weights needed).
        seed: seed of shared decisions and of noise.
    """

    engine_modules = ("generator", "critic")
    frozen_modules = ("teacher",)

    def __init__(
        self,
        teacher: str = "debug",
        teacher_overrides: dict[str, Any] | None = None,
        generator_init: str | None = None,
        critic_init: str | None = None,
        geometry: VideoGeometry = VideoGeometry(),
        text_encoder: TextEncoder | None = None,
        codec: VideoCodec | None = None,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        shift: float = 5.0,
        denoising_steps: list[int] = [1000, 750, 500, 250],
        warp_denoising_steps: bool = True,
        guidance_scale: float = 3.0,
        dmd_min_timestep: int = 20,
        dmd_max_timestep: int = 980,
        context_noise: float = 0.0,
        same_exit_across_chunks: bool = True,
        last_step_only: bool = False,
        rollout_frames: int | None = None,
        window_frames: int | None = None,
        cache_grad_mode: Literal["truncate", "straight_through"] = "truncate",
        critic_updates_per_generator_update: int = 5,
        accumulate_micro_batches: int = 1,
        generator_optimizer: OptimizerCallable = GeneratorAdamW,
        critic_optimizer: OptimizerCallable = CriticAdamW,
        grad_clip: float = 10.0,
        ema_decay: float = 0.99,
        ema_start_step: int = 200,
        max_generator_steps: int | None = None,
        gradient_checkpointing: bool = False,
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder", "codec", "generator_optimizer", "critic_optimizer"])
        self._validate()
        self.automatic_optimization = False
        # Frozen teacher weights are not part of the training state: checkpoints hold generator, critic, EMA.
        self.strict_loading = False
        self.geometry = geometry
        self.schedule = FlowMatchSchedule(shift=shift)
        self.step_sigmas = self.schedule.step_sigmas(denoising_steps, warp=warp_denoising_steps)
        self.generator_optimizer = generator_optimizer
        self.critic_optimizer = critic_optimizer
        # Frozen encoders are not registered as submodules: they are not trained, not checkpointed, and may be
        # offloaded by their own wrappers (umT5 is 5B parameters).
        self.set_text_encoder(text_encoder)
        object.__setattr__(self, "_codec", codec)
        self.generator_steps = 0
        self.critic_steps = 0
        self.ema = ShardedEMA(decay=ema_decay, start_step=ema_start_step) if ema_decay > 0 else None

    # ------------------------------------------------------------------ set-up
    def _validate(self) -> None:
        h = self.hparams
        if h.critic_updates_per_generator_update < 1:
            raise ValueError("--model.critic_updates_per_generator_update must be >= 1")
        if h.accumulate_micro_batches < 1:
            raise ValueError("--model.accumulate_micro_batches must be >= 1")
        if not 0 <= h.dmd_min_timestep < h.dmd_max_timestep <= 1000:
            raise ValueError("--model.dmd_min_timestep/--model.dmd_max_timestep must satisfy 0 <= min < max <= 1000")
        if not 0.0 <= h.ema_decay < 1.0:
            raise ValueError(f"--model.ema_decay must be in [0, 1), got {h.ema_decay}")
        if sorted(h.denoising_steps, reverse=True) != list(h.denoising_steps) or not h.denoising_steps:
            raise ValueError(f"--model.denoising_steps must be a non-empty decreasing list, got {h.denoising_steps}")
        g = h.geometry
        if h.rollout_frames is not None and (h.rollout_frames < g.num_frames or h.rollout_frames % g.frames_per_chunk):
            raise ValueError(
                f"--model.rollout_frames={h.rollout_frames} must be >= geometry.num_frames={g.num_frames} and a "
                f"multiple of geometry.frames_per_chunk={g.frames_per_chunk}"
            )
        if h.window_frames is not None and (
            h.window_frames < g.frames_per_chunk or h.window_frames % g.frames_per_chunk
        ):
            raise ValueError(f"--model.window_frames={h.window_frames} must be a positive multiple of frames_per_chunk")

    @property
    def codec(self) -> VideoCodec | None:
        return self._codec

    def configure_model(self) -> None:
        if hasattr(self, "teacher"):
            return
        h = self.hparams
        teacher = build_transformer(h.teacher, overrides=h.teacher_overrides, seed=h.seed)
        self.generator = build_transformer(h.generator_init) if h.generator_init else copy.deepcopy(teacher)
        self.critic = build_transformer(h.critic_init) if h.critic_init else copy.deepcopy(teacher)
        if h.teacher_dtype == "bfloat16":
            teacher = teacher.to(torch.bfloat16)
        self.teacher = freeze(teacher)
        for net in (self.generator, self.critic):
            net.train()
            if h.gradient_checkpointing:
                net.enable_gradient_checkpointing()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            self.generator_optimizer(self.generator.parameters()),
            self.critic_optimizer(self.critic.parameters()),
        ]

    def net(self, name: str) -> nn.Module:
        """The network to run forward through: the strategy's engine for it (DeepSpeed), or the plain module."""
        return network(self, name)

    def denoiser(self, name: str) -> Denoiser:
        return Denoiser(self.net(name), num_train_timesteps=self.schedule.num_train_timesteps)

    # ------------------------------------------------------------------ randomness
    def _generator(self, *parts: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.hparams.seed, *parts))
        return g

    def shared_generator(self, role: int) -> torch.Generator:
        """Identical on every rank: decisions that all ranks must agree on (exit steps)."""
        return self._generator(0, role, self.critic_steps)

    def noise_generator(self, role: int, micro: int) -> torch.Generator:
        """Different on every rank: noise."""
        return self._generator(1, role, self.critic_steps, self.global_rank, micro)

    # ------------------------------------------------------------------ the algorithm
    def rollout(self, cond: torch.Tensor, *, grad: bool, role: int, micro: int) -> torch.Tensor:
        """Self Forcing rollout (Algorithm 1): the generator's own KV-cached autoregressive sample.

        Returns the last ``geometry.num_frames`` latent frames ``(B, F, C, H, W)``; with ``grad`` only the exit
        step of each chunk in that window carries gradient.
        """
        h, geo = self.hparams, self.geometry
        frames = h.rollout_frames or geo.num_frames
        num_chunks = frames // geo.frames_per_chunk
        exits = sample_exit_steps(
            num_chunks,
            len(self.step_sigmas),
            self.shared_generator(role),
            same_across_chunks=h.same_exit_across_chunks,
            last_step_only=h.last_step_only,
        )
        ng = self.noise_generator(role, micro)
        dtype = self.generator.compute_dtype
        noise = torch.randn(geo.latent_shape(cond.shape[0], frames), generator=ng, device=self.device, dtype=dtype)
        cache = self.generator.new_kv_cache(
            cond.shape[0],
            geo.tokens_per_frame,
            frames,
            window_frames=h.window_frames,
            grad_mode=h.cache_grad_mode,
            dtype=dtype,
            device=self.device,
        )
        result = self_forcing_rollout(
            self.denoiser("generator"),
            noise,
            cond,
            step_sigmas=self.step_sigmas.to(self.device),
            frames_per_chunk=geo.frames_per_chunk,
            kv_cache=cache,
            exit_steps=exits,
            context_sigma=h.context_noise / self.schedule.num_train_timesteps,
            noise_generator=ng,
            grad_enabled=grad,
            grad_from_frame=frames - geo.num_frames,
        )
        return result.x0[:, frames - geo.num_frames :]

    def dmd_sigma_and_noise(self, x: torch.Tensor, role: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._generator(2, role, self.critic_steps, self.global_rank, micro)
        sigma = self.schedule.sample_dmd_sigma(
            x.shape[0],
            g,
            min_timestep=self.hparams.dmd_min_timestep,
            max_timestep=self.hparams.dmd_max_timestep,
            device=x.device,
        )
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return sigma, noise

    def generator_loss(self, prompts: list[str], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond = self.encode(prompts)
        x = self.rollout(cond, grad=True, role=0, micro=micro)
        sigma, noise = self.dmd_sigma_and_noise(x, role=0, micro=micro)
        return dmd_loss(
            x,
            teacher=self.denoiser("teacher"),
            critic=self.denoiser("critic"),
            cond=cond,
            uncond=uncond,
            sigma=sigma,
            noise=noise,
            guidance_scale=self.hparams.guidance_scale,
        )

    def critic_loss(self, prompts: list[str], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, _ = self.encode(prompts)
        with torch.no_grad():
            x = self.rollout(cond, grad=False, role=1, micro=micro)
        sigma, noise = self.dmd_sigma_and_noise(x, role=1, micro=micro)
        return critic_loss(x, critic=self.denoiser("critic"), context=cond, sigma=sigma, noise=noise)

    def update(
        self,
        name: str,
        optimizer: Any,
        prompts: list[str],
        loss_fn: Callable[[list[str], int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    ) -> dict[str, torch.Tensor]:
        """One optimizer update of network ``name``, averaging ``accumulate_micro_batches`` micro-batches."""
        k = self.hparams.accumulate_micro_batches
        if len(prompts) % k:
            raise ValueError(
                f"prompt batch of {len(prompts)} does not split into --model.accumulate_micro_batches={k} parts"
            )
        size = len(prompts) // k
        logs: dict[str, torch.Tensor] = {}
        self.toggle_optimizer(optimizer)
        for micro in range(k):
            loss, micro_logs = loss_fn(prompts[micro * size : (micro + 1) * size], micro)
            self.manual_backward(loss / k)
            for key, value in {"loss": loss, **micro_logs}.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float() / k
        if self.hparams.grad_clip > 0:
            logs["grad_norm"] = self.clip_network_gradients(name, optimizer, self.hparams.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.untoggle_optimizer(optimizer)
        return logs

    def clip_network_gradients(self, name: str, optimizer: Any, max_norm: float) -> torch.Tensor:
        """Clip one network's gradients as the strategy requires; returns the total norm (for the logs).

        DeepSpeed clips inside ``engine.step()`` and reports the previous step's norm (NaN before the first).
        """
        clip = getattr(self.trainer.strategy, "clip_network_gradients", None)
        if clip is not None:
            return clip(self, name, optimizer, max_norm)
        params = [p for p in getattr(self, name).parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        opt_generator, opt_critic = self.optimizers()
        logs: dict[str, torch.Tensor] = {}
        if self.critic_steps % self.hparams.critic_updates_per_generator_update == 0:
            gen_logs = self.update("generator", opt_generator, batch["generator"], self.generator_loss)
            self.generator_steps += 1
            self.update_ema()
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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Count consumed batches before any checkpoint of this step is written, so a resume starts at the next one.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "count_consumed_batch"):
            dm.count_consumed_batch()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.max_generator_steps is not None and self.generator_steps >= self.hparams.max_generator_steps:
            # Stop on generator steps, not on Lightning's global_step (which counts both optimizers).
            if self.critic_steps % self.hparams.critic_updates_per_generator_update == 0:
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

    # ------------------------------------------------------------------ EMA and checkpoints
    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.generator, step=self.generator_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["sfvideo"] = {
            "generator_steps": self.generator_steps,
            "critic_steps": self.critic_steps,
            "configs": network_configs(self, ("generator", "critic")),
        }
        if self.ema is not None:
            # Per-rank state: each rank's EMA shard (ZeRO-3/FSDP2), written once when replicated.
            checkpoint.setdefault(RANK_LOCAL_KEY, {})["generator_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sfvideo", {})
        self.generator_steps = int(state.get("generator_steps", 0))
        self.critic_steps = int(state.get("critic_steps", 0))
        ema = (checkpoint.get(RANK_LOCAL_KEY) or {}).get("generator_ema")
        if ema is not None and self.ema is not None:
            self.ema.load_state_dict(ema)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, num_frames: int | None = None, seed: int = 0, use_ema: bool = False
    ) -> torch.Tensor:
        """Few-step KV-cached generation of latents ``(B, F, C, H, W)`` (no gradient)."""
        from sfvideo.diffusion.rollout import generate_latents

        geo = self.geometry
        frames = num_frames or geo.num_frames
        cond, _ = self.encode(prompts)
        g = torch.Generator(device=self.device).manual_seed(seed)
        model = self.generator
        if use_ema and self.ema is not None and self.ema.initialized:
            model = copy.deepcopy(self.generator)
            model.load_state_dict(self.ema.full_state_dict(self.generator), strict=False)
        dtype = model.compute_dtype
        noise = torch.randn(geo.latent_shape(len(prompts), frames), generator=g, device=self.device, dtype=dtype)
        cache = model.new_kv_cache(len(prompts), geo.tokens_per_frame, frames, dtype=dtype, device=self.device)
        return generate_latents(
            Denoiser(model, num_train_timesteps=self.schedule.num_train_timesteps),
            noise,
            cond,
            step_sigmas=self.step_sigmas.to(self.device),
            frames_per_chunk=geo.frames_per_chunk,
            kv_cache=cache,
            noise_generator=g,
        )

    def predict_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        latents = self.generate(list(batch), seed=self.hparams.seed + batch_idx)
        video = self.codec.decode(latents) if self.codec is not None else None
        return {"prompts": list(batch), "latents": latents.cpu(), "video": None if video is None else video.cpu()}
