"""``sfvideo ode-pairs``: write the teacher ODE trajectories of an ``ODEInit`` config to disk, once, for
``sfvideo fit`` of the same config to read (official ``scripts/generate_ode_pairs.py``; notes §5).

The config is the fit config itself (``configs/ode.yaml``, ``configs/toy/ode.yaml``): teacher, text encoder,
geometry, the generator's step list (the states kept), the ``ode`` group (steps, shift, CFG), the negative prompt,
the seed and the prompts of its data module. The trajectories go to ``model.init_args.trajectories`` (or ``--out``),
a folder of shards (``sfvideo.data.ode_pairs.write_ode_pairs``): resumable (existing shards are skipped, so
rerun the same command after an interruption) and split across ranks (shard ``i`` on rank ``i mod world``; ranks
come from torchrun's ``RANK`` / ``WORLD_SIZE`` or ``--rank`` / ``--world_size``, no process group is needed). The
teacher runs in ``--dtype`` (fp32 officially) and is never needed again: ``sfvideo fit`` with ``trajectories`` set
drops it.

Examples::

    sfvideo ode-pairs --config configs/ode.yaml
    torchrun --nproc_per_node 8 -m sfvideo.cli ode-pairs --config configs/ode.yaml
    sfvideo fit --config configs/ode.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROG = "sfvideo ode-pairs"


class OdePairsError(ValueError):
    """A user error: printed as one line, no traceback."""


def build_parser():
    import lightning as L
    from jsonargparse import ActionConfigFile

    from sfvideo.errors import json_parser

    p = json_parser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="The ODEInit fit config (configs/ode.yaml).")
    p.add_argument("--model", type=L.LightningModule | None, default=None,
                   help="The config's ODEInit module (teacher, ode, schedule, ...).")
    p.add_argument("--data", type=L.LightningDataModule | None, default=None, help="Its prompt data module.")
    p.add_argument("--trainer", type=dict | None, default=None, help="Ignored (the fit config's trainer).")
    p.add_argument("--seed_everything", type=int | bool | None, default=None, help="Ignored.")
    p.add_argument("--ckpt_path", type=str | None, default=None, help="Ignored.")
    p.add_argument("--out", type=str | None, default=None,
                   help="Output folder (default: model.init_args.trajectories).")
    p.add_argument("--prompts_file", type=str | None, default=None,
                   help="Prompts, one per line (default: the data module's).")
    p.add_argument("--limit", type=int | None, default=None, help="Only the first N prompts.")
    p.add_argument("--shard_size", type=int, default=16, help="Prompts per shard file (the unit of resumption).")
    p.add_argument("--batch_size", type=int, default=1, help="Prompts per teacher batch.")
    p.add_argument("--dtype", type=str, default="float32", help="Teacher precision (fp32 officially).")
    p.add_argument("--storage_dtype", type=str, default="float16", help="Stored states (float16 as the official LMDB).")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda:1, ...")
    p.add_argument("--rank", type=int | None, default=None, help="This writer (default: $RANK or 0).")
    p.add_argument("--world_size", type=int | None, default=None, help="Writers (default: $WORLD_SIZE or 1).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``sfvideo ode-pairs``; returns ``{"out", "written", "num_prompts"}``."""
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(parser, cfg)
    except (OdePairsError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: error: {str(e).splitlines()[0]}") from None


def _prompts(cfg: Any, data: Any) -> list[str]:
    from sfvideo.files import read_prompt_file

    if cfg.prompts_file is not None:
        prompts = read_prompt_file(cfg.prompts_file)
    else:
        if data is None or not hasattr(data, "setup"):
            raise OdePairsError("no prompts: give --prompts_file or a config with a prompt data module")
        data.setup("fit")
        prompts = list(getattr(data, "prompts", None) or [])
        if not prompts:
            raise OdePairsError(f"the data module {type(data).__name__} gives no prompt list: give --prompts_file")
    if cfg.limit is not None:
        if cfg.limit <= 0:
            raise OdePairsError(f"--limit must be positive, got {cfg.limit}")
        prompts = prompts[: cfg.limit]
    return prompts


def _device(name: str) -> torch.device:
    if name == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(parser: Any, cfg: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sfvideo.data.ode_pairs import write_ode_pairs
    from sfvideo.nn.precision import parse_dtype
    from sfvideo.training.ode import ODEInit

    if cfg.model is None or not str(cfg.model.class_path).endswith("ODEInit"):
        raise OdePairsError("--config must be an ODEInit fit config (model.class_path sfvideo.training.ode.ODEInit)")
    out = cfg.out or cfg.model.init_args.trajectories
    if not out:
        raise OdePairsError("no output folder: set model.init_args.trajectories in the config, or --out")
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", "0"))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    # The codec only matters to the fit's checkpoints (inference); building it (a VAE) would be wasted here.
    cfg.model.init_args.codec = None
    objects = parser.instantiate(cfg)
    module: ODEInit = objects.model
    prompts = _prompts(cfg, objects.data)
    device = _device(cfg.device)
    h = module.hparams
    teacher = module.frozen(module.build_network(h.teacher, h.teacher_overrides), parse_dtype(cfg.dtype))
    module.check_network(teacher, "teacher")
    teacher = teacher.to(device)

    console = Console(stderr=True, quiet=cfg.quiet)
    console.print(f"[bold]{PROG}[/]: {len(prompts)} prompts -> {out} (rank {rank} of {world}, {device}), "
                  f"{module.ode.num_steps} Euler steps at shift {module.ode.shift}, {module.ode.guidance} CFG "
                  f"{module.ode.guidance_scale}, states at sigmas {[round(float(s), 4) for s in module.step_sigmas]}")
    progress = Progress(TextColumn("prompts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=cfg.quiet or rank != 0)
    with progress:
        task = progress.add_task("pairs", total=None)
        written = write_ode_pairs(
            teacher, module.text_encoder, prompts, out, geometry=module.geometry, step_sigmas=module.step_sigmas,
            ode=module.ode, negative_prompt=module.negative_prompt, shard_size=cfg.shard_size,
            batch_size=cfg.batch_size, seed=module.seed, storage_dtype=parse_dtype(cfg.storage_dtype),
            device=device, rank=rank, world_size=world,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    console.print(f"wrote {len(written)} shard(s) to {out}")
    return {"out": str(Path(out)), "written": [str(p) for p in written], "num_prompts": len(prompts)}


if __name__ == "__main__":
    main()
