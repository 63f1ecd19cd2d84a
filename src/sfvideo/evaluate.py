"""``sfvideo evaluate``: VBench's quality dimensions over folders of mp4s (one folder per model) or over videos a
trained generator makes from a prompt file, with per-frame / per-clip curves, drift and long-horizon coherence,
and a side-by-side report.

Every model is a path you give (``--dino``, ``--clip_b32``, ``--clip_l14`` + ``--aesthetic_head``, ``--musiq``,
``--raft``, ``--interpolator``); nothing is downloaded unless you pass a hub id for a transformers model, written
``hf:owner/name``. A dimension whose model is absent is listed as missing with the reason, and Quality / Semantic /
Total are printed only when every dimension they need is there (otherwise ``partial``). See docs/evaluation.md.

Examples::

    sfvideo evaluate runs/a/videos runs/b/videos --dino weights/dino-vitb16 --clip_b32 weights/clip-vit-base-patch32 \\
        --clip_l14 weights/clip-vit-large-patch14 --aesthetic_head weights/sa_0_4_vit_l_14_linear.pth --report out/
    sfvideo evaluate --generator sf=runs/toy/checkpoints/last.ckpt --prompts prompts.txt --samples_per_prompt 5 \\
        --generate_args "--num_frames 84" --horizon_seconds 5 --report out/
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROG = "sfvideo evaluate"


class EvaluateError(ValueError):
    """A user error: printed as one line, no traceback."""


def read_video(path: str | Path) -> tuple[torch.Tensor, float]:
    """Every frame of a video file as ``(T, 3, H, W)`` uint8 RGB (PyAV / FFmpeg) and its average frame rate."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError, OSError) as e:
        raise EvaluateError(f"cannot read video {path}: {e}")
    if not frames:
        raise EvaluateError(f"{path}: no video frame")
    return torch.stack(frames).permute(0, 3, 1, 2).contiguous(), float(rate) if rate else 0.0


def prompt_of(path: Path) -> str:
    """VBench's file naming ``{prompt}-{index}.mp4``: the prompt is the stem without its ``-index``."""
    return re.sub(r"-\d+$", "", path.stem)


