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
- :class:`SiDConfig`: Score identity Distillation (alpha, the teacher's activation checkpointing).
- :class:`DiscriminatorConfig`: the SF-GAN discriminator head, its optimizer group and warm-up.
- :class:`EMAConfig`: the EMA of the trained network.
- :class:`OptimConfig` / :class:`CriticOptimConfig`: gradient clipping, accumulation, critic:generator ratio, the
  effective batch a recipe was tuned for.
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
    "DiscriminatorConfig",
    "EMAConfig",
    "InferenceSettings",
    "ManyStepSampling",
    "OptimConfig",
    "RolloutConfig",
    "Sampler",
    "SiDConfig",
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
    """Longest training rollout in latent frames (official ``num_training_frames``; >= geometry.num_frames, whole
    chunks). Each rollout draws its length uniformly in whole chunks from [geometry.num_frames, rollout_frames]
    (shared by all ranks); the teacher and critic see the last geometry.num_frames latents with the first one
    re-encoded through the codec as a first-frame latent, and when the length is not the minimum the first chunk
    of that window is left out of the loss (notes §3.5, official ``model/base.py::_run_generator``). Needs a
    codec. Unset: geometry.num_frames (the released recipe)."""
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
        if self.guidance_scale < 0:
            raise ValueError(f"dmd.guidance_scale must be >= 0 (0 = no guidance), got {self.guidance_scale}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"dmd.min_timestep/dmd.max_timestep must satisfy 0 <= min < max <= 1000, got {self.min_timestep}, "
                f"{self.max_timestep}"
            )


@dataclass(frozen=True)
class SiDConfig:
    """Score identity Distillation (Zhou et al. 2024; notes §4.3, official ``model/sid.py``). Guidance and the
    timestep range are the ``dmd`` group's (the official SiD shares them)."""

    alpha: float = 1.0
    """SiD's alpha (official ``sid_alpha``): ``L = (r - f) ((r - x) - alpha (r - f)) / n``."""
    teacher_gradient_checkpointing: bool | None = None
    """Activation checkpointing per block of the teacher, which SiD runs with gradient (official: on with
    ``gradient_checkpointing``). Unset: the module's ``gradient_checkpointing``."""


OFFICIAL_FEATURE_BLOCKS: tuple[int, ...] = (13, 21, 29)
"""Critic blocks the official SF-GAN head reads (``wan/modules/model.py``, ``WanModel._forward(classify_mode)``),
for the 30-block Wan2.1-T2V-1.3B critic (:data:`OFFICIAL_FEATURE_DEPTH`)."""
OFFICIAL_FEATURE_DEPTH = 30
"""Depth of the critic :data:`OFFICIAL_FEATURE_BLOCKS` belong to."""


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The SF-GAN discriminator: a register-token head on the critic's block features (``nn.discriminator``), its
    group in the critic optimizer, its warm-up and the noise levels it sees (notes §4.4; official
    ``utils/wan_wrapper.py::adding_cls_branch``, ``model/gan.py``, ``trainer/gan.py``)."""

    feature_blocks: tuple[int, ...] | None = None
    """Critic blocks whose hidden states the head reads, one register token each. Unset: the official 1.3B blocks
    (13, 21, 29) of 30 scaled to the critic's depth L as ``floor((b + 1) L / 30) - 1`` (exactly (13, 21, 29) for
    L = 30; (0, 1, 2) for 3 blocks), duplicates dropped."""
    ffn_dim: int | None = None
    """FFN width of the head's register blocks. Unset: the critic's own ``ffn_dim``; the official 1.3B head has 8192
    (the 1.3B transformer's is 8960), which the full-scale config states."""
    num_classes: int = 1
    """Logits per sample (official ``num_class``); the losses average over them."""
    concat_time_embedding: bool = False
    """Append 10x the critic's time embedding as one more token (official ``concat_time_embeddings``, off)."""
    lr_multiplier: float = 1.0
    """Learning rate of the head's parameter group = the critic optimizer's lr times this (official
    ``discriminator_lr_multiplier``, 1.0 in ``default_config.yaml``)."""
    warmup_steps: int = 0
    """Trainer iterations that train the head alone (critic trunk frozen, no generator update, critic optimizer
    betas (0.9, beta2)); at the end the critic optimizer restarts with its own betas and fresh state (official
    ``discriminator_warmup_steps``, 0)."""
    min_timestep: int = 20
    """Lower clamp of the discriminator's noise level, 0-1000 scale (official ``min_step`` = 0.02 N)."""
    max_timestep: int = 980
    """Upper clamp of the discriminator's noise level (official ``max_step`` = 0.98 N)."""

    def __post_init__(self) -> None:
        if self.feature_blocks is not None and (
            not self.feature_blocks or any(b < 0 for b in self.feature_blocks)
            or len(set(self.feature_blocks)) != len(self.feature_blocks)
        ):
            raise ValueError(f"discriminator.feature_blocks must be distinct block indices >= 0, got "
                             f"{self.feature_blocks}")  # fmt: skip
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"discriminator.ffn_dim must be positive, got {self.ffn_dim}")
        if self.num_classes < 1:
            raise ValueError(f"discriminator.num_classes must be >= 1, got {self.num_classes}")
        if self.lr_multiplier <= 0:
            raise ValueError(f"discriminator.lr_multiplier must be positive, got {self.lr_multiplier}")
        if self.warmup_steps < 0:
            raise ValueError(f"discriminator.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"discriminator.min_timestep/max_timestep must satisfy 0 <= min < max <= 1000, got "
                f"{self.min_timestep}, {self.max_timestep}"
            )

    def blocks_for(self, num_layers: int) -> tuple[int, ...]:
        """The feature blocks of a critic with ``num_layers`` blocks (see :attr:`feature_blocks`)."""
        if self.feature_blocks is not None:
            bad = [b for b in self.feature_blocks if b >= num_layers]
            if bad:
                raise ValueError(f"discriminator.feature_blocks {self.feature_blocks} outside the critic's "
                                 f"{num_layers} blocks")  # fmt: skip
            return tuple(self.feature_blocks)
        scaled = [max(0, (b + 1) * num_layers // OFFICIAL_FEATURE_DEPTH - 1) for b in OFFICIAL_FEATURE_BLOCKS]
        return tuple(dict.fromkeys(scaled))


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the trained network (``sfvideo.training.ema.ShardedEMA``)."""

    decay: float = 0.99
    """Decay per update, in [0, 1); 0 disables the EMA."""
    start_step: int = 200
    """Trainer iteration (one per training batch) from which the EMA exists: it is created then as a copy of the
    current weights and updated after every later update of the network. Distillation modules count iterations as
    the official ``trainer/distillation.py`` ``step`` does: one per critic update, with a generator update every
    ``optim.critic_updates_per_generator_update``-th, so the official 200 is after 40 generator updates at 5:1;
    single-network modules count their updates. 0 = from the initial (loaded) weights."""

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
    recipe_effective_batch: int | None = None
    """Effective batch the recipe was tuned for: devices x nodes x micro-batch x accumulate_micro_batches (= devices
    x nodes x the data module's per-rank batch). A run with another effective batch warns when training starts
    (the run's value is printed and logged as ``batch/effective`` either way). The paper's recipes: 64 (1 per GPU
    on 64 GPUs). Unset: no check."""

    def __post_init__(self) -> None:
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if self.accumulate_micro_batches < 1:
            raise ValueError(f"optim.accumulate_micro_batches must be >= 1, got {self.accumulate_micro_batches}")
        if self.recipe_effective_batch is not None and self.recipe_effective_batch < 1:
            raise ValueError(f"optim.recipe_effective_batch must be >= 1, got {self.recipe_effective_batch}")


@dataclass(frozen=True)
class CriticOptimConfig(OptimConfig):
    """:class:`OptimConfig` of a generator trained against a critic (DMD, SiD, GAN)."""

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
        if self.guidance_scale < 0:
            raise ValueError(f"sampling.guidance_scale must be >= 0, got {self.guidance_scale}")
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
