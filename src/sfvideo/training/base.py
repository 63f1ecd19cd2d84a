"""What every sfvideo training module shares: networks, encoders, randomness, updates, checkpoints, inference.

A paradigm (``SelfForcingDMD``, ``ODEInit``, ``FlowMatchingDiffusion``; next CausVid-style DF/TF + DMD, SiD, GAN,
many-step TF/DF) is a subclass that builds its networks in ``configure_model`` and writes ``training_step`` as the
algorithm, over these pieces:

* the strategy contract (``strategies.contract.MultiNetworkModule``): ``engine_modules`` / ``frozen_modules``,
  :meth:`TrainingModule.net`, ``grad_clip``; manual optimisation throughout;
* networks: :meth:`~TrainingModule.build_network` (flavor, bundled asset, folder or file), :meth:`~TrainingModule.
  trainable`, :meth:`~TrainingModule.frozen` (the teacher: cast to its dtype keeping fp32 islands, frozen);
* encoders: the frozen text encoder and codec, held outside the module tree (not trained, not checkpointed;
  umT5 manages its own device and offload), :meth:`~TrainingModule.encode` gives ``(cond, uncond)`` with the
  negative prompt's embedding computed once per device (notes §6); their fit with the geometry and the networks
  is checked when the module is built (``config.check_encoders``);
* randomness: :meth:`~TrainingModule.rng` ``(purpose, counter[, rank, micro-batch])`` seeded by
  ``seeding.mix_seed(seed, ...)``: decisions all ranks share leave the rank out, noise puts it in, and a resumed
  run re-derives exactly what the uninterrupted run drew;
* updates: :meth:`~TrainingModule.update` (gradient accumulation over micro-batches, the one clipping path
  ``strategies.clip_network_gradients``, step, zero_grad);
* the data position: every batch is counted before its checkpoint can be written (exact resume);
* the effective batch: :meth:`~TrainingModule.report_effective_batch` prints devices x nodes x micro-batch x
  accumulation once, logs it, and warns when it differs from ``optim.recipe_effective_batch``;
* checkpoints: frozen networks are stripped; ``checkpoint[RECORD_KEY]`` holds the counters (``counters``), the
  trained networks' configs and the run's record (``checkpoints.make_record``: inference settings, text encoder,
  codec, and :meth:`~TrainingModule.training_record`); the EMA is per-rank state under
  ``checkpoint[RANK_LOCAL_KEY]``;
* inference: :meth:`~TrainingModule.inference_engine` samples ``sample_network`` (or its EMA) through
  ``sfvideo.inference``; :meth:`~TrainingModule.generate` and ``predict_step`` use it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from sfvideo.checkpoints import RANK_LOCAL_KEY, RECORD_KEY, make_record
from sfvideo.config import EMAConfig, InferenceSettings, OptimConfig, check_encoders
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.inference import InferenceEngine
from sfvideo.nn.interfaces import class_spec, freeze
from sfvideo.nn.precision import cast_model, parse_dtype
from sfvideo.seeding import mix_seed
from sfvideo.training.ema import ShardedEMA
from sfvideo.training.networks import build_transformer, network_configs, transformer_config
from sfvideo.training.strategies import clip_network_gradients, network

__all__ = ["TrainingModule", "split_batch"]

LossFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(micro_batch, micro_index) -> (loss, logs)``."""


