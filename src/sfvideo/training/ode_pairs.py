"""Files of teacher ODE trajectories for ``ODEInit`` (the official LMDB of ODE pairs, as one torch file).

File layout (``torch.save``; ``torch.load(weights_only=True)`` reads it): ``format`` = :data:`ODE_PAIRS_FORMAT`,
``prompts`` (list of N str), ``trajectories`` ``(N, S + 1, F, C, H, W)`` in the storage dtype (the official LMDB
used float16), ``sigmas`` ``(S + 1,)`` float64, ``geometry`` (dict), ``ode`` (steps, shift, guidance).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sfvideo.config import ManyStepSampling
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import ode_trajectories, record_sigmas_for
from sfvideo.files import AtomicFile
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import NEGATIVE_PROMPT, TextEncoder
from sfvideo.seeding import mix_seed

__all__ = ["CAUSVID_ODE", "ODE_PAIRS_FORMAT", "ODEPairs", "generate_ode_pairs", "load_ode_pairs"]

ODE_PAIRS_FORMAT = "sfvideo-ode-pairs/1"
"""Value of the ``format`` key of a trajectories file."""

CAUSVID_ODE = ManyStepSampling(num_steps=48, shift=8.0, guidance_scale=6.0, guidance="standard")
"""The official ODE pairs: 48 Euler steps at shift 8, standard CFG 6; states [0, 12, 24, 36, final] are exactly
the generator's ``[1000, 750, 500, 250]`` warped at shift 8 (notes §5)."""


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


@torch.no_grad()
def generate_ode_pairs(
    teacher: nn.Module,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    path: str | os.PathLike,
    *,
    geometry: VideoGeometry,
    step_sigmas: Tensor,
    ode: ManyStepSampling = CAUSVID_ODE,
    negative_prompt: str = NEGATIVE_PROMPT,
    batch_size: int = 1,
    seed: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Path:
    """Generate teacher ODE trajectories for ``prompts`` and save them (atomically) to ``path`` for :class:`ODEInit`.

    The noise of prompt ``i`` comes from a CPU generator seeded with ``(seed, i)``, so the file does not depend on
    ``batch_size`` or the device; to shard a prompt list across processes give each a slice, its own path and its
    own ``seed`` (the noise index restarts at 0 in every call).

    Args:
        teacher: Bidirectional teacher network (``WanTransformer.forward`` signature).
        text_encoder: Prompt encoder.
        prompts: Prompts, one trajectory each.
        path: Output file.
        geometry: Latent clip shape.
        step_sigmas: The generator's step sigmas ``(S,)`` (``FlowMatchSchedule.step_sigmas``).
        ode: The teacher's Euler grid and CFG (:data:`CAUSVID_ODE` officially); step sigmas off the grid are
            inserted.
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
    unguided = ode.guidance_scale == (1.0 if ode.guidance == "standard" else 0.0)
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
            denoiser, noise, cond, uncond, step_sigmas=step_sigmas, schedule=ode.schedule, num_steps=ode.num_steps,
            guidance_scale=ode.guidance_scale, guidance=ode.guidance,
        )  # fmt: skip
        chunks.append(traj.to("cpu", storage_dtype))
    out = Path(path)
    payload = {
        "format": ODE_PAIRS_FORMAT,
        "prompts": list(prompts),
        "trajectories": torch.cat(chunks),
        "sigmas": record_sigmas_for(step_sigmas),
        "geometry": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(geometry).items()},
        "ode": {"steps": ode.num_steps, "shift": ode.shift, "guidance_scale": ode.guidance_scale,
                "guidance": ode.guidance, "negative_prompt": negative_prompt, "seed": seed},
    }
    with AtomicFile(out, make_parents=True) as tmp:
        torch.save(payload, tmp)
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
