"""``sfvideo curves RUN``: training curves of a run as a PNG and a CSV (what a trained artifact is committed with).

``RUN`` is a Lightning version folder (``lightning_logs/version_0``) or any folder holding TensorBoard event
files; every event file under it is read (a resumed run writes one per session) and the points are merged by
step, the later file winning. Each tag is drawn raw (thin) and smoothed with an exponential moving average
(thick, ``--smoothing``, TensorBoard's convention: weight of the previous smoothed value).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sfvideo.files import AtomicFile


def read_scalars(run: str | Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` sorted by step, merged over every event file under ``run``.

    Raises:
        FileNotFoundError: no event file under ``run``.
        KeyError: a tag that no event file holds (the message lists the tags there are).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run}")
    merged: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    available: set[str] = set()
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        present = set(acc.Tags().get("scalars", []))
        available |= present
        for tag in tags:
            if tag in present:
                merged[tag].update({e.step: float(e.value) for e in acc.Scalars(tag)})
    missing = [t for t in tags if not merged[t]]
    if missing:
        raise KeyError(f"{run}: no scalar {missing[0]!r}; the run logs {sorted(available)}")
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average ``s_i = w s_{i-1} + (1 - w) v_i``, debiased as TensorBoard does."""
    out, s = [], 0.0
    for i, v in enumerate(values, start=1):
        s = weight * s + (1 - weight) * v
        out.append(s / (1 - weight**i) if weight > 0 else v)
    return out


def plot_curves(curves: dict[str, list[tuple[int, float]]], out: Path, *, smoothing: float, title: str,
                log_y: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (tag, points) in zip(axes[0], curves.items(), strict=True):
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        (line,) = ax.plot(steps, values, linewidth=0.6, alpha=0.35)
        ax.plot(steps, smooth(values, smoothing), linewidth=1.8, color=line.get_color())
        ax.set_title(tag)
        ax.set_xlabel("step")
        if log_y and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with AtomicFile(out, make_parents=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temporary's name does not end in .png
    plt.close(fig)


def write_csv(curves: dict[str, list[tuple[int, float]]], out: Path) -> None:
    steps = sorted({s for points in curves.values() for s, _ in points})
    table = {tag: dict(points) for tag, points in curves.items()}
    with AtomicFile(out, make_parents=True) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *curves])
        for s in steps:
            w.writerow([s, *[table[t].get(s, "") for t in curves]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sfvideo curves", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("run", help="a run folder with TensorBoard event files (e.g. lightning_logs/version_0)")
    p.add_argument("--tags", default="train/loss", help="scalar tags, comma-separated (default: train/loss)")
    p.add_argument("--out", required=True, help="PNG to write; a CSV of the same points is written beside it")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the smoothed curve, in [0, 1)")
    p.add_argument("--log_y", action="store_true", help="logarithmic y axis")
    p.add_argument("--title", default=None, help="figure title (default: the run folder)")
    args = p.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        raise SystemExit(f"sfvideo curves: --smoothing must be in [0, 1), got {args.smoothing}")
    out = Path(args.out)
    if out.suffix != ".png":
        raise SystemExit(f"sfvideo curves: --out must be a .png file, got {out}")
    tags = [t for t in args.tags.split(",") if t]
    try:
        curves = read_scalars(args.run, tags)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f"sfvideo curves: {e.args[0]}") from None
    plot_curves(curves, out, smoothing=args.smoothing, title=args.title or str(args.run), log_y=args.log_y)
    write_csv(curves, out.with_suffix(".csv"))
    counts = ", ".join(f"{t}: {len(c)} points" for t, c in curves.items())
    print(f"wrote {out} and {out.with_suffix('.csv')} ({counts})")


if __name__ == "__main__":
    main()
