"""The evaluation report: ``report.md`` (tables and plots, models side by side), ``results.json`` and PNG plots of
each per-frame and per-clip curve and of the coherence curve, one line per model.

``results`` maps a model name to ``VBenchMetric.compute()``; ``videos`` (optional) maps it to the per-video scores.
Every file is written to a temporary name and renamed, so a report folder never holds a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sfvideo.metrics.vbench.constants import QUALITY_DIMENSIONS


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.parent / f".{path.name}.partial"
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


Panel = tuple[str, str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]], bool]
"""(title, x label, y label, {model: (x, y)}, log x)."""


def _plot(path: Path, panels: Sequence[Panel], vline: float | None = None) -> bool:
    """One PNG with a panel per entry of ``panels`` (empty curves dropped), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, xl, yl, {k: v for k, v in c.items() if len(v[0])}, lx) for t, xl, yl, c, lx in panels]
    panels = [p for p in panels if p[3]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), dpi=90, squeeze=False)
    for ax, (title, xlabel, ylabel, curves, logx) in zip(axes[0], panels, strict=True):
        for name, (x, y) in curves.items():
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, linewidth=1.4, label=name)
        if vline is not None and not logx:
            ax.axvline(vline, color="grey", linestyle="--", linewidth=1, label="training horizon")
        if logx:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ticks = sorted({float(v) for x, _ in curves.values() for v in x})
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.parent / f".{path.stem}.partial.png"
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True


CURVE_LABELS = {
    "subject_consistency": "s_t (DINO, prev + first)",
    "background_consistency": "s_t (CLIP-B/32, prev + first)",
    "temporal_flickering": "(255 - MAE_t) / 255",
    "motion_smoothness": "(255 - d_t) / 255 at odd t",
    "dynamic_degree": "top-5% flow / threshold",
    "aesthetic_quality": "LAION score / 10",
    "imaging_quality": "MUSIQ / 100",
}


def write_report(out: str | os.PathLike, results: Mapping[str, Mapping[str, Any]],
                 videos: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, *,
                 horizon_seconds: float | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``results.json`` and the plots under ``out``; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    dims = [d for d in QUALITY_DIMENSIONS if any(d in r["dimensions"] for r in results.values())]
    payload = {"settings": dict(settings or {}), "models": {n: dict(results[n]) for n in names}}
    if videos:
        for n in names:
            payload["models"][n]["per_video"] = list(videos.get(n, []))
    _atomic_write(out / "results.json", json.dumps(payload, indent=1, default=float))

    md: list[str] = ["# VBench evaluation", ""]
    if settings:
        md += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in settings.items()] + [""]
    head = "| dimension | " + " | ".join(names) + " |"
    sep = "|---|" + "---|" * len(names)

    md += ["## VBench quality dimensions", "",
           "Raw dataset scores with VBench's formulas (higher is better); `missing` = not computed, reason below.", "",
           head, sep]
    for d in dims:
        cells = [_fmt(v) if (v := results[n]["dimensions"].get(d)) is not None else "missing" for n in names]
        md.append(f"| {d} | " + " | ".join(cells) + " |")
    md += ["", "| videos | " + " | ".join(str(results[n]["videos"]) for n in names) + " |", ""]

    md += ["## Aggregates (VBench `scripts/constant.py` normalisation and weights)", "", head, sep]
    for agg in ("quality", "semantic", "total"):
        cells = []
        for n in names:
            a = results[n]["aggregate"][agg]
            cells.append(_fmt(a["value"]) if a["status"] == "complete" else f"partial ({len(a['missing'])} missing)")
        md.append(f"| {agg} | " + " | ".join(cells) + " |")
    md += ["", "A partial aggregate is not computed: VBench's own script would count a missing dimension as 0.", ""]

    md += ["## VBench-Long (mean over 2 s clips per video, then over videos)", "", head, sep]
    md += [f"| {d} | " + " | ".join(_fmt(results[n]["long"].get(d)) for n in names) + " |" for d in dims
           if any(d in results[n]["long"] for n in names)]
    md += [""]

    md += ["## Drift over the video (per-clip curve)", "",
           "Slope of a least-squares line through the per-clip scores (per second), last clip minus first clip"
           + (", and the per-frame mean beyond minus within the training horizon" if horizon_seconds else "") + ".",
           "", "| dimension | model | slope / s | last − first |" + (" beyond − within |" if horizon_seconds else ""),
           "|---|---|---|---|" + ("---|" if horizon_seconds else "")]
    for d in dims:
        for n in names:
            dr = results[n]["drift"].get(d)
            if dr is None:
                continue
            row = f"| {d} | {n} | {_fmt(dr['slope_per_second'], 5)} | {_fmt(dr['last_minus_first'], 5)} |"
            if horizon_seconds:
                row += f" {_fmt(dr.get('beyond_minus_within_horizon'), 5)} |"
            md.append(row)
    md += [""]

    md += ["## Long-horizon coherence (mean cosine similarity of frame features at a frame gap)", ""]
    for kind, label in (("dino", "DINO (subject)"), ("clip_b32", "CLIP ViT-B/32 (background)")):
        gaps = sorted({g for n in names for g in results[n]["coherence"].get(kind, {}).get("gap", [])})
        if not gaps:
            continue
        md += [f"{label}:", "", "| gap (frames) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for g in gaps:
            cells = []
            for n in names:
                c = results[n]["coherence"].get(kind, {"gap": [], "value": []})
                cells.append(_fmt(dict(zip(c["gap"], c["value"], strict=True)).get(g)))
            md.append(f"| {g} | " + " | ".join(cells) + " |")
        md += [""]

    md += ["## Plots", "", "Per frame (mean over videos at each frame index) and per 2 s clip (VBench-Long), one line "
           "per model" + ("; the dashed line is the training horizon." if horizon_seconds else "."), ""]
    for d in dims:
        pf = {n: (results[n]["per_frame"][d]["time_s"], results[n]["per_frame"][d]["value"]) for n in names
              if d in results[n]["per_frame"]}
        pc = {n: ([s + results[n]["clip_seconds"] / 2 for s in results[n]["per_clip"][d]["start_s"]],
                  results[n]["per_clip"][d]["value"]) for n in names if d in results[n]["per_clip"]}
        if _plot(out / f"{d}.png", [(f"{d}: per frame", "time (s)", CURVE_LABELS.get(d, d), pf, False),
                                    (f"{d}: per clip", "clip centre (s)", d, pc, False)], horizon_seconds):
            md += [f"![{d}]({d}.png)", ""]
    co = [(f"coherence ({kind})", "frame gap (s)", "mean cosine similarity",
           {n: ([g / results[n]["fps"] for g in results[n]["coherence"][kind]["gap"]],
                results[n]["coherence"][kind]["value"]) for n in names if kind in results[n]["coherence"]}, True)
          for kind in ("dino", "clip_b32")]
    if _plot(out / "coherence.png", co):
        md += ["![coherence](coherence.png)", ""]

    md += ["## Missing dimensions", ""]
    reasons: dict[str, dict[str, str]] = {}
    for n in names:
        for d, why in results[n]["missing"].items():
            reasons.setdefault(d, {})[n] = why
    for d, per in reasons.items():
        whys = set(per.values())
        md.append(f"- **{d}**: " + ("; ".join(f"{n}: {w}" for n, w in per.items()) if len(whys) > 1
                                    else next(iter(whys))))
    md.append("")
    path = out / "report.md"
    _atomic_write(path, "\n".join(md))
    return path
