"""``sfvideo demo`` (``make demo``): the whole method on the embedded toy world, on a CPU, in minutes.

1. **Teacher**: the bidirectional toy teacher shipped in ``src/sfvideo/assets/toy_teacher`` (made by
   ``configs/toy/teacher.yaml``), or the exported teacher folder given with ``--teacher`` (a candidate teacher is
   demoed without replacing the shipped one).
2. **ODE initialisation** (``configs/toy/ode.yaml``): the causal generator starts from the teacher's weights and
   regresses the teacher's ODE trajectories with the block-causal mask at its few-step noise levels.
3. **Self Forcing with DMD** (``configs/toy/dmd.yaml``): the generator rolls out whole clips with its KV cache and
   is trained by distribution matching against the teacher, with a critic.
4. **Samples and metrics**: mp4s and PNG contact sheets for training and held-out prompts, and the toy world's exact
   metrics for the teacher (many-step, CFG), the ODE-initialised generator and the Self Forcing generator, side by
   side (``<out>/metrics.json``).

Every stage is the ordinary CLI (``sfvideo fit --config ...``): the demo only chains them. Runs go to
``lightning_logs/demo/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def config_path(name: str) -> str:
    for root in (Path.cwd(), REPO):
        path = root / "configs" / "toy" / name
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"configs/toy/{name} not found (run the demo from the repository root)")


def toy_teacher_folder(teacher: str | None, command: str) -> Path:
    """The exported teacher folder a toy-world command runs from: ``teacher`` (its ``--teacher``, made absolute:
    stages may run in other processes and folders), else the shipped asset; a folder that is not an export, or a
    missing asset, is a one-line exit naming ``command``."""
    from sfvideo.training.networks import asset_path

    if teacher is not None:
        if not (Path(teacher) / "sfvideo.json").is_file():
            raise SystemExit(
                f"sfvideo {command}: --teacher {teacher}: not an exported teacher folder (no sfvideo.json)"
            )
        return Path(teacher).resolve()
    shipped = asset_path("toy_teacher")
    if shipped is None:
        raise SystemExit(
            f"sfvideo {command}: the toy teacher is missing (src/sfvideo/assets/toy_teacher); make it with "
            "`sfvideo fit --config configs/toy/teacher.yaml` and `sfvideo export`"
        )
    return shipped


def fit_stage(config: str, save_dir: Path, name: str, *extra: str) -> Path:
    """Run ``sfvideo fit`` and return the run's last checkpoint."""
    from sfvideo.cli import main as cli

    cli(
        [
            "fit",
            "--config",
            config,
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.logger.init_args.name",
            name,
            *extra,
        ]
    )
    runs = sorted((save_dir / name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"stage {name}: no checkpoint written under {save_dir / name}")
    return runs[-1]


def banner(text: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]{text}")


def _evaluate(
    out: Path,
    teacher_dir: Path,
    ode_dir: Path,
    sf_dir: Path,
    *,
    num_prompts: int,
    num_eval: int,
    teacher_steps: int,
    seed: int,
) -> dict[str, Any]:

    from sfvideo.evaluation import evaluate_toy_engine, evaluation_engine, real_toy_features, toy_eval_prompts
    from sfvideo.toy.features import load_feature_encoder
    from sfvideo.video import save_contact_sheet, write_mp4

    splits = toy_eval_prompts(num_eval, seed)
    features = load_feature_encoder()
    results: dict[str, Any] = {}
    models = {
        f"teacher ({teacher_steps} steps, CFG)": ("teacher", teacher_dir),
        "ODE init (4 steps)": ("generator", ode_dir),
        "Self Forcing (4 steps)": ("generator", sf_dir),
    }
    # Every folder records how it is sampled (sfvideo.json); the teacher's step count is the demo's option.
    engines = {label: evaluation_engine(folder, sampling_steps=teacher_steps if kind == "teacher" else None)[0]
               for label, (kind, folder) in models.items()}
    for split, prompts in splits.items():
        real = real_toy_features(prompts, features)
        for label, (kind, folder) in models.items():
            scores, video = evaluate_toy_engine(engines[label], prompts, seed=seed, features=features, real=real)
            results.setdefault(split, {})[label] = scores
            tag = kind if kind == "teacher" else folder.name
            sample_dir = out / "samples" / split / tag
            sample_dir.mkdir(parents=True, exist_ok=True)
            shown = min(num_prompts, len(prompts))
            for i, (clip, prompt) in enumerate(zip(video[:shown], prompts[:shown], strict=True)):
                write_mp4(sample_dir / f"{i:02d}_{prompt.replace(' ', '_')}.mp4", clip)
            save_contact_sheet(sample_dir / "contact_sheet.png", video[:shown], columns=video.shape[1])
            (sample_dir / "prompts.txt").write_text("\n".join(prompts[:shown]) + "\n")
    return results


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from sfvideo.evaluation import METRIC_LABELS

    keys = [(k, METRIC_LABELS[k]) for k in ("colour_acc", "shape_acc", "direction_acc", "motion_acc", "persistence",
                                            "background_fidelity", "flicker", "brightness_drift", "fd_ratio",
                                            "seconds_per_video")]
    console = Console(width=max(150, Console().width))  # the table is wide; CI logs are not terminals
    for split, rows in results.items():
        table = Table(title=f"toy world, {split} prompts")
        table.add_column("model")
        for _, title in keys:
            table.add_column(title, justify="right")
        for label, scores in rows.items():
            table.add_row(label, *[f"{scores[k]:.3f}" if k in scores else "–" for k, _ in keys])
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sfvideo demo", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="lightning_logs/demo", help="folder for runs, exports, samples and metrics")
    p.add_argument("--ode_steps", type=int, default=None, help="ODE-initialisation steps (default: the config's)")
    p.add_argument(
        "--generator_steps", type=int, default=None, help="Self Forcing generator updates (default: the config's)"
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="teacher guidance of the DMD stage (default: the config's; docs/demo.md measures 1, 2 and 3)",
    )
    p.add_argument("--num_prompts", type=int, default=8, help="videos written per split (train / held-out)")
    p.add_argument("--num_eval", type=int, default=32, help="videos scored per split (metrics and FD)")
    p.add_argument("--teacher_steps", type=int, default=30, help="Euler steps of the teacher's samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--teacher",
        default=None,
        help="exported teacher folder (`sfvideo export`) to distil and compare against (default: the shipped one)",
    )
    args = p.parse_args(argv)

    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.export import export_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = toy_teacher_folder(args.teacher, "demo")
    # Both stages then read their teacher from this flag (the configs name the shipped asset), so the generators and
    # the reference rows share one teacher.
    teacher_flag = ("--model.init_args.teacher", str(teacher)) if args.teacher is not None else ()
    start = time.perf_counter()

    banner("1/3  ODE initialisation of the causal generator")
    extra = ["--trainer.max_steps", str(args.ode_steps)] if args.ode_steps else []
    ode_ckpt = fit_stage(config_path("ode.yaml"), out, "ode", *teacher_flag, *extra)
    ode_dir = export_checkpoint(ode_ckpt, out / "exports" / "ode_init", overwrite=True)

    banner("2/3  Self Forcing with DMD")
    extra = ["--model.init_args.max_generator_steps", str(args.generator_steps)] if args.generator_steps else []
    if args.guidance_scale is not None:
        extra += ["--model.init_args.dmd.guidance_scale", str(args.guidance_scale)]
    sf_ckpt = fit_stage(
        config_path("dmd.yaml"),
        out,
        "self_forcing",
        *teacher_flag,
        "--model.init_args.generator_init",
        str(ode_dir),
        *extra,
    )
    has_ema = read_checkpoint(sf_ckpt).ema_state("generator") is not None
    sf_dir = export_checkpoint(sf_ckpt, out / "exports" / "self_forcing", ema=has_ema, overwrite=True)

    banner("3/3  Samples and metrics")
    results = _evaluate(
        out,
        teacher,
        ode_dir,
        sf_dir,
        num_prompts=args.num_prompts,
        num_eval=args.num_eval,
        teacher_steps=args.teacher_steps,
        seed=args.seed,
    )
    _print_table(results)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nsamples: {out / 'samples'}  metrics: {out / 'metrics.json'}  "
        f"TensorBoard: tensorboard --logdir {out}  ({minutes:.1f} min)"
    )


if __name__ == "__main__":
    main()
