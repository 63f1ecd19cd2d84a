"""Files of teacher ODE trajectories (the official LMDB of ODE pairs, as torch files), for ``ODEInit`` and, through
:class:`ODEPairsDataModule`, as the clean latents of the many-step TF/DF baselines.

The official recipe (``scripts/generate_ode_pairs.py``): the bidirectional Wan2.1-T2V-1.3B in fp32, 48 Euler steps of
``FlowMatchScheduler(shift=8)``, standard CFG 6 against the Wan negative prompt on the x0 prediction, one Gaussian
noise per prompt, states [0, 12, 24, 36, final] kept; prompts split across ranks (prompt ``index * world + rank``),
one ``.pt`` per prompt, packed into a float16 LMDB by ``scripts/create_lmdb_iterative.py``. Here
:data:`CAUSVID_ODE` holds those numbers and ``configs/ode.yaml`` the run.

One file (:func:`generate_ode_pairs`; ``torch.save``, read with ``torch.load(weights_only=True)``): ``format`` =
:data:`ODE_PAIRS_FORMAT`, ``prompts`` (list of N str), ``trajectories`` ``(N, S + 1, F, C, H, W)`` in the storage
dtype (the official LMDB used float16), ``sigmas`` ``(S + 1,)`` float64, ``geometry`` (dict), ``ode`` (steps,
shift, guidance, seed, first prompt index).

A folder (:func:`write_ode_pairs`, the ``sfvideo ode-pairs`` command): ``index.json`` (format, the number of prompts,
shard size, a digest of the prompt list and the settings) and ``shard_00000.pt``, ... (one file as above per
``shard_size`` prompts, in prompt order). Shard ``i`` is written by rank ``i mod world_size``, each atomically, and
an existing shard is skipped, so an interrupted run resumes where it stopped and ranks need no communication. The
noise of prompt ``i`` depends only on ``(seed, i)``: the folder equals one file of the whole list.
:func:`load_ode_pairs` reads either; a folder's shards are memory-mapped, so rows are read from disk as used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from sfvideo.config import ManyStepSampling
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import ode_trajectories, record_sigmas_for
from sfvideo.files import AtomicFile
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.interfaces import NEGATIVE_PROMPT, TextEncoder
from sfvideo.seeding import mix_seed

__all__ = [
    "CAUSVID_ODE",
    "ODE_PAIRS_FORMAT",
    "ODE_PAIRS_INDEX",
    "ODEPairs",
    "ODEPairsDataModule",
    "ODEPairsLatents",
    "generate_ode_pairs",
    "load_ode_pairs",
    "write_ode_pairs",
]

ODE_PAIRS_FORMAT = "sfvideo-ode-pairs/1"
"""Value of the ``format`` key of a trajectories file (and of a folder's ``index.json``)."""

ODE_PAIRS_INDEX = "index.json"
"""The index file of a trajectories folder."""

CAUSVID_ODE = ManyStepSampling(num_steps=48, shift=8.0, guidance_scale=6.0, guidance="standard")
"""The official ODE pairs: 48 Euler steps at shift 8, standard CFG 6; states [0, 12, 24, 36, final] are exactly
the generator's ``[1000, 750, 500, 250]`` warped at shift 8 (notes §5)."""


class ODEPairs:
    """Trajectories read by :func:`load_ode_pairs`: rows ``(S + 1, F, C, H, W)``, one per prompt.

    Args:
        prompts: Prompt of each row.
        shards: Row blocks ``(n_i, S + 1, F, C, H, W)`` in row order (one for a file, one per shard of a folder,
            memory-mapped).
        sigmas: ``(S + 1,)`` float64 sigmas of the states (the last is 0).
        meta: The rest of the file (geometry, ode settings).
    """

    def __init__(self, prompts: list[str], shards: Sequence[Tensor], sigmas: Tensor, meta: dict[str, Any]) -> None:
        self.prompts, self.shards, self.sigmas, self.meta = prompts, list(shards), sigmas, meta
        self._starts = [0]
        for block in self.shards:
            self._starts.append(self._starts[-1] + block.shape[0])

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """``(S + 1, F, C, H, W)``."""
        return tuple(self.shards[0].shape[1:])

    @property
    def trajectories(self) -> Tensor:
        """All rows ``(N, S + 1, F, C, H, W)`` (read whole into memory)."""
        return torch.cat(self.shards) if len(self.shards) > 1 else self.shards[0]

    def take(self, rows: Sequence[int]) -> Tensor:
        """Rows ``(len(rows), S + 1, F, C, H, W)`` (only those are read from disk)."""
        out = []
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"row {r} outside the {len(self)} trajectories")
            shard = next(i for i in range(len(self.shards)) if r < self._starts[i + 1])
            out.append(self.shards[shard][r - self._starts[shard]])
        return torch.stack(out)

    def rows_by_prompt(self) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            rows.setdefault(p, []).append(i)
        return rows


