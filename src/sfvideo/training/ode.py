"""ODE initialisation of the causal generator (CausVid, Yin et al. 2025; Self Forcing's ``ode_init.pt``; notes §5).

Before Self Forcing, the causal few-step generator is regressed onto the bidirectional teacher's deterministic
ODE trajectories, so it learns causality and few-step denoising before DMD:

1. Trajectories: for a prompt, the teacher runs a many-step flow-matching Euler ODE (``ode_steps`` at
   ``ode_shift``, CFG ``ode_guidance_scale``) from Gaussian noise; the states at the generator's step sigmas
   ``sigma_0 > ... > sigma_{S-1}`` and the final sample ``x_final`` are kept: ``(B, S + 1, F, C, H, W)``.
   The official pairs (48 steps, shift 8, standard CFG 6, states [0, 12, 24, 36, final]) are exactly the
   generator's ``[1000, 750, 500, 250]`` warped at shift 8; other settings refine the sampling grid so the states
   land exactly on the step sigmas (``sfvideo.diffusion.sampling.ode_sigmas``).
2. Regression: per sample and chunk a random index ``k`` in ``[0, S)`` (one per chunk, diffusion-forcing style);
   every frame of the chunk takes the state ``k`` and the timestep ``N sigma_k``; one block-causal forward (no KV
   cache) predicts x0; loss = MSE(x0_pred, x_final) over frames with ``sigma_k != 0``.

Trajectories are generated on the fly with the frozen teacher (no LMDB), optionally reused for
``reuse_trajectories`` consecutive steps (they cost ``ode_steps`` guided teacher forwards each), or read from a
file written by :func:`generate_ode_pairs` (then the teacher is only the generator's initial weights).

Randomness: trajectory noise and chunk indices come from generators seeded with ``(seed, purpose, step, rank)``;
the chunk indices need no agreement across ranks (every rank runs the same single forward whatever they are).
Known limitation (notes §5): a bidirectional teacher's ODE is not causal; Causal Forcing argues for a causal
teacher. This module accepts any teacher source, including an AR-diffusion one trained by ``training/diffusion.py``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import Guidance, euler_sample, ode_sigmas
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry, check_chunking
from sfvideo.nn.interfaces import TextEncoder
from sfvideo.seeding import mix_seed
from sfvideo.training.networks import PromptConditioning, build_transformer, compute_dtype, freeze, network_configs
from sfvideo.training.optim import ODEAdamW
from sfvideo.training.strategies import clip_gradients, network

WAN_NEGATIVE_PROMPT = ""
"""Default negative prompt (the unconditional branch of the teacher's CFG); same default as ``SelfForcingDMD``."""

ODE_PAIRS_FORMAT = "sfvideo-ode-pairs/1"
"""Value of the ``format`` key of a trajectories file."""


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces: trajectories, chunk indices, the regression loss
# ----------------------------------------------------------------------------------------------------------------


def record_sigmas_for(step_sigmas: Tensor) -> Tensor:
    """Sigmas of the kept states ``(S + 1,)`` float64: the generator's step sigmas, then 0 (the final sample)."""
    s = step_sigmas.detach().to("cpu", torch.float64).flatten()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def ode_trajectories(
    teacher: Denoiser,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    *,
    step_sigmas: Tensor,
    schedule: FlowMatchSchedule,
    num_steps: int,
    guidance_scale: float,
    guidance: Guidance = "standard",
) -> Tensor:
    """Teacher ODE trajectories at the generator's step sigmas ``(B, S + 1, F, C, H, W)``, the last entry final.

    Args:
        teacher: Bidirectional teacher denoiser.
        noise: Initial Gaussian noise ``(B, F, C, H, W)`` at sigma 1.
        cond: Prompt embeddings ``(B, L, D)``.
        uncond: Negative-prompt embeddings ``(1 or B, L, D)`` (None without guidance).
        step_sigmas: The generator's step sigmas ``(S,)``, descending, first = 1 (warped or not).
        schedule: Shift of the many-step grid (``ode_shift``).
        num_steps: Euler steps of the base grid; the step sigmas not on it are inserted.
        guidance_scale / guidance: CFG (see :func:`sfvideo.diffusion.sampling.euler_sample`).
    """
    record = record_sigmas_for(step_sigmas)
    if abs(float(record[0]) - 1.0) > 1e-6:
        raise ValueError(f"step_sigmas must start at 1 (pure noise) for ODE pairs, got {record[:-1].tolist()}")
    grid = ode_sigmas(schedule, num_steps, include=record)
    result = euler_sample(
        teacher,
        noise,
        cond,
        sigmas=grid,
        uncond=uncond,
        guidance_scale=guidance_scale,
        guidance=guidance,
        record_sigmas=record,
        model_kwargs={"attention": "bidirectional"},
    )
    assert result.trajectory is not None
    return result.trajectory


def sample_chunk_indices(
    batch: int,
    num_frames: int,
    frames_per_chunk: int,
    num_steps: int,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random step index per sample and chunk, repeated over the chunk's frames: ``(B, F)`` long in ``[0, S)``."""
    check_chunking(num_frames, frames_per_chunk)
    gen_device = generator.device if generator is not None else (device or "cpu")
    idx = torch.randint(0, num_steps, (batch, num_frames // frames_per_chunk), generator=generator, device=gen_device)
    return idx.repeat_interleave(frames_per_chunk, dim=1).to(device if device is not None else gen_device)


def ode_regression_loss(
    generator: Denoiser,
    trajectory: Tensor,
    step_sigmas: Tensor,
    index: Tensor,
    context: Tensor,
    *,
    frames_per_chunk: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CausVid ODE regression: ``MSE(G(x_k, sigma_k), x_final)`` over frames with ``sigma_k != 0``.

    Args:
        generator: The causal generator's denoiser (called with ``attention="block_causal"``).
        trajectory: ``(B, S + 1, F, C, H, W)``: states at ``step_sigmas``, then the final clean latent.
        step_sigmas: ``(S,)`` sigmas of the states (the generator's step list).
        index: ``(B, F)`` long in ``[0, S)``: which state each frame takes (constant within a chunk).
        context: Prompt embeddings ``(B, L, D)``.
        frames_per_chunk: Chunk size of the block-causal mask.

    Returns:
        ``(loss, logs)``; logs hold ``x0_mse_step{k}``, the mean MSE of the frames at step ``k`` (for those present).
    """
    b, s1, f = trajectory.shape[:3]
    s = step_sigmas.numel()
    if s1 != s + 1:
        raise ValueError(f"trajectory holds {s1} states, expected len(step_sigmas) + 1 = {s + 1}")
    if index.shape != (b, f):
        raise ValueError(f"index has shape {tuple(index.shape)}, expected (B, F) = {(b, f)}")
    target = trajectory[:, -1]
    gather = index.view(b, 1, f, 1, 1, 1).expand(b, 1, *trajectory.shape[2:])
    x_in = trajectory.gather(1, gather).squeeze(1)  # (B, F, C, H, W): frame f at state index[b, f]
    sigma = step_sigmas.to(torch.float32).to(trajectory.device)[index]  # (B, F)
    x0_pred = generator(x_in, sigma, context, attention="block_causal", frames_per_chunk=frames_per_chunk)
    per_frame = (x0_pred.float() - target.float()).square().mean(dim=(2, 3, 4))  # (B, F)
    # Clean-context frames (sigma 0: a step list ending in 0, or I2V's first frame) carry no loss (notes §5).
    mask = (sigma != 0).to(per_frame.dtype)
    loss = (per_frame * mask).sum() / mask.sum().clamp_min(1.0)
    logs: dict[str, Tensor] = {}
    with torch.no_grad():
        for k in range(s):
            sel = index == k
            if bool(sel.any()):
                logs[f"x0_mse_step{k}"] = per_frame.detach()[sel].mean()
    return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# Trajectory files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ODEPairs:
    """Trajectories read from a file written by :func:`generate_ode_pairs`."""

    prompts: list[str]
    trajectories: Tensor
    """``(N, S + 1, F, C, H, W)``; row ``i`` belongs to ``prompts[i]``."""
    sigmas: Tensor
    """``(S + 1,)`` float64 sigmas of the states (the last is 0)."""
    meta: dict[str, Any]

    def rows_by_prompt(self) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            rows.setdefault(p, []).append(i)
        return rows


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the target folder, then rename (no half-written file on a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@torch.no_grad()
def generate_ode_pairs(
    teacher: nn.Module,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    path: str | os.PathLike,
    *,
    geometry: VideoGeometry,
    step_sigmas: Tensor,
    ode_steps: int = 48,
    ode_shift: float = 8.0,
    guidance_scale: float = 6.0,
    guidance: Guidance = "standard",
    negative_prompt: str = WAN_NEGATIVE_PROMPT,
    batch_size: int = 1,
    seed: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Path:
    """Generate teacher ODE trajectories for ``prompts`` and save them (atomically) to ``path`` for :class:`ODEInit`.

    The noise of prompt ``i`` comes from a CPU generator seeded with ``(seed, i)``, so the file does not depend on
    ``batch_size`` or the device; to shard a prompt list across processes give each a slice, its own path and its
    own ``seed`` (the noise index restarts at 0 in every call).

    File layout (``torch.save``; ``torch.load(weights_only=True)`` reads it): ``format`` = ``ODE_PAIRS_FORMAT``,
    ``prompts`` (list of N str), ``trajectories`` ``(N, S + 1, F, C, H, W)`` in ``storage_dtype`` (the official
    LMDB used float16), ``sigmas`` ``(S + 1,)`` float64, ``geometry`` (dict), ``ode`` (steps, shift, guidance).

    Args:
        teacher: Bidirectional teacher network (``WanTransformer.forward`` signature).
        text_encoder: Prompt encoder.
        prompts: Prompts, one trajectory each.
        path: Output file.
        geometry: Latent clip shape.
        step_sigmas: The generator's step sigmas ``(S,)`` (``FlowMatchSchedule.step_sigmas``).
        ode_steps / ode_shift: Base Euler grid (48 steps at shift 8 officially).
        guidance_scale / guidance: CFG (standard 6 officially).
        negative_prompt: The unconditional prompt.
        batch_size: Prompts per teacher batch.
        seed: Noise seed.
        storage_dtype: Dtype of the saved states.
        device: Where the teacher runs (default: its parameters' device).
    """
    if not prompts:
        raise ValueError("generate_ode_pairs: prompts is empty")
    if batch_size <= 0:
        raise ValueError(f"generate_ode_pairs: batch_size must be positive, got {batch_size}")
    param = next(teacher.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    denoiser = Denoiser(teacher)
    schedule = FlowMatchSchedule(shift=ode_shift)
    unguided = guidance_scale == (1.0 if guidance == "standard" else 0.0)
    uncond = None if unguided else text_encoder.encode([negative_prompt]).to(device, dtype)
    shape = geometry.latent_shape(1)[1:]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        # One CPU generator per prompt index: the file is independent of batch size and device.
        gens = [torch.Generator().manual_seed(mix_seed(seed, start + i)) for i in range(len(batch))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
        cond = text_encoder.encode(batch).to(device, dtype)
        traj = ode_trajectories(
            denoiser, noise, cond, uncond, step_sigmas=step_sigmas, schedule=schedule, num_steps=ode_steps,
            guidance_scale=guidance_scale, guidance=guidance,
        )  # fmt: skip
        chunks.append(traj.to("cpu", storage_dtype))
    out = Path(path)
    _atomic_save(
        {
            "format": ODE_PAIRS_FORMAT,
            "prompts": list(prompts),
            "trajectories": torch.cat(chunks),
            "sigmas": record_sigmas_for(step_sigmas),
            "geometry": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(geometry).items()},
            "ode": {"steps": ode_steps, "shift": ode_shift, "guidance_scale": guidance_scale, "guidance": guidance,
                    "negative_prompt": negative_prompt, "seed": seed},
        },
        out,
    )  # fmt: skip
    return out


def load_ode_pairs(path: str | os.PathLike) -> ODEPairs:
    """Read a trajectories file of :func:`generate_ode_pairs` (one-line errors name the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ODE trajectories file not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != ODE_PAIRS_FORMAT:
        raise ValueError(f"{path}: not an sfvideo ODE-pairs file (expected format {ODE_PAIRS_FORMAT!r})")
    for key in ("prompts", "trajectories", "sigmas"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    traj, sigmas, prompts = data["trajectories"], data["sigmas"], list(data["prompts"])
    if traj.ndim != 6 or traj.shape[0] != len(prompts) or traj.shape[1] != sigmas.numel():
        raise ValueError(
            f"{path}: trajectories of shape {tuple(traj.shape)} do not match {len(prompts)} prompts and "
            f"{sigmas.numel()} sigmas"
        )
    meta = {k: v for k, v in data.items() if k not in ("prompts", "trajectories", "sigmas")}
    return ODEPairs(prompts=prompts, trajectories=traj, sigmas=sigmas.to(torch.float64), meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrajectoryBatch:
    """A generated (or looked-up) batch of trajectories and its prompt embeddings."""

    trajectory: Tensor
    """``(B, S + 1, F, C, H, W)``."""
    cond: Tensor
    """``(B, L, D)``."""
    step: int
    """Generator step at which it was made."""


class ODEInit(PromptConditioning, L.LightningModule):
    """ODE regression of the causal generator onto the teacher's trajectories (CausVid / Self Forcing ODE init).

    Args:
        teacher: the bidirectional teacher: a flavor name (random weights, for tests), a diffusers folder, an
            original Wan2.1 file or a bundled asset name (see ``training.networks.build_transformer``).
        teacher_overrides: config overrides applied to a flavor.
        generator_init: weights the causal generator starts from; unset = the teacher's weights.
        geometry: latent clip shape and chunking (``frames_per_chunk`` is the block-causal chunk).
        text_encoder: frozen prompt encoder; unset = the toy world's.
        negative_prompt: prompt of the teacher's unconditional branch.
        denoising_steps: the generator's few-step list before warping; the states kept per trajectory.
        warp_denoising_steps: map the list through the shifted grid (``FlowMatchSchedule.warp``).
        shift: shift of the generator's step list. 8 reproduces the official pairs (states [0, 12, 24, 36] of 48
            steps at shift 8 = [1000, 750, 500, 250] warped at shift 8, notes §5); set 5 to train on the exact
            timesteps the Self Forcing stage uses.
        ode_steps: Euler steps of the teacher's trajectory grid (48 officially; step sigmas off the grid are
            inserted, each costing one more teacher call).
        ode_shift: shift of the teacher's trajectory grid (8 officially).
        ode_guidance_scale: teacher CFG scale in the ``ode_guidance`` convention (standard 6 officially).
        ode_guidance: ``standard`` (``uncond + g (cond - uncond)``, the ODE-pair script) or ``official``
            (``cond + g (cond - uncond)``, the DMD teacher's).
        trajectories: file of precomputed trajectories (:func:`generate_ode_pairs`); every batch prompt must be
            in it. Unset = generate on the fly with the teacher.
        reuse_trajectories: training steps that reuse one generated batch (with fresh chunk indices); the batch
            prompts of the steps in between are ignored. Generation costs ``ode_steps`` guided teacher forwards.
        optimizer: optimizer factory of the generator (default AdamW lr 2e-6, betas (0.9, 0.999)).
        grad_clip: max gradient norm (10 officially); 0 disables.
        gradient_checkpointing: activation checkpointing per transformer block of the generator.
        teacher_dtype: precision the frozen teacher is held in.
        seed: seed of the random initialisation (flavors), the trajectory noise and the chunk indices.
    """

    engine_modules = ("generator",)

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
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        denoising_steps: list[int] = [1000, 750, 500, 250],
        warp_denoising_steps: bool = True,
        shift: float = 8.0,
        ode_steps: int = 48,
        ode_shift: float = 8.0,
        ode_guidance_scale: float = 6.0,
        ode_guidance: Literal["standard", "official"] = "standard",
        trajectories: str | None = None,
        reuse_trajectories: int = 1,
        optimizer: OptimizerCallable = ODEAdamW,
        grad_clip: float = 10.0,
        gradient_checkpointing: bool = False,
        teacher_dtype: Literal["float32", "bfloat16"] = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder", "optimizer"])
        if not denoising_steps or sorted(denoising_steps, reverse=True) != list(denoising_steps):
            raise ValueError(f"--model.denoising_steps must be a non-empty decreasing list, got {denoising_steps}")
        if ode_steps <= 0:
            raise ValueError(f"--model.ode_steps must be positive, got {ode_steps}")
        if reuse_trajectories < 1:
            raise ValueError(f"--model.reuse_trajectories must be >= 1, got {reuse_trajectories}")
        if ode_guidance not in ("standard", "official"):
            raise ValueError(f"--model.ode_guidance must be 'standard' or 'official', got {ode_guidance!r}")
        self.automatic_optimization = False
        # The frozen teacher is not part of the training state: checkpoints hold the generator only.
        self.strict_loading = False
        self.geometry = geometry
        self.schedule = FlowMatchSchedule(shift=shift)
        self.ode_schedule = FlowMatchSchedule(shift=ode_shift)
        # float64, so the kept states match the many-step grid points exactly (timesteps are fp32 at the model).
        self.step_sigmas = self.schedule.step_sigmas(denoising_steps, warp=warp_denoising_steps, dtype=torch.float64)
        if abs(float(self.step_sigmas[0]) - 1.0) > 1e-6:
            raise ValueError(f"--model.denoising_steps must start at {self.schedule.num_train_timesteps} (pure noise)")
        self.optimizer_factory = optimizer
        # Frozen encoders are not registered as submodules (not trained, not checkpointed).
        self.set_text_encoder(text_encoder)
        self.generator_steps = 0
        self.trajectory_cache: TrajectoryBatch | None = None
        self._pairs: ODEPairs | None = None
        self._pair_rows: dict[str, list[int]] | None = None

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if hasattr(self, "generator"):
            return
        h = self.hparams
        teacher = build_transformer(h.teacher, overrides=h.teacher_overrides, seed=h.seed)
        if h.generator_init:
            self.generator = build_transformer(h.generator_init)
        else:
            self.generator = copy.deepcopy(teacher)
        self.generator.train()
        if h.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
        if h.trajectories is None:
            if h.teacher_dtype == "bfloat16":
                teacher = teacher.to(torch.bfloat16)
            self.teacher = freeze(teacher)
        # With a trajectories file the teacher only supplied initial weights; it is dropped.

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.generator.parameters())

    def net(self, name: str) -> nn.Module:
        """The network to run forward through: the strategy's engine for it, or the plain module."""
        return network(self, name)

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.hparams.seed, *parts))

    def _generator_dtype(self) -> torch.dtype:
        return compute_dtype(self.generator)

    # ------------------------------------------------------------------ trajectories
    @torch.no_grad()
    def generate_trajectories(self, prompts: list[str]) -> TrajectoryBatch:
        """Teacher ODE trajectories for a prompt batch, noise seeded with ``(seed, step, rank)``."""
        h, geo = self.hparams, self.geometry
        cond, uncond = self.encode(prompts)
        teacher_dtype = compute_dtype(self.teacher)
        g = self._generator(0, self.generator_steps, self.global_rank)
        noise = torch.randn(geo.latent_shape(len(prompts)), generator=g, device=self.device, dtype=teacher_dtype)
        traj = ode_trajectories(
            Denoiser(self.net("teacher"), num_train_timesteps=self.schedule.num_train_timesteps),
            noise,
            cond.to(teacher_dtype),
            uncond.to(teacher_dtype),
            step_sigmas=self.step_sigmas,
            schedule=self.ode_schedule,
            num_steps=h.ode_steps,
            guidance_scale=h.ode_guidance_scale,
            guidance=h.ode_guidance,
        )
        return TrajectoryBatch(trajectory=traj.to(self._generator_dtype()), cond=cond, step=self.generator_steps)

    def pairs(self) -> ODEPairs:
        """The trajectories file, read once and checked against the step list and geometry."""
        if self._pairs is None:
            path = self.hparams.trajectories
            pairs = load_ode_pairs(path)
            want = record_sigmas_for(self.step_sigmas)
            if pairs.sigmas.shape != want.shape or not torch.allclose(pairs.sigmas, want, atol=1e-5, rtol=0):
                raise ValueError(
                    f"{path}: states at sigmas {pairs.sigmas.tolist()} differ from this run's step sigmas + 0 "
                    f"{want.tolist()} (check --model.denoising_steps/shift/warp_denoising_steps)"
                )
            clip = tuple(self.geometry.latent_shape(1)[1:])
            if tuple(pairs.trajectories.shape[2:]) != clip:
                got = tuple(pairs.trajectories.shape[2:])
                raise ValueError(f"{path}: latent clips {got} differ from the geometry's {clip}")
            self._pairs, self._pair_rows = pairs, pairs.rows_by_prompt()
        return self._pairs

    def lookup_trajectories(self, prompts: list[str]) -> TrajectoryBatch:
        """Precomputed trajectories of the batch prompts (one row per prompt, seeded choice among duplicates)."""
        pairs = self.pairs()
        assert self._pair_rows is not None
        g = torch.Generator().manual_seed(mix_seed(self.hparams.seed, 2, self.generator_steps, self.global_rank))
        rows = []
        for p in prompts:
            options = self._pair_rows.get(p)
            if options is None:
                raise KeyError(f"prompt {p!r} is not in the trajectories file {self.hparams.trajectories}")
            rows.append(options[int(torch.randint(len(options), (1,), generator=g))])
        traj = pairs.trajectories[rows].to(self.device, self._generator_dtype())
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
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> Tensor:
        h, geo = self.hparams, self.geometry
        opt = self.optimizers()
        data = self.trajectory_batch(list(batch["generator"]))
        index = sample_chunk_indices(
            data.trajectory.shape[0],
            geo.num_frames,
            geo.frames_per_chunk,
            len(self.step_sigmas),
            self._generator(1, self.generator_steps, self.global_rank),
            device=self.device,
        )
        loss, logs = ode_regression_loss(
            Denoiser(self.net("generator"), num_train_timesteps=self.schedule.num_train_timesteps),
            data.trajectory,
            self.step_sigmas,
            index,
            data.cond,
            frames_per_chunk=geo.frames_per_chunk,
        )
        self.manual_backward(loss)
        clip_gradients(self, opt, h.grad_clip)  # under DeepSpeed the engine clips inside opt.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.generator_steps += 1
        metrics = {f"train/{k}": v for k, v in logs.items()}
        metrics["train/loss"] = loss.detach()
        metrics["steps/generator"] = float(self.generator_steps)
        metrics["lr/generator"] = opt.param_groups[0]["lr"]
        self.log_dict(metrics, on_step=True, batch_size=1)
        self.log("train/loss_bar", loss.detach(), prog_bar=True, on_step=True, logger=False, batch_size=1)
        return loss.detach()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted before this step's checkpoint is written, so a resume starts at the next batch.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "count_consumed_batch"):
            dm.count_consumed_batch()

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        # Cached trajectories are not saved: a resumed run regenerates them at its first step.
        checkpoint["sfvideo"] = {
            "generator_steps": self.generator_steps,
            "configs": network_configs(self, ("generator",)),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generator_steps = int(checkpoint.get("sfvideo", {}).get("generator_steps", 0))

    def export_generator(self) -> nn.Module:
        """The trained causal generator (a ``WanTransformer``; save it with ``export_diffusers``)."""
        return self.generator
