"""Typed configuration groups shared by every training module and command.

Each group is a frozen dataclass; LightningCLI and ``sfvideo generate`` expose its fields as nested keys
(``--model.init_args.schedule.shift 5``, YAML ``schedule: {shift: 5.0}``) and print the attribute docstrings in
``--help``. ``__post_init__`` validates a group, and jsonargparse builds the dataclass while parsing, so a bad value
is rejected at parse time. A default is stated once, here (the step list ``[1000, 750, 500, 250]`` in
:class:`StepSchedule`, the shift in ``FlowMatchSchedule``); a recipe states only what differs.

Groups:

- :class:`StepSchedule`: the few-step generator's step list on Wan's shifted flow-matching grid.
- :class:`RolloutConfig`: the Self Forcing rollout (exit steps, context noise, window, gradient through the cache).
- :class:`DMDConfig`: the DMD and critic losses (teacher guidance, timestep range).
- :class:`EMAConfig`: the EMA of the trained network.
- :class:`OptimConfig` / :class:`CriticOptimConfig`: gradient clipping, accumulation, critic:generator ratio.
- :class:`ManyStepSampling`: many-step Euler sampling with classifier-free guidance (the teacher, ODE pairs).
- :class:`InferenceSettings`: how to sample a trained network; every checkpoint and export records it.

Links between groups and encoders (:func:`check_encoders`): ``geometry.channels`` must equal the codec's latent
channels and the network's ``in_channels``; the text encoder's width must equal the network's ``text_dim``. The
training modules check them when LightningCLI builds them (after parsing, before any network is built); the error
is one line naming both keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import NEGATIVE_PROMPT

__all__ = [
    "NEGATIVE_PROMPT",
    "CriticOptimConfig",
    "DMDConfig",
    "EMAConfig",
    "InferenceSettings",
    "ManyStepSampling",
    "OptimConfig",
    "RolloutConfig",
    "Sampler",
    "StepSchedule",
    "check_encoders",
    "parse_as",
]

CacheGradMode = Literal["truncate", "straight_through"]


@dataclass(frozen=True)
class StepSchedule(FlowMatchSchedule):
    """The few-step generator's schedule: Wan's shifted flow-matching grid (``num_train_timesteps``, ``shift``)
    and the step list the generator denoises along."""

    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """Timesteps of the few-step generator before warping (the official ``denoising_step_list``), decreasing."""
    warp_denoising_steps: bool = True
    """Map the list through the shifted grid (1000, 937.5, 833.3, 625 for shift 5), as Self Forcing does; False
    takes ``step / N`` (CausVid)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = list(self.denoising_steps)
        if not steps or sorted(steps, reverse=True) != steps:
            raise ValueError(f"schedule.denoising_steps must be a non-empty decreasing list, got {steps}")
        n = self.num_train_timesteps
        if any(int(s) != s or not 0 <= s <= n for s in steps):
            raise ValueError(f"schedule.denoising_steps must be integers in [0, {n}], got {steps}")

    def generator_sigmas(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The generator's step sigmas ``(S,)`` (``FlowMatchSchedule.step_sigmas`` of the list)."""
        return self.step_sigmas(self.denoising_steps, warp=self.warp_denoising_steps, dtype=dtype)


@dataclass(frozen=True)
class RolloutConfig:
    """The Self Forcing rollout (Algorithm 1; notes §3.2-§3.6)."""

    context_noise: float = 0.0
    """Timestep (0-1000 scale) of the noise added to a chunk before it is written to the KV cache (0 = clean)."""
    same_exit_across_chunks: bool = True
    """One exit step for all chunks (the official default) or one per chunk."""
    last_step_only: bool = False
    """Always exit at the last step."""
    rollout_frames: int | None = None
    """Latent frames per training rollout (>= geometry.num_frames); when longer, gradient and loss cover only the
    last ``geometry.num_frames`` frames (notes §3.5). Unset: geometry.num_frames."""
    window_frames: int | None = None
    """Attention window of the generator during the rollout (the paper's trick: the last chunk cannot see the
    first); unset = global attention. Recorded as the default window for inference."""
    cache_grad_mode: CacheGradMode = "truncate"
    """``truncate`` (cached K/V carry no gradient into earlier chunks) or ``straight_through`` (the official
    code's behaviour, notes §3.6)."""

    def __post_init__(self) -> None:
        if self.context_noise < 0:
            raise ValueError(f"rollout.context_noise must be >= 0, got {self.context_noise}")
        for name in ("rollout_frames", "window_frames"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"rollout.{name} must be positive, got {value}")


@dataclass(frozen=True)
class DMDConfig:
    """Distribution Matching Distillation and its critic (DMD eq. 7-8; notes §4.1-§4.2)."""

    guidance_scale: float = 3.0
    """Teacher guidance, official convention ``cond + g (cond - uncond)`` (3 = CFG 4)."""
    min_timestep: int = 20
    """Lower clamp of the DMD / critic timestep (0-1000 scale)."""
    max_timestep: int = 980
    """Upper clamp of the DMD / critic timestep (0-1000 scale)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"dmd.min_timestep/dmd.max_timestep must satisfy 0 <= min < max <= 1000, got {self.min_timestep}, "
                f"{self.max_timestep}"
            )


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the trained network (``sfvideo.training.ema.ShardedEMA``)."""

    decay: float = 0.99
    """Decay per update, in [0, 1); 0 disables the EMA."""
    start_step: int = 200
    """Update (the module's step counter) at which the EMA starts as a copy of the weights."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.start_step < 0:
            raise ValueError(f"ema.start_step must be >= 0, got {self.start_step}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation of each trainable network (the optimizers themselves are ``*_optimizer`` class arguments)."""

    grad_clip: float = 10.0
    """Max total gradient norm of each network (10 officially); 0 disables. DeepSpeed engines clip with it."""
    accumulate_micro_batches: int = 1
    """Gradient accumulation: each update averages this many micro-batches of the data module's batch (the batch
    is split into equal parts)."""

    def __post_init__(self) -> None:
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if self.accumulate_micro_batches < 1:
            raise ValueError(f"optim.accumulate_micro_batches must be >= 1, got {self.accumulate_micro_batches}")


@dataclass(frozen=True)
class CriticOptimConfig(OptimConfig):
    """:class:`OptimConfig` of a generator trained against a critic (DMD, and later SiD and GAN)."""

    critic_updates_per_generator_update: int = 5
    """N critic updates per generator update (5 officially)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.critic_updates_per_generator_update
        if ratio < 1:
            raise ValueError(f"optim.critic_updates_per_generator_update must be >= 1, got {ratio}")


Guidance = Literal["official", "standard"]
Solver = Literal["euler", "unipc"]


@dataclass(frozen=True)
class ManyStepSampling:
    """Many-step sampling with classifier-free guidance: the bidirectional teacher's Euler ODE
    (``sfvideo.diffusion.sampling.euler_sample``, also the ODE pairs) and the causal TF/DF models' chunk-by-chunk
    sampler (``sfvideo.diffusion.causal_sampling.causal_cfg_sample``)."""

    num_steps: int = 30
    """Euler steps from noise to the sample."""
    shift: float = FlowMatchSchedule.shift
    """Shift of the sampling grid."""
    guidance_scale: float = 3.0
    """CFG scale, in the ``guidance`` convention."""
    guidance: Guidance = "official"
    """``official``: ``cond + g (cond - uncond)`` (0 = none); ``standard``: ``uncond + g (cond - uncond)``
    (1 = none, Wan's and the ODE-pair script's)."""
    solver: Solver = "euler"
    """Solver of the ``causal_cfg`` sampler: ``euler`` (on ``shift(linspace(1, 0, n + 1))``) or ``unipc`` (Wan's
    ``FlowUniPCMultistepScheduler`` grid, order 2; official ``pipeline/causal_diffusion_inference.py``). The
    bidirectional sampler and the ODE pairs are Euler only (they refuse ``unipc``)."""

    def __post_init__(self) -> None:
        if self.num_steps <= 0:
            raise ValueError(f"sampling.num_steps must be positive, got {self.num_steps}")
        if self.solver not in ("euler", "unipc"):
            raise ValueError(f"sampling.solver must be 'euler' or 'unipc', got {self.solver!r}")
        FlowMatchSchedule(shift=self.shift)  # validates the shift

    @property
    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(shift=self.shift)


Sampler = Literal["few_step", "euler", "causal_cfg"]
"""How a network is sampled: ``few_step`` (the causal generator's KV-cached few-step rollout), ``euler`` (a
bidirectional model: many-step Euler with CFG over the whole clip), ``causal_cfg`` (a many-step causal model,
diffusion or teacher forcing: chunk by chunk with CFG on two KV caches)."""


@dataclass(frozen=True)
class InferenceSettings:
    """How to sample a trained network; every checkpoint and export records it (``sfvideo.checkpoints``), so
    ``sfvideo generate <path>`` needs nothing else."""

    geometry: VideoGeometry = field(default_factory=VideoGeometry)
    """Latent clip shape and chunking of training."""
    sampler: Sampler = "few_step"
    """The sampler (see :data:`Sampler`)."""
    schedule: StepSchedule = field(default_factory=StepSchedule)
    """Step list of the ``few_step`` sampler."""
    sampling: ManyStepSampling = field(default_factory=ManyStepSampling)
    """Steps and guidance of the ``euler`` and ``causal_cfg`` samplers."""
    context_noise: float = 0.0
    """Timestep of the noise of the KV-cache refresh (0 = clean context)."""
    window_frames: int | None = None
    """Attention window of training (the default rolling window of inference); None = global."""
    cache_grad_mode: CacheGradMode = "truncate"
    """Gradient mode of the training rollout's cache (inference caches hold no gradient)."""
    negative_prompt: str = NEGATIVE_PROMPT
    """Prompt of the unconditional branch of classifier-free guidance."""

    def to_dict(self) -> dict[str, Any]:
        """JSON data (read back with ``parse_as(InferenceSettings, data)``)."""
        return _lists(asdict(self))


def _lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def parse_as(type_: Any, value: Any) -> Any:
    """Build ``value`` (JSON data: a dataclass's fields, or ``{"class_path", "init_args"}``) as ``type_`` with
    jsonargparse, the parser of every config; types are checked and ``__post_init__`` validation runs."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=type_)
    return parser.instantiate(parser.parse_object({"value": value})).value


def check_encoders(
    *,
    geometry: VideoGeometry,
    network: Mapping[str, Any] | None = None,
    text_encoder: Any = None,
    codec: Any = None,
    keys: Mapping[str, str] | None = None,
) -> None:
    """Raise a one-line ``ValueError`` naming both keys when the pieces of a run do not fit together.

    Args:
        geometry: The latent geometry (``keys["geometry"]``).
        network: A transformer config (constructor arguments; ``keys["network"]``), if known.
        text_encoder: An object with ``dim`` (``keys["text_encoder"]``), if any.
        codec: An object with ``latent_channels`` (``keys["codec"]``), if any.
        keys: Names of the pieces in the user's terms (config keys or flags); defaults are bare names.
    """
    k = {"geometry": "geometry", "network": "network", "text_encoder": "text_encoder", "codec": "codec", **(keys or {})}
    latent = getattr(codec, "latent_channels", None)
    if latent is not None and latent != geometry.channels:
        raise ValueError(
            f"{k['geometry']}.channels={geometry.channels} differs from the latent channels of {k['codec']} "
            f"({type(codec).__name__}: {latent})"
        )
    if network is None:
        return
    channels = network.get("in_channels")
    if channels is not None and channels != geometry.channels:
        raise ValueError(
            f"{k['geometry']}.channels={geometry.channels} differs from in_channels={channels} of {k['network']}"
        )
    width, text_dim = getattr(text_encoder, "dim", None), network.get("text_dim")
    if width is not None and text_dim is not None and width != text_dim:
        raise ValueError(
            f"{k['text_encoder']} gives {width}-dim embeddings ({type(text_encoder).__name__}) but {k['network']} "
            f"expects text_dim={text_dim}"
        )