def read_full_info(path: str | Path) -> dict[str, set[str]]:
    """``VBench_full_info.json`` (the prompt suite, a data file the user gives): prompt -> its dimensions."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvaluateError(f"--full_info not found: {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluateError(f"--full_info {path}: not JSON: {e}")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "prompt_en" in e and "dimension" in e
                                                for e in entries):
        raise EvaluateError(f"--full_info {path}: expected a list of {{'prompt_en', 'dimension'}} entries")
    out: dict[str, set[str]] = {}
    for e in entries:
        out.setdefault(e["prompt_en"], set()).update(e["dimension"])
    return out


def _named(values: Sequence[str], flag: str) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v.rstrip("/")).name or v, v
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvaluateError(f"{flag}: model names must differ, got {names} (use NAME=PATH)")
    return out


def generate_videos(name: str, checkpoint: Path, prompts: list[str], samples: int, folder: Path, seed: int,
                    extra: str) -> Path:
    """``samples`` videos per prompt with ``sfvideo generate`` into ``folder/{prompt}-{i}.mp4`` (VBench's naming;
    the seed of sample ``i`` is ``seed + i``). Existing files are kept, so an interrupted run resumes."""
    from sfvideo import generate as G

    parser = G.build_parser()
    folder.mkdir(parents=True, exist_ok=True)
    for prompt in prompts:
        for i in range(samples):
            target = folder / f"{prompt.replace('/', '_')}-{i}.mp4"
            if target.exists():
                continue
            argv = [str(checkpoint), "--prompt", prompt, "-o", str(target), "--seed", str(seed + i), "--quiet",
                    "--contact_sheet", "none", *shlex.split(extra)]
            try:
                G.run(parser.instantiate(parser.parse_args(argv)))
            except G.GenerateError as e:
                raise EvaluateError(f"--generator {name}: {e}")
    return folder


def build_parser():
    from jsonargparse import ActionConfigFile

    from sfvideo.errors import json_parser
    from sfvideo.metrics.vbench.models import SUPPORTED_DIMENSIONS
    from sfvideo.metrics.vbench.score import CLIP_SECONDS, DEFAULT_GAPS

    p = json_parser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options.")
    p.add_argument("videos", nargs="*", default=[], help="Folders of mp4s, one per model (NAME=FOLDER to name it).")
    g = p.add_argument_group("Generating the videos")
    g.add_argument("--generator", nargs="+", default=[],
                   help="NAME=CHECKPOINT of trained generators (one or more); videos go to <report>/videos/NAME.")
    g.add_argument("--prompts", type=str | None, default=None, help="Prompt file (one a line), e.g. a VBench list.")
    g.add_argument("--samples_per_prompt", type=int, default=5, help="Videos per prompt (VBench's protocol: 5).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--generate_args", type=str, default="", help="Further `sfvideo generate` flags, one string.")
    m = p.add_argument_group("Models (local paths; a transformers model may be hf:owner/name, then downloaded)")
    m.add_argument("--dino", type=str | None, default=None, help="DINO ViT-B/16 folder (facebook/dino-vitb16).")
    m.add_argument("--clip_b32", type=str | None, default=None,
                   help="CLIP ViT-B/32 folder (openai/clip-vit-base-patch32).")
    m.add_argument("--clip_l14", type=str | None, default=None,
                   help="CLIP ViT-L/14 folder (openai/clip-vit-large-patch14).")
    m.add_argument("--aesthetic_head", type=str | None, default=None, help="LAION sa_0_4_vit_l_14_linear.pth.")
    m.add_argument("--musiq", type=str | None, default=None, help="pyiqa musiq_spaq_ckpt-358bb6af.pth (needs pyiqa).")
    m.add_argument("--raft", type=str | None, default=None,
                   help="torchvision raft_large_C_T_V1-22a6c225.pth (needs torchvision).")
    m.add_argument("--interpolator", type=str | None, default=None,
                   help="TorchScript frame interpolator forward(img0, img1, embt) (e.g. traced AMT-S).")
    e = p.add_argument_group("What to compute")
    e.add_argument("--dimensions", nargs="+", default=None,
                   help=f"Subset of: {', '.join(SUPPORTED_DIMENSIONS)} (default: all).")
    e.add_argument("--full_info", type=str | None, default=None,
                   help="VBench_full_info.json: score each dimension only on its prompts (files {prompt}-{i}.mp4).")
    e.add_argument("--horizon_seconds", type=float | None, default=None,
                   help="Training horizon: marked on the plots; drift is split within/beyond it.")
    e.add_argument("--clip_seconds", type=float, default=CLIP_SECONDS, help="VBench-Long clip length.")
    e.add_argument("--gaps", nargs="+", type=int, default=list(DEFAULT_GAPS), help="Frame gaps of the coherence curve.")
    e.add_argument("--imaging_mode", type=str, default="longer", help="VBench imaging_quality_preprocessing_mode.")
    e.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    e.add_argument("--clip_dtype", type=str, default="auto",
                   help="auto (float16 on CUDA, float32 on CPU: what VBench's clip.load gives), float16, float32.")
    o = p.add_argument_group("Output")
    o.add_argument("--report", type=str | None, default=None, help="Folder for report.md, results.json and plots.")
    o.add_argument("--json", type=str | None, default=None, help="Also write the results JSON here.")
    o.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``sfvideo evaluate``. Returns ``{model: VBenchMetric.compute()}``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except EvaluateError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None


def run(args: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sfvideo.metrics.vbench import VBenchMetric, VBenchModelPaths, VBenchModels, VideoScorer
    from sfvideo.metrics.vbench.report import write_report

    console = Console(stderr=True, quiet=args.quiet)
    models_in = _named(args.videos, "videos") + _named(args.generator, "--generator")
    if not models_in:
        raise EvaluateError("give folders of mp4s and/or --generator NAME=CHECKPOINT")
    if args.generator and not args.prompts:
        raise EvaluateError("--generator needs --prompts FILE")
    if args.generator and not args.report:
        raise EvaluateError("--generator needs --report DIR (the videos are written to <report>/videos/NAME)")
    for name, folder in _named(args.videos, "videos"):
        if not folder.is_dir():
            raise EvaluateError(f"video folder not found: {folder}")
    full_info = read_full_info(args.full_info) if args.full_info else None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    paths = VBenchModelPaths(dino=args.dino, clip_b32=args.clip_b32, clip_l14=args.clip_l14,
                             aesthetic_head=args.aesthetic_head, musiq=args.musiq, raft=args.raft,
                             interpolator=args.interpolator)
    dtypes = {"auto": None, "float16": torch.float16, "fp16": torch.float16, "float32": torch.float32,
              "fp32": torch.float32}
    if args.clip_dtype not in dtypes:
        raise EvaluateError(f"--clip_dtype {args.clip_dtype!r}: expected auto, float16 or float32")
    try:
        models = VBenchModels.load(paths, dimensions=tuple(args.dimensions) if args.dimensions else None,
                                   device=device, clip_dtype=dtypes[args.clip_dtype])
    except ValueError as e:
        raise EvaluateError(f"--dimensions: {e}")
    for d, why in (models.missing or {}).items():
        console.print(f"[yellow]missing[/] {d}: {why}")
    scorer = VideoScorer(models, gaps=tuple(args.gaps), clip_seconds=args.clip_seconds,
                         imaging_mode=args.imaging_mode)

    folders: list[tuple[str, Path]] = list(_named(args.videos, "videos"))
    if args.generator:
        from sfvideo.data.prompts import read_prompt_file

        try:
            prompts = read_prompt_file(args.prompts)
        except (FileNotFoundError, ValueError) as e:
            raise EvaluateError(f"--prompts: {e}")
        for name, ckpt in _named(args.generator, "--generator"):
            console.print(f"generating {len(prompts)} x {args.samples_per_prompt} videos with {name} ({ckpt})")
            folders.append((name, generate_videos(name, ckpt, prompts, args.samples_per_prompt,
                                                  Path(args.report) / "videos" / name, args.seed,
                                                  args.generate_args)))

    results: dict[str, Any] = {}
    per_video: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for name, folder in folders:
        files = sorted(folder.glob("*.mp4"))
        if not files:
            raise EvaluateError(f"{name}: no .mp4 file in {folder}")
        scores, skipped, fps0 = [], 0, None
        with Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      disable=args.quiet, transient=True) as progress:
            task = progress.add_task(name, total=len(files))
            for f in files:
                dims = None
                if full_info is not None:
                    dims = tuple(d for d in models.available if d in full_info.get(prompt_of(f), ()))
                    if not dims:
                        skipped += 1
                        progress.advance(task)
                        continue
                frames, fps = read_video(f)
                if fps <= 0:
                    raise EvaluateError(f"{f}: no frame rate in the file")
                if fps0 is None:
                    fps0 = fps
                elif abs(fps - fps0) > 1e-6:
                    console.print(f"[yellow]warning[/] {f}: {fps:g} fps, the first video of {name} has {fps0:g}; "
                                  "its curves are placed on the first video's time axis")
                try:
                    scores.append(scorer.score(frames, fps, name=f.name, dimensions=dims))
                except ValueError as e:
                    raise EvaluateError(f"{f}: {e}")
                progress.advance(task)
        if not scores:
            raise EvaluateError(f"{name}: no video in {folder} matches a prompt of --full_info")
        if skipped:
            console.print(f"[yellow]{name}[/]: {skipped} video(s) whose prompt has no computable dimension in "
                          "--full_info were not scored")
        horizon = round(args.horizon_seconds * fps0) if args.horizon_seconds is not None else None
        metric = VBenchMetric(models, fps=fps0, max_frames=max(max(s.num_frames for s in scores), 3),
                              clip_seconds=args.clip_seconds, gaps=args.gaps, horizon_frames=horizon,
                              imaging_mode=args.imaging_mode)
        metric.update(scores=scores)
        results[name] = metric.compute()
        per_video[name] = [s.as_dict() for s in scores]
    elapsed = time.perf_counter() - t0

    _print_table(console, results)
    settings = {"models": "; ".join(f"{k}={v}" for k, v in vars(paths).items() if v is not None) or "none",
                "dimensions": list(models.dimensions), "full_info": args.full_info, "clip_seconds": args.clip_seconds,
                "horizon_seconds": args.horizon_seconds, "imaging_mode": args.imaging_mode, "device": device,
                "clip_dtype": str(models.clip_b32.dtype if models.clip_b32 else models.clip_l14.dtype
                                  if models.clip_l14 else "-").removeprefix("torch."),
                "elapsed_s": round(elapsed, 1), "date": time.strftime("%Y-%m-%d")}
    if args.report:
        path = write_report(args.report, results, per_video, horizon_seconds=args.horizon_seconds, settings=settings)
        console.print(f"wrote {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.partial")
        tmp.write_text(json.dumps({"settings": settings, "models": results}, indent=1))
        tmp.replace(args.json)
    return results


def _print_table(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    names = list(results)
    table = Table(title="VBench quality dimensions")
    table.add_column("dimension")
    for n in names:
        table.add_column(n, justify="right")
    dims = list(next(iter(results.values()))["dimensions"])
    for d in dims:
        cells = [f"{v:.4f}" if (v := results[n]["dimensions"].get(d)) is not None else "missing" for n in names]
        table.add_row(d, *cells)
    for agg in ("quality", "semantic", "total"):
        cells = []
        for n in names:
            a = results[n]["aggregate"][agg]
            cells.append(f"{a['value']:.4f}" if a["status"] == "complete" else f"partial ({len(a['missing'])} missing)")
        table.add_row(agg.capitalize(), *cells)
    console.print(table)


if __name__ == "__main__":
    main()