def split_batch(batch: Any, parts: int, what: str = "batch") -> list[Any]:
    """``batch`` (a list, tensor, or mapping of them) cut into ``parts`` equal micro-batches along dim 0."""
    if parts == 1:
        return [batch]
    if isinstance(batch, Mapping):
        split = {k: split_batch(v, parts, f"{what}[{k!r}]") for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    size = len(batch)
    if size % parts:
        raise ValueError(
            f"{what} of {size} does not split into --model.init_args.optim.accumulate_micro_batches={parts} parts"
        )
    step = size // parts
    return [batch[i * step : (i + 1) * step] for i in range(parts)]


class TrainingModule(L.LightningModule):
    """Base of the training modules (see the module docstring).

    Subclasses set the class attributes, call ``super().__init__(...)`` then ``self.save_hyperparameters(...)``,
    and implement ``configure_model``, ``configure_optimizers``, ``training_step`` and :meth:`inference_settings`.

    Args:
        geometry: Latent clip shape and chunking.
        schedule: The flow-matching schedule of training (``N`` of the σ ↔ timestep boundary, the shift).
        text_encoder: Frozen prompt encoder (a ``TextEncoder``); required by every paradigm that encodes prompts.
        codec: Frozen latent codec (a ``VideoCodec``): decodes samples and is recorded for inference.
        negative_prompt: Prompt of the unconditional branch of classifier-free guidance.
        optim: Gradient clipping and accumulation.
        ema: EMA of ``ema_network`` (decay 0 disables it).
        seed: Seed of random initialisation (flavors) and of every random draw of training.
    """

    engine_modules: tuple[str, ...] = ()
    """Trainable networks, in the order of ``configure_optimizers``."""
    frozen_modules: tuple[str, ...] = ()
    """Frozen networks (stripped from checkpoints)."""
    sample_network: str = "generator"
    """The network inference samples (and ``sfvideo export`` exports by default)."""
    ema_network: str = "generator"
    """The network the EMA follows."""
    counters: tuple[str, ...] = ()
    """Integer step counters saved in checkpoints and restored on resume."""

    def __init__(
        self,
        *,
        geometry: VideoGeometry,
        schedule: FlowMatchSchedule,
        text_encoder: Any,
        codec: Any,
        negative_prompt: str,
        optim: OptimConfig,
        ema: EMAConfig | None,
        seed: int,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Frozen networks are not part of the training state: checkpoints hold the trained networks and the EMA.
        self.strict_loading = False
        self.geometry = geometry
        self.schedule = schedule
        self.negative_prompt = negative_prompt
        self.optim = optim
        self.seed = seed
        for name in self.counters:
            setattr(self, name, 0)
        self.ema = ShardedEMA(decay=ema.decay, start_step=ema.start_step) if ema is not None and ema.decay > 0 else None
        # Frozen encoders are not registered as submodules (see the module docstring).
        object.__setattr__(self, "_text_encoder", text_encoder)
        object.__setattr__(self, "_codec", codec)
        object.__setattr__(self, "_uncond", None)
        self.effective_batch: int | None = None
        """devices x nodes x per-rank batch of this run (known once training starts)."""
        check_encoders(geometry=geometry, codec=codec, keys=self.config_keys())

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def config_keys(**networks: str) -> dict[str, str]:
        """Names of the configuration keys for error messages (LightningCLI's)."""
        keys = {k: f"model.init_args.{k}" for k in ("geometry", "text_encoder", "codec")}
        return {**keys, **{k: f"model.init_args.{v}" for k, v in networks.items()}}

    def check_network_sources(self, sources: Mapping[str, tuple[str | None, dict[str, Any] | None]]) -> None:
        """Check the networks' configs (read without loading weights) against geometry and encoders.

        Args:
            sources: ``{config key: (source, overrides)}``; sources whose config cannot be read without loading
                (single weight files) are checked once built (:meth:`check_network`).
        """
        for key, (source, overrides) in sources.items():
            if source is not None:
                config = transformer_config(source, overrides)
                if config is not None:
                    check_encoders(geometry=self.geometry, network=config, text_encoder=self._text_encoder,
                                   keys=self.config_keys(network=key))

    def check_network(self, net: nn.Module, key: str) -> None:
        """Check a built network's config against geometry and encoders."""
        config = getattr(net, "config", None)
        if config is not None:
            check_encoders(geometry=self.geometry, network=dict(config), text_encoder=self._text_encoder,
                           keys=self.config_keys(network=key))

    @property
    def grad_clip(self) -> float:
        """Max gradient norm of each network (the strategy contract; DeepSpeed engines clip with it)."""
        return self.optim.grad_clip

    # ------------------------------------------------------------------ encoders
    @property
    def text_encoder(self) -> Any:
        if self._text_encoder is None:
            raise ValueError(f"{type(self).__name__} has no text encoder: set model.init_args.text_encoder")
        return self._text_encoder

    @property
    def codec(self) -> Any:
        return self._codec

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)`` embeddings ``(B, L, D)`` on the module's device; uncond is the negative prompt's."""
        cond = self.text_encoder.encode(list(prompts)).to(self.device)
        uncond = self._uncond
        if uncond is None or uncond.device != cond.device:
            uncond = self.text_encoder.encode([self.negative_prompt]).to(cond.device)
            object.__setattr__(self, "_uncond", uncond)
        return cond, uncond.expand_as(cond)

    # ------------------------------------------------------------------ networks
    def build_network(self, source: str, overrides: dict[str, Any] | None = None) -> nn.Module:
        """A transformer from a flavor (random weights seeded by ``seed``), bundled asset, folder or file."""
        return build_transformer(source, overrides=overrides, seed=self.seed)

    def trainable(self, net: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
        """``net`` in training mode, with per-block activation checkpointing when asked."""
        net.train()
        if gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return net

    @staticmethod
    def frozen(net: nn.Module, dtype: str | torch.dtype = "float32") -> nn.Module:
        """``net`` as a frozen constant in ``dtype`` (fp32 islands kept: ``nn.precision.cast_model``)."""
        target = parse_dtype(dtype)
        if target != torch.float32:
            cast_model(net, target)
        return freeze(net)

    def net(self, name: str) -> nn.Module:
        """The network to run forward through: the strategy's engine for it (DeepSpeed), or the plain module."""
        return network(self, name)

    def denoiser(self, name: str, **model_kwargs: Any) -> Denoiser:
        """Network ``name`` (through :meth:`net`) in sigma space: the only σ ↔ timestep boundary."""
        n = self.schedule.num_train_timesteps
        return Denoiser(self.net(name), num_train_timesteps=n, model_kwargs=model_kwargs)

    # ------------------------------------------------------------------ randomness
    def rng(self, *parts: int, device: torch.device | str | None = None) -> torch.Generator:
        """A generator seeded with ``mix_seed(seed, *parts)`` on ``device`` (default: the module's)."""
        g = torch.Generator(device=self.device if device is None else device)
        g.manual_seed(mix_seed(self.seed, *parts))
        return g

    # ------------------------------------------------------------------ updates
    def update(self, name: str, optimizer: Any, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """One optimizer update of network ``name``, averaging ``optim.accumulate_micro_batches`` micro-batches.

        Returns the logs averaged over the micro-batches: ``loss``, ``loss_fn``'s own, and ``grad_norm`` when
        clipping is on.
        """
        k = self.optim.accumulate_micro_batches
        logs: dict[str, torch.Tensor] = {}
        self.toggle_optimizer(optimizer)
        for micro, part in enumerate(split_batch(batch, k, what="batch")):
            loss, micro_logs = loss_fn(part, micro)
            self.manual_backward(loss / k)
            for key, value in {"loss": loss, **micro_logs}.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float() / k
        if self.optim.grad_clip > 0:
            logs["grad_norm"] = clip_network_gradients(self, name, optimizer, self.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.untoggle_optimizer(optimizer)
        return logs

    def update_ema(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(getattr(self, self.ema_network), step=step)

    @property
    def ema_ready(self) -> bool:
        """Whether EMA weights exist (an EMA is configured and has started)."""
        return self.ema is not None and self.ema.initialized

    def report_effective_batch(self, per_rank: int) -> int:
        """The effective batch of an update, ``devices x nodes x per_rank`` (``per_rank`` = the data module's
        batch = micro-batch x ``optim.accumulate_micro_batches``): printed once, and a warning when it differs
        from ``optim.recipe_effective_batch``. Returns it (also kept as ``self.effective_batch``)."""
        if self.effective_batch is None:
            trainer, k = self.trainer, self.optim.accumulate_micro_batches
            self.effective_batch = trainer.world_size * per_rank
            rank_zero_info(
                f"sfvideo: effective batch {self.effective_batch} = {trainer.num_devices} devices x "
                f"{trainer.num_nodes} nodes x micro-batch {per_rank // k} x {k} accumulated micro-batches"
            )
            want = getattr(self.optim, "recipe_effective_batch", None)
            if want is not None and want != self.effective_batch:
                rank_zero_warn(
                    f"effective batch {self.effective_batch} differs from the recipe's {want} "
                    f"(model.init_args.optim.recipe_effective_batch): set trainer.devices x trainer.num_nodes x "
                    f"data.batch_size to {want}, or raise model.init_args.optim.accumulate_micro_batches with "
                    f"data.batch_size"
                )
        return self.effective_batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Count consumed batches before any checkpoint of this step is written, so a resume starts at the next one.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "count_consumed_batch"):
            datamodule.count_consumed_batch()

    # ------------------------------------------------------------------ checkpoints
    def inference_settings(self) -> InferenceSettings:
        """How to sample ``sample_network`` after this training (recorded in checkpoints and exports)."""
        raise NotImplementedError

    def training_record(self) -> dict[str, Any]:
        """How this run trains, as JSON data for the record (``checkpoints.make_record``'s ``training``): the
        effective batch and the EMA start; modules add their own facts."""
        ema = None if self.ema is None else {"decay": self.ema.decay, "start_iteration": self.ema.start_step}
        return {"effective_batch": self.effective_batch, "ema": ema}

    def record(self) -> dict[str, Any]:
        """The run's self-description (``checkpoints.make_record``)."""
        return make_record(module=type(self).__name__, network=self.sample_network,
                           settings=self.inference_settings(), text_encoder=class_spec(self._text_encoder),
                           codec=class_spec(self.codec), training=self.training_record())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for prefix in tuple(f"{name}." for name in self.frozen_modules):
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        checkpoint[RECORD_KEY] = {
            **{name: getattr(self, name) for name in self.counters},
            "configs": network_configs(self, self.engine_modules),
            **self.record(),
        }
        if self.ema is not None:
            # Per-rank state: each rank's EMA shard (ZeRO-3/FSDP2), written once when replicated.
            checkpoint.setdefault(RANK_LOCAL_KEY, {})[f"{self.ema_network}_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RECORD_KEY, {})
        for name in self.counters:
            setattr(self, name, int(state.get(name, 0)))
        ema = (checkpoint.get(RANK_LOCAL_KEY) or {}).get(f"{self.ema_network}_ema")
        if ema is not None and self.ema is not None:
            self.ema.load_state_dict(ema)

    # ------------------------------------------------------------------ inference
    def inference_engine(self, *, use_ema: bool = False) -> InferenceEngine:
        """An ``InferenceEngine`` over ``sample_network`` (a copy holding its EMA weights with ``use_ema``).

        Raises:
            ValueError: ``use_ema`` and there are no EMA weights (none configured, or not started yet).
        """
        model = getattr(self, self.sample_network)
        if use_ema:
            if self.ema is None or self.ema_network != self.sample_network:
                raise ValueError(f"use_ema: {type(self).__name__} keeps no EMA of {self.sample_network!r} "
                                 "(model.init_args.ema.decay is 0)")  # fmt: skip
            if not self.ema.initialized:
                raise ValueError(
                    f"use_ema: the EMA of {self.sample_network!r} has not started yet (it starts at trainer "
                    f"iteration {self.ema.start_step}, model.init_args.ema.start_step)"
                )
            full = self.ema.full_state_dict(model)
            model = copy.deepcopy(model)
            model.load_state_dict(full, strict=False)
        return InferenceEngine(model, text_encoder=self.text_encoder, settings=self.inference_settings(),
                               decoder=self.codec, keys=self.config_keys())

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, num_frames: int | None = None, seed: int = 0, use_ema: bool = False
    ) -> torch.Tensor:
        """Latents ``(B, F, C, H, W)`` of ``sample_network`` (no gradient), as ``sfvideo generate`` samples it;
        ``use_ema`` without EMA weights is a ``ValueError``."""
        return self.inference_engine(use_ema=use_ema).generate(prompts, num_frames=num_frames, seed=seed)

    def predict_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        """``{"prompts", "latents", "video" (None without codec)}`` per prompt batch (``sfvideo predict``)."""
        engine = self.inference_engine()
        latents = engine.generate(list(batch), seed=self.seed + batch_idx)
        video = engine.decode(latents) if self.codec is not None else None
        return {"prompts": list(batch), "latents": latents.cpu(), "video": None if video is None else video.cpu()}