def check_euler(ode: ManyStepSampling) -> None:
    """ODE pairs are the teacher's Euler trajectories (official ``scripts/generate_ode_pairs.py``)."""
    if ode.solver != "euler":
        raise ValueError(f"ode.solver={ode.solver!r}: ODE pairs are Euler trajectories (ode.solver euler)")


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
    first_index: int = 0,
) -> Path:
    """Generate teacher ODE trajectories for ``prompts`` and save them (atomically) to ``path`` for :class:`ODEInit`.

    The noise of prompt ``i`` comes from a CPU generator seeded with ``(seed, first_index + i)``, so the file does
    not depend on ``batch_size`` or the device, and slices of a list written with their ``first_index`` equal one
    file of the whole list (:func:`write_ode_pairs` shards that way).

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
        first_index: Index of ``prompts[0]`` in the whole prompt list (the noise index).
    """
    check_euler(ode)
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
        gens = [torch.Generator().manual_seed(mix_seed(seed, first_index + start + i)) for i in range(len(batch))]
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
                "guidance": ode.guidance, "negative_prompt": negative_prompt, "seed": seed,
                "first_index": first_index},
    }
    with AtomicFile(out, make_parents=True) as tmp:
        torch.save(payload, tmp)
    return out


def _settings(
    prompts: Sequence[str], *, geometry: VideoGeometry, step_sigmas: Tensor, ode: ManyStepSampling,
    negative_prompt: str, seed: int, storage_dtype: torch.dtype,
) -> dict[str, Any]:
    """What a folder's shards must agree on: written to ``index.json``, compared on resume."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "num_prompts": len(prompts), "prompts_sha256": digest,
        "sigmas": record_sigmas_for(step_sigmas).tolist(),
        "geometry": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(geometry).items()},
        "ode": {"steps": ode.num_steps, "shift": ode.shift, "guidance_scale": ode.guidance_scale,
                "guidance": ode.guidance, "negative_prompt": negative_prompt, "seed": seed},
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
    }  # fmt: skip


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.pt"


def write_ode_pairs(
    teacher: nn.Module,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    folder: str | os.PathLike,
    *,
    geometry: VideoGeometry,
    step_sigmas: Tensor,
    ode: ManyStepSampling = CAUSVID_ODE,
    negative_prompt: str = NEGATIVE_PROMPT,
    shard_size: int = 16,
    batch_size: int = 1,
    seed: int = 0,
    storage_dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: Any = None,
) -> list[Path]:
    """Write (or finish) a trajectories folder: this rank's missing shards (see the module docstring).

    Args:
        teacher / text_encoder / prompts / geometry / step_sigmas / ode / negative_prompt / batch_size / seed /
            storage_dtype / device: As :func:`generate_ode_pairs` (storage float16 by default, as the official LMDB).
        folder: The output folder (created).
        shard_size: Prompts per shard file (the unit of resumption).
        rank / world_size: This process among the writers; shard ``i`` belongs to rank ``i mod world_size``.
        progress: Called as ``progress(done_prompts, total_prompts)`` after each shard of this rank (skipped
            shards count as done).

    Returns:
        The shard files this rank wrote in this call.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    check_euler(ode)
    if not prompts:
        raise ValueError("write_ode_pairs: prompts is empty")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(prompts, geometry=geometry, step_sigmas=step_sigmas, ode=ode,
                         negative_prompt=negative_prompt, seed=seed, storage_dtype=storage_dtype)
    index = {"format": ODE_PAIRS_FORMAT, "shard_size": shard_size, **settings}
    index_path = folder / ODE_PAIRS_INDEX
    if index_path.is_file():
        found = json.loads(index_path.read_text())
        changed = sorted(k for k in index if found.get(k) != index[k])
        if changed:
            raise ValueError(
                f"{folder} holds ODE pairs of other settings ({', '.join(changed)} differ): resume with the same "
                "config and prompts, or write to another folder"
            )
    else:
        # Every rank writes the same content; the rename is atomic, so concurrent writers are harmless.
        with AtomicFile(index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=1))
    n = len(prompts)
    mine = list(range(rank, -(-n // shard_size), world_size))
    total = sum(len(prompts[i * shard_size : (i + 1) * shard_size]) for i in mine)
    written, done = [], 0
    for i in mine:
        lo = i * shard_size
        part = list(prompts[lo : lo + shard_size])
        path = shard_path(folder, i)
        if not path.is_file():
            generate_ode_pairs(teacher, text_encoder, part, path, geometry=geometry, step_sigmas=step_sigmas, ode=ode,
                               negative_prompt=negative_prompt, batch_size=batch_size, seed=seed,
                               storage_dtype=storage_dtype, device=device, first_index=lo)
            written.append(path)
        done += len(part)
        if progress is not None:
            progress(done, total)
    return written


def _load_file(path: Path, *, mmap: bool) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != ODE_PAIRS_FORMAT:
        raise ValueError(f"{path}: not an sfvideo ODE-pairs file (expected format {ODE_PAIRS_FORMAT!r})")
    for key in ("prompts", "trajectories", "sigmas"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    traj, sigmas, prompts = data["trajectories"], data["sigmas"], data["prompts"]
    if traj.ndim != 6 or traj.shape[0] != len(prompts) or traj.shape[1] != sigmas.numel():
        raise ValueError(
            f"{path}: trajectories of shape {tuple(traj.shape)} do not match {len(prompts)} prompts and "
            f"{sigmas.numel()} sigmas"
        )
    return data


def _load_folder(folder: Path) -> ODEPairs:
    index_path = folder / ODE_PAIRS_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ODE_PAIRS_INDEX} (not an ODE-pairs folder of sfvideo ode-pairs)")
    index = json.loads(index_path.read_text())
    if index.get("format") != ODE_PAIRS_FORMAT:
        raise ValueError(f"{index_path}: not an sfvideo ODE-pairs index (expected format {ODE_PAIRS_FORMAT!r})")
    n, size = int(index["num_prompts"]), int(index["shard_size"])
    count = -(-n // size)
    missing = [i for i in range(count) if not shard_path(folder, i).is_file()]
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} of {count} shards missing (first: {shard_path(folder, missing[0]).name}); run "
            "`sfvideo ode-pairs` with the same config again to finish it"
        )
    prompts: list[str] = []
    shards: list[Tensor] = []
    data: dict[str, Any] = {}
    for i in range(count):
        data = _load_file(shard_path(folder, i), mmap=True)
        if data["sigmas"].tolist() != index["sigmas"]:
            raise ValueError(f"{shard_path(folder, i)}: state sigmas differ from {index_path}")
        prompts += list(data["prompts"])
        shards.append(data["trajectories"])
    if len(prompts) != n:
        raise ValueError(f"{folder}: shards hold {len(prompts)} prompts, {index_path} says {n}")
    meta = {k: v for k, v in data.items() if k not in ("prompts", "trajectories", "sigmas")}
    meta["index"] = index
    return ODEPairs(prompts, shards, torch.tensor(index["sigmas"], dtype=torch.float64), meta)


def load_ode_pairs(path: str | os.PathLike) -> ODEPairs:
    """Read a trajectories file of :func:`generate_ode_pairs` or a folder of :func:`write_ode_pairs` (complete;
    one-line errors name the file and key)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"ODE trajectories file not found: {path}")
    data = _load_file(path, mmap=False)
    meta = {k: v for k, v in data.items() if k not in ("prompts", "trajectories", "sigmas")}
    return ODEPairs(list(data["prompts"]), [data["trajectories"]], data["sigmas"].to(torch.float64), meta)


class ODEPairsLatents(IterableDataset):
    """Infinite, seeded, rank-split stream of ``{"prompts": [...], "latents": (B, F, C, H, W)}`` batches: one state
    of the trajectories (default the final one, the teacher's sample).

    Args:
        pairs: The trajectories.
        batch_size: Clips per batch (per rank).
        seed: The permutation of epoch e uses ``seed + e`` on every rank; rank r reads every world-th entry.
        rank / world_size: Position of this process.
        state: Index of the state along ``S + 1`` (-1 = final).
        start_batch: Batches of this rank to skip (exact resume).
    """

    def __init__(self, pairs: ODEPairs, batch_size: int, seed: int, rank: int, world_size: int, *, state: int = -1,
                 start_batch: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.state, self.start_batch = rank, world_size, state, start_batch

    def _indices(self):
        epoch = 0
        while True:
            perm = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            while len(perm) < self.world_size:  # fewer rows than ranks: every rank still needs data
                perm = perm + perm
            yield from perm[self.rank :: self.world_size]
            epoch += 1

    def __iter__(self):
        it = self._indices()
        batch_index = 0
        while True:
            rows = [next(it) for _ in range(self.batch_size)]
            if batch_index >= self.start_batch:
                latents = self.pairs.take(rows)[:, self.state].float()
                yield {"prompts": [self.pairs.prompts[r] for r in rows], "latents": latents}
            batch_index += 1


class ODEPairsDataModule(L.LightningDataModule):
    """Clean latents from an ODE-pairs file or folder: the teacher's samples, as the official TF/DF trainer uses
    them (``trainer/diffusion.py`` trains on ``batch["ode_latent"][:, -1]``, the last state of the ODE LMDB).

    Args:
        trajectories: File or folder of :func:`generate_ode_pairs` / :func:`write_ode_pairs` (``sfvideo ode-pairs``).
        batch_size: Clips per rank per step (1 per GPU officially).
        seed: Seed of the shared permutation.
        state: Which state of each trajectory (-1 = the final sample, official).
    """

    def __init__(self, trajectories: str, batch_size: int = 1, seed: int = 0, state: int = -1) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"--data.init_args.batch_size must be positive, got {batch_size}")
        self.trajectories, self.batch_size, self.seed, self.state = trajectories, batch_size, seed, state
        self._batches_consumed = 0
        self.pairs: ODEPairs | None = None

    def setup(self, stage: str) -> None:
        if self.pairs is None:
            self.pairs = load_ode_pairs(self.trajectories)
            states = self.pairs.state_shape[0]
            if not -states <= self.state < states:
                raise ValueError(f"--data.init_args.state={self.state}: {self.trajectories} holds {states} states")

    def train_dataloader(self) -> DataLoader:
        assert self.pairs is not None
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        stream = ODEPairsLatents(self.pairs, self.batch_size, self.seed, rank, world, state=self.state,
                                 start_batch=self._batches_consumed)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def count_consumed_batch(self) -> None:
        self._batches_consumed += 1

    def state_dict(self) -> dict:
        return {"batches_consumed": self._batches_consumed, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._batches_consumed = int(state_dict.get("batches_consumed", 0))
