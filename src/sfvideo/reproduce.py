"""``sfvideo reproduce`` (``make reproduce``): the paper's Table 2 and Figure 6 at toy scale.

From the shipped toy teacher (``src/sfvideo/assets/toy_teacher``, whatever is there; or the exported folder of
``--teacher`` / the config's ``teacher``), every paradigm of the project
is trained through its own toy config (``configs/toy/*.yaml``, the ordinary ``sfvideo fit``, chained as
``sfvideo demo`` does) at one budget, chunk-wise and frame-wise, and evaluated with the toy world's exact metrics:

- many-step teacher forcing and diffusion forcing (``tf.yaml``, ``df.yaml``; sampled chunk by chunk with CFG);
- CausVid-style DF+DMD and TF+DMD (``df_dmd.yaml``, ``tf_dmd.yaml``);
- Self Forcing with DMD (``dmd.yaml``; also trained with the window restriction, the last chunk cannot see the
  first), SiD (``sid.yaml``) and a GAN (``gan.yaml``);
- the ODE initialisation every distillation paradigm starts from (``ode.yaml``), and the teacher, as reference rows.

**Budget**: the same number of generator updates for every paradigm, at the same batch size per update
(``generator_updates``, ``batch_size`` of the run config); a distillation paradigm's updates include its critic
updates (5 per generator update in the toy configs), the ODE initialisation is a separate, shared stage. Wall-clock
per paradigm is measured, not equalised (Figure 6 left reports it).

Report (``<out>/reproduction.md``, ``<out>/reproduction.json``, PNG plots), every interval a 95 % bootstrap
interval over the evaluated videos (prompts x seeds; FD and KD by half-sampling without replacement,
``toy.features.distance_report``):

1. Table 2: exact metrics and FD/real, KD - real within the training horizon, training and held-out prompts;
2. error accumulation: each metric per frame index (one curve per paradigm), its slope and last-chunk minus
   first-chunk gap;
3. extrapolation with the rolling KV cache to multiples of the training length, with the rolling window of the
   training clip and with the restriction (window = clip - one chunk): per-window metrics;
4. Figure 6: time per generator update and peak memory per paradigm (left), FD/real vs training wall-clock (right).

Run configs: ``configs/toy/reproduce.yaml`` (the full run) and ``configs/toy/reproduce_quick.yaml`` (``--quick``:
every stage for a few steps; what the test suite runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from sfvideo.demo import banner, config_path, fit_stage, toy_teacher_folder
from sfvideo.evaluation import METRIC_LABELS, evaluation_engine
from sfvideo.files import AtomicFile

Kind = Literal["many_step", "distillation", "ode"]


@dataclass(frozen=True)
class Paradigm:
    """One row of Table 2: the toy config that trains it and how it starts."""

    label: str
    config: str
    """File name in ``configs/toy/``."""
    kind: Kind
    """``many_step`` (trained from the teacher's weights on rendered clips, sampled with causal CFG),
    ``distillation`` (starts from the ODE initialisation; counted in generator updates) or ``ode``."""
    window: bool = False
    """Train with the rollout's attention window restricted to the clip minus one chunk (the paper's trick)."""


PARADIGMS: dict[str, Paradigm] = {
    "tf": Paradigm("TF (many-step)", "tf.yaml", "many_step"),
    "df": Paradigm("DF (many-step)", "df.yaml", "many_step"),
    "df_dmd": Paradigm("DF+DMD (CausVid)", "df_dmd.yaml", "distillation"),
    "tf_dmd": Paradigm("TF+DMD", "tf_dmd.yaml", "distillation"),
    "sf_dmd": Paradigm("Self Forcing DMD", "dmd.yaml", "distillation"),
    "sf_dmd_window": Paradigm("Self Forcing DMD, window", "dmd.yaml", "distillation", window=True),
    "sf_sid": Paradigm("Self Forcing SiD", "sid.yaml", "distillation"),
    "sf_gan": Paradigm("Self Forcing GAN", "gan.yaml", "distillation"),
}
"""Every paradigm the project has, keyed by its name in the run config and the JSON."""
ODE = Paradigm("ODE init", "ode.yaml", "ode")
TEACHER_LABEL = "teacher (bidirectional, many-step)"
TABLE_METRICS: tuple[tuple[str, str], ...] = tuple(
    (k, METRIC_LABELS[k]) for k in ("colour_acc", "shape_acc", "direction_acc", "motion_acc", "persistence",
                                    "background_fidelity", "flicker", "fd_ratio", "kd_diff")
)
WINDOW_METRICS: tuple[str, ...] = ("persistence", "motion_acc", "background_fidelity", "flicker", "colour_acc",
                                   "shape_acc")
"""Frame metrics averaged per extrapolation window (``direction_acc`` is a first-frames metric: not per window)."""


@dataclass(frozen=True)
class ReproduceConfig:
    """A reproduction run: what is trained, the budget, and how much is evaluated (``configs/toy/reproduce*.yaml``)."""

    generator_updates: int
    """Generator updates of every paradigm (optimizer steps of the model for the many-step baselines)."""
    batch_size: int
    """Clips or prompts per update (``data.batch_size``) of every paradigm."""
    ode_steps: int
    """Updates of the ODE initialisation (``trainer.max_steps`` of ``ode.yaml``)."""
    num_prompts: int
    """Evaluated prompts per split (``evaluation.toy_eval_prompts``), each with every seed."""
    seeds: tuple[int, ...]
    """Noise seeds of the evaluation."""
    extrapolation_factors: tuple[int, ...]
    """Lengths of the extrapolation, in multiples of the training clip."""
    extrapolation_prompts: int
    """Training prompts of the extrapolation (first seed only)."""
    snapshots: int
    """Points of metric vs wall-clock (Figure 6 right): checkpoints at evenly spaced generator updates, the last
    being the final model; each scored on the training prompts of the evaluation with the first seed."""
    num_bootstrap: int
    """Bootstrap resamples of the per-video intervals."""
    num_subsets: int
    """Half-size subsets of the FD / KD intervals."""
    gap_frames: int
    """Frames averaged at each end for the last-chunk minus first-chunk gap (one chunk-wise chunk)."""
    num_frames: int | None = None
    """Latent frames of every stage's training clip (a multiple of every chunking; None: the teacher's). Shorter
    clips are for smoke runs: the teacher was trained on its own length."""
    paradigms: tuple[str, ...] = tuple(PARADIGMS)
    """Keys of :data:`PARADIGMS` to train."""
    frames_per_chunk: tuple[int, ...] = (3, 1)
    """Chunkings trained and reported (3 = chunk-wise, 1 = frame-wise)."""
    ode_batch_size: int | None = None
    """Prompts per ODE-initialisation update (None: ``ode.yaml``'s)."""
    ode_trajectory_steps: int | None = None
    """Teacher Euler steps of the ODE trajectories (None: ``ode.yaml``'s)."""
    critic_updates_per_generator_update: int | None = None
    """Override of the distillation configs' ratio (None: theirs)."""
    sampling_steps: int | None = None
    """Steps of the many-step samplers (teacher, TF, DF) at evaluation (None: their recorded ones)."""
    data_workers: int | None = None
    """Rendering workers of the toy data modules (None: the configs')."""
    isolate: bool = True
    """Run each training stage in its own process (``sys.executable -m sfvideo.cli fit``), so its peak memory is
    its own; False runs them in this process (peak memory then is a lower bound: freed memory is reused)."""
    progress: bool = True
    """Lightning progress bars and model summaries."""
    level: float = 0.95
    """Coverage of every interval."""
    teacher: str | None = None
    """Exported teacher folder (``sfvideo export``) that every stage distils from or, for the many-step baselines,
    starts from, and the reference rows sample (None: the shipped ``toy_teacher`` asset the configs name)."""

    def __post_init__(self) -> None:
        for name in ("generator_updates", "batch_size", "ode_steps", "num_prompts", "extrapolation_prompts",
                     "snapshots", "gap_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"reproduce: {name} must be positive, got {getattr(self, name)}")
        unknown = [p for p in self.paradigms if p not in PARADIGMS]
        if unknown:
            raise ValueError(f"reproduce: unknown paradigms {unknown}; known: {list(PARADIGMS)}")
        if not self.seeds:
            raise ValueError("reproduce: seeds is empty")
        if not self.frames_per_chunk or any(f <= 0 for f in self.frames_per_chunk):
            raise ValueError(f"reproduce: frames_per_chunk must be positive chunk sizes, got {self.frames_per_chunk}")
        if any(k < 1 for k in self.extrapolation_factors):
            raise ValueError(f"reproduce: extrapolation_factors must be >= 1, got {self.extrapolation_factors}")
        if self.num_frames is not None and any(self.num_frames % f or self.num_frames < f
                                                   for f in self.frames_per_chunk):
            raise ValueError(f"reproduce: num_frames={self.num_frames} is not a multiple of every chunk size "
                             f"{self.frames_per_chunk}")
        if not 0 < self.level < 1:
            raise ValueError(f"reproduce: level must be in (0, 1), got {self.level}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ReproduceConfig:
    """A :class:`ReproduceConfig` from a YAML file (types checked by jsonargparse, as every config), with
    ``overrides`` (``FIELD=VALUE``, the value read as YAML: ``frames_per_chunk=[3]``) applied on top."""
    import yaml

    from sfvideo.config import parse_as

    data = yaml.safe_load(Path(path).read_text()) or {}
    names = {f.name for f in fields(ReproduceConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"reproduce: --set {item!r} is not FIELD=VALUE with FIELD one of "
                             f"{sorted(names)}")
        data[key] = yaml.safe_load(value)
    return parse_as(ReproduceConfig, data)


# --------------------------------------------------------------------------------------------------------------
# Statistics


def bootstrap_mean(values: torch.Tensor, generator: torch.Generator, num: int, level: float) -> dict[str, float]:
    """Mean of ``values (n,)`` (NaN ignored) and its percentile bootstrap interval over the rows."""
    v = values.double()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    out = {"mean": float(v.mean())}
    if v.numel() < 2 or num <= 0:
        return {**out, "low": float("nan"), "high": float("nan")}
    means = v[torch.randint(v.numel(), (num, v.numel()), generator=generator)].mean(1)
    lo = (1 - level) / 2
    return {**out, "low": float(means.quantile(lo)), "high": float(means.quantile(1 - lo))}


def _interval(samples: torch.Tensor, estimate: float, level: float) -> dict[str, float]:
    s = samples[~samples.isnan()]
    lo = (1 - level) / 2
    if s.numel() < 2:
        return {"mean": estimate, "low": float("nan"), "high": float("nan")}
    return {"mean": estimate, "low": float(s.quantile(lo)), "high": float(s.quantile(1 - lo))}


def _curve_stats(curves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``curves (R, n, T)``: the mean curve over ``n`` (NaN ignored) ``(R, T)``, its least-squares slope
    per frame ``(R,)`` over the defined frames, and the frame indices ``(T,)``."""
    mean = curves.nanmean(dim=1)
    t = torch.arange(mean.shape[-1], dtype=mean.dtype)
    ok = ~mean.isnan()
    w = ok.to(mean.dtype)
    count = w.sum(-1).clamp_min(1)
    t_bar = (t * w).sum(-1) / count
    c_bar = torch.where(ok, mean, 0).sum(-1) / count
    dt = (t - t_bar[:, None]) * w
    slope = (dt * torch.where(ok, mean - c_bar[:, None], 0)).sum(-1) / dt.pow(2).sum(-1).clamp_min(1e-12)
    return mean, slope, t


def accumulation(
    curves: torch.Tensor, gap_frames: int, generator: torch.Generator, num: int, level: float
) -> dict[str, Any]:
    """Error accumulation of one metric from per-video curves ``(n, T)``: the mean curve with pointwise intervals,
    its slope per frame and the mean of the last ``gap_frames`` frames minus that of the first (NaN frames
    ignored), each with a bootstrap interval over the videos."""
    c = curves.double()
    n, t_len = c.shape
    k = min(gap_frames, t_len)
    mean, slope, _ = _curve_stats(c[None])
    gap = mean[:, -k:].nanmean(-1) - mean[:, :k].nanmean(-1)
    out: dict[str, Any] = {"curve": mean[0].tolist(), "slope": float(slope[0]), "gap": float(gap[0])}
    if n >= 2 and num > 0:
        idx = torch.randint(n, (num, n), generator=generator)
        b_mean, b_slope, _ = _curve_stats(c[idx])
        b_gap = b_mean[:, -k:].nanmean(-1) - b_mean[:, :k].nanmean(-1)
        lo = (1 - level) / 2
        out["curve_low"] = b_mean.nanquantile(lo, dim=0).tolist()
        out["curve_high"] = b_mean.nanquantile(1 - lo, dim=0).tolist()
        out["slope_ci"] = _interval(b_slope, float(slope[0]), level)
        out["gap_ci"] = _interval(b_gap, float(gap[0]), level)
    return out


# --------------------------------------------------------------------------------------------------------------
# Training stages


def _callbacks(config_file: str, clock: dict[str, Any]) -> str:
    """The config's callbacks without the periodic evaluation (it would be timed as training), plus the clock."""
    import yaml

    data = yaml.safe_load(Path(config_file).read_text())
    kept = [c for c in (data.get("trainer", {}).get("callbacks") or [])
            if not str(c.get("class_path", "")).endswith("SampleEvaluator")]
    kept.append({"class_path": "sfvideo.training.callbacks.TrainingClock", "init_args": clock})
    return json.dumps(kept)


def _data_class(config_file: str) -> str:
    import yaml

    return str(yaml.safe_load(Path(config_file).read_text()).get("data", {}).get("class_path", ""))


def _run_fit(cfg: ReproduceConfig, config_file: str, runs: Path, name: str, extra: list[str]) -> Path:
    if not cfg.isolate:
        return fit_stage(config_file, runs, name, *extra)
    cmd = [sys.executable, "-m", "sfvideo.cli", "fit", "--config", config_file,
           "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", name, *extra]
    result = subprocess.run(cmd, env=os.environ.copy(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"stage {name} failed (exit {result.returncode}): {' '.join(cmd)}")
    found = sorted((runs / name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"stage {name}: no checkpoint written under {runs / name}")
    return found[-1]


# Fields that choose which stages run or how they print, not what any one stage computes: a stage is named by its
# paradigm and chunking (``sf_dmd_f3``) and reads nothing of the other stages but its chunking's ODE initialisation,
# so a run that adds the frame-wise chunking or a paradigm reuses the stages an earlier run finished.
STAGE_INDEPENDENT_FIELDS = ("paradigms", "frames_per_chunk", "progress")


def run_fingerprint(cfg: ReproduceConfig, teacher: Path) -> str:
    """What a finished stage's results depend on: the run config (less :data:`STAGE_INDEPENDENT_FIELDS`) and the
    teacher's files (names and bytes).

    A rerun into the same ``--out`` reuses a stage whose record carries the same fingerprint and recomputes the
    rest, so an interrupted run resumes at the stage it was in; any change of budget or teacher starts over.
    """
    relevant = {k: v for k, v in asdict(cfg).items() if k not in STAGE_INDEPENDENT_FIELDS}
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    for f in sorted(p for p in Path(teacher).rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class StageRecords:
    """Per-stage results under ``<out>/stages/<name>.json`` (written atomically once a stage is evaluated)."""

    def __init__(self, out: Path, fingerprint: str, *, resume: bool) -> None:
        self.folder, self.fingerprint, self.resume = out / "stages", fingerprint, resume
        self.reused: list[str] = []

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.folder / f"{name}.json"
        if not self.resume or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # not ours (records are written atomically): recompute it
        if record.get("fingerprint") != self.fingerprint:
            return None
        self.reused.append(name)
        print(f"reproduce: reusing stage {name} ({path}; same config and teacher)", flush=True)
        return record["entry"]

    def save(self, name: str, entry: dict[str, Any]) -> None:
        with AtomicFile(self.folder / f"{name}.json", make_parents=True) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "entry": entry}, default=str) + "\n")


def snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` generator-update counts evenly spread over ``1..total``, the last being ``total``."""
    return sorted({max(1, round(total * (i + 1) / count)) for i in range(count)})


def train_stage(
    cfg: ReproduceConfig, out: Path, key: str, paradigm: Paradigm, fpc: int, clip_frames: int, pixel_frames: int,
    ode_dir: Path | None,
) -> dict[str, Any]:
    """Train one paradigm at one chunking; returns the paths of its last checkpoint, clock and snapshots."""
    config_file = config_path(paradigm.config)
    name = f"{key}_f{fpc}"
    clock_path = out / "clocks" / f"{name}.json"
    total = cfg.ode_steps if paradigm.kind == "ode" else cfg.generator_updates
    clock = {"path": str(clock_path)}
    if paradigm.kind != "ode":  # the final point is the final model, evaluated anyway
        steps = [s for s in snapshot_steps(total, cfg.snapshots) if s < total]
        clock.update(snapshot_steps=steps, snapshot_dir=str(out / "snapshots" / name))
    extra = ["--trainer.callbacks", _callbacks(config_file, clock),
             "--model.init_args.geometry.frames_per_chunk", str(fpc)]
    if not cfg.progress:
        extra += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    renders = _data_class(config_file).endswith(("ToyVideoDataModule", "ToyLatentDataModule"))
    if cfg.data_workers is not None and renders:
        extra += ["--data.init_args.num_workers", str(cfg.data_workers)]
    if cfg.num_frames is not None:
        extra += ["--model.init_args.geometry.num_frames", str(clip_frames)]
        if renders:
            extra += ["--data.init_args.world.num_frames", str(pixel_frames)]
    if paradigm.kind == "ode":
        extra += ["--trainer.max_steps", str(cfg.ode_steps)]
        if cfg.ode_batch_size is not None:
            extra += ["--data.init_args.batch_size", str(cfg.ode_batch_size)]
        if cfg.ode_trajectory_steps is not None:
            extra += ["--model.init_args.ode.num_steps", str(cfg.ode_trajectory_steps)]
    else:
        extra += ["--data.init_args.batch_size", str(cfg.batch_size)]
    if paradigm.kind == "many_step":
        extra += ["--trainer.max_steps", str(cfg.generator_updates)]
    if paradigm.kind == "distillation":
        if ode_dir is None:
            raise ValueError(f"{key}: a distillation paradigm needs the ODE initialisation")
        extra += ["--model.init_args.max_generator_steps", str(cfg.generator_updates),
                  "--model.init_args.generator_init", str(ode_dir)]
        if cfg.critic_updates_per_generator_update is not None:
            extra += ["--model.init_args.optim.critic_updates_per_generator_update",
                      str(cfg.critic_updates_per_generator_update)]
        if paradigm.window:
            extra += ["--model.init_args.rollout.window_frames", str(clip_frames - fpc)]
    if cfg.teacher is not None:  # the many-step baselines start from the teacher's weights; the rest distil from it
        extra += ["--model.init_args.model" if paradigm.kind == "many_step" else "--model.init_args.teacher",
                  cfg.teacher]
    t0 = time.perf_counter()
    ckpt = _run_fit(cfg, config_file, out / "runs", name, extra)
    return {"checkpoint": str(ckpt), "clock": str(clock_path), "stage_seconds": time.perf_counter() - t0}


def clock_summary(clock_file: str | Path) -> dict[str, Any]:
    """Training time and memory of a stage from its ``TrainingClock`` JSON: seconds per generator update (median
    over updates, each the time from the previous update's iteration to its own, critic updates included), per
    trainer iteration (median), total training seconds, peak memory."""
    data = json.loads(Path(clock_file).read_text())
    its = data["iterations"]
    per_it = torch.tensor([i["iteration_seconds"] for i in its], dtype=torch.float64)
    per_update, last_t, last_n = [], 0.0, 0
    for i in its:
        if i["generator_steps"] > last_n:
            per_update.append((i["seconds"] - last_t) / (i["generator_steps"] - last_n))
            last_t, last_n = i["seconds"], i["generator_steps"]
    return {
        "seconds_per_generator_update": float(torch.tensor(per_update).median()) if per_update else float("nan"),
        "seconds_per_iteration": float(per_it.median()) if len(per_it) else float("nan"),
        "iterations": len(its),
        "generator_updates": last_n,
        "train_seconds": data["train_seconds"],
        "peak_memory_mb": data["peak_memory_bytes"] / 2**20,
        "memory_at_setup_mb": data["memory_at_setup_bytes"] / 2**20,
        "memory_kind": data["memory_kind"],
        "device": data["device"],
        "snapshots": data["snapshots"],
    }


# --------------------------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Scores engines on fixed prompt sets: in the training horizon, extrapolated, and at snapshots."""

    def __init__(self, cfg: ReproduceConfig, pixel_frames: int) -> None:
        from sfvideo.evaluation import real_toy_features, toy_eval_prompts
        from sfvideo.toy.features import load_feature_encoder
        from sfvideo.toy.world import ToyWorldConfig

        self.cfg = cfg
        world = ToyWorldConfig(num_frames=pixel_frames)
        self.features = load_feature_encoder()
        self.splits = toy_eval_prompts(cfg.num_prompts, cfg.seeds[0])
        # Real sets for every (prompt, seed) video: scene seeds are distinct across the repeated prompt list.
        self.real = {s: real_toy_features(p * len(cfg.seeds), self.features, world) for s, p in self.splits.items()}
        self.extra_prompts = toy_eval_prompts(cfg.extrapolation_prompts, cfg.seeds[0])["train"]
        self.extra_real = real_toy_features(self.extra_prompts, self.features, world)

    def _g(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seeds[0] * 1_000_003 + salt)

    def summary(self, videos: torch.Tensor, prompts: list[str], real: tuple[torch.Tensor, torch.Tensor],
                *, curves: bool) -> dict[str, Any]:
        """Per-video metrics with bootstrap intervals, FD/KD with half-sample intervals, optional curves."""
        from sfvideo.metrics.toy import FRAME_METRICS, VIDEO_METRICS, per_video_metrics
        from sfvideo.toy.features import distance_report

        cfg = self.cfg
        per = per_video_metrics(videos, prompts)
        out: dict[str, Any] = {"videos": len(prompts)}
        out["metrics"] = {m: bootstrap_mean(per[m], self._g(i), cfg.num_bootstrap, cfg.level)
                          for i, m in enumerate(VIDEO_METRICS)}
        with torch.no_grad():
            feats = self.features.features(videos)
        dist = distance_report(feats, *real, generator=self._g(99), num_subsets=cfg.num_subsets, level=cfg.level)
        for m in ("fd", "fd_ratio", "kd", "kd_diff"):
            out["metrics"][m] = {"mean": dist[m], "low": dist.get(f"{m}_low", float("nan")),
                                 "high": dist.get(f"{m}_high", float("nan"))}
        out["fd_real"], out["kd_real"] = dist["fd_real"], dist["kd_real"]
        if curves:
            out["accumulation"] = {
                m: accumulation(per[f"{m}_curve"], cfg.gap_frames, self._g(200 + i), cfg.num_bootstrap, cfg.level)
                for i, m in enumerate(FRAME_METRICS)
            }
        return out

    def horizon(self, engine: Any) -> dict[str, Any]:
        """Table 2 and error accumulation: every split, every seed, within the training clip."""
        from sfvideo.evaluation import evaluate_toy_engine

        res: dict[str, Any] = {}
        for split, prompts in self.splits.items():
            real, ref = self.real[split]
            n = len(prompts)
            videos, per_seed = [], []
            for j, seed in enumerate(self.cfg.seeds):
                part = (real[j * n:(j + 1) * n], ref[j * n:(j + 1) * n])
                scores, video = evaluate_toy_engine(engine, prompts, seed=seed, features=self.features, real=part)
                videos.append(video)
                per_seed.append({"seed": seed, **scores})
            summary = self.summary(torch.cat(videos), prompts * len(self.cfg.seeds), (real, ref), curves=True)
            summary["seconds_per_video"] = sum(s["seconds_per_video"] for s in per_seed) / len(per_seed)
            summary["per_seed"] = per_seed
            res[split] = summary
        return res

    def extrapolate(self, engine: Any, clip_frames: int, fpc: int) -> dict[str, Any]:
        """Rolling-KV-cache rollouts of ``k`` clips (``extrapolation_factors``), per training-length window, with
        the window of the training clip and the restricted one (clip minus one chunk)."""
        prompts, seed = self.extra_prompts, self.cfg.seeds[0]
        res: dict[str, Any] = {}
        windows = {"clip": clip_frames, "restricted": clip_frames - fpc}
        for wname, window in windows.items():
            if window < fpc:
                continue
            for k in self.cfg.extrapolation_factors:
                with torch.no_grad():
                    session = engine.session(num_frames=k * clip_frames, window_frames=window, decode=False)
                    session.start(prompts, seed=seed)
                    latents = torch.cat([c.chunk.latents for c in session], dim=1)
                    session.close()
                    video = engine.decode(latents).clamp(-1, 1)
                t_win = video.shape[1] // k
                per_window = []
                for w in range(k):
                    clip = video[:, w * t_win:(w + 1) * t_win]
                    s = self.summary(clip, prompts, self.extra_real, curves=False)
                    per_window.append({m: s["metrics"][m] for m in (*WINDOW_METRICS, "fd_ratio", "kd_diff")})
                res[f"{wname}_x{k}"] = {"window_frames": window, "factor": k, "windows": per_window}
        return res

    def snapshot(self, path: str | Path, sampling_steps: int | None) -> dict[str, float]:
        """FD/real and the exact metrics of a training snapshot: the training prompts, first seed (no intervals),
        as ``horizon(...)["train"]["per_seed"][0]`` scores the final model."""
        from sfvideo.evaluation import evaluate_toy_engine

        engine, ema = evaluation_engine(path, sampling_steps=sampling_steps)
        prompts = self.splits["train"]
        real, ref = self.real["train"]
        n = len(prompts)
        scores, _ = evaluate_toy_engine(engine, prompts, seed=self.cfg.seeds[0], features=self.features,
                                        real=(real[:n], ref[:n]))
        return {**scores, "ema": ema}


# --------------------------------------------------------------------------------------------------------------
# Report


def _fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or stat["mean"] != stat["mean"]:
        return "–"
    m, lo, hi = stat["mean"], stat.get("low", float("nan")), stat.get("high", float("nan"))
    if lo != lo or hi != hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _chunking(fpc: int) -> str:
    return "chunk-wise" if fpc > 1 else "frame-wise"


def plot_accumulation(results: dict[str, Any], fpc: int, path: Path, metrics: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=False):
        for label, entry in results.items():
            acc = entry["horizon"]["train"]["accumulation"][m]
            y = torch.tensor(acc["curve"])
            x = torch.arange(len(y))
            (line,) = ax.plot(x, y, label=label, lw=1.4)
            if "curve_low" in acc:
                ax.fill_between(x, acc["curve_low"], acc["curve_high"], color=line.get_color(), alpha=0.12)
        ax.set_title(m)
        ax.set_xlabel("frame")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"error accumulation per frame, {_chunking(fpc)}, training prompts (mean, 95% bootstrap band)")
    fig.tight_layout()
    with AtomicFile(path) as tmp:  # never a half-written plot
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_extrapolation(results: dict[str, Any], fpc: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("persistence", "background_fidelity", "fd_ratio")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    factor = None
    for ax, m in zip(axes[0], panels, strict=True):
        for label, entry in results.items():
            ext = entry.get("extrapolation") or {}
            keys = sorted(ext, key=lambda k: ext[k]["factor"])
            if not keys:
                continue
            factor = ext[keys[-1]]["factor"]
            colour = None
            for style, wname in (("-", "clip"), ("--", "restricted")):
                key = f"{wname}_x{factor}"
                if key not in ext:
                    continue
                y = [w[m]["mean"] for w in ext[key]["windows"]]
                (line,) = ax.plot(range(1, len(y) + 1), y, style, color=colour, marker="o", ms=3,
                                  label=f"{label} ({wname})")
                colour = line.get_color()
        ax.set_title(m)
        ax.set_xlabel("window (training lengths)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"extrapolation to {factor}x the training length, {_chunking(fpc)}: solid = window of the clip, "
                 "dashed = restricted")
    fig.tight_layout()
    with AtomicFile(path) as tmp:  # never a half-written plot
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_figure6(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, secs, mems = [], [], []
    for fpc, results in report["results"].items():
        for label, entry in results.items():
            clock = entry.get("training")
            if not clock:
                continue
            names.append(f"{label}, {_chunking(int(fpc))}")
            secs.append(clock["seconds_per_generator_update"])
            mems.append(clock["peak_memory_mb"])
    # One colour per paradigm (the same in both chunkings), solid chunk-wise, dashed frame-wise.
    labels = list(dict.fromkeys(label for results in report["results"].values() for label in results))
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 3, figsize=(17, max(4.0, 0.22 * len(names) + 1.2)),
                             gridspec_kw={"width_ratios": [1, 1, 1.4]})
    y = list(range(len(names)))[::-1]  # first paradigm at the top
    bar_colours = [colours[n.rsplit(", ", 1)[0]] for n in names]
    axes[0].barh(y, secs, color=bar_colours)
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].set_xlabel("seconds per generator update")
    axes[1].barh(y, mems, color=bar_colours)
    axes[1].set_yticks(y, [""] * len(names))
    axes[1].set_xlabel("peak memory (MiB)")
    for fpc, results in report["results"].items():
        for label, entry in results.items():
            curve = entry.get("wallclock") or []
            if curve:
                style = "-" if int(fpc) > 1 else "--"
                axes[2].plot([c["seconds"] for c in curve], [c["fd_ratio"] for c in curve], style, marker="o",
                             ms=3, color=colours[label], label=f"{label}, {_chunking(int(fpc))}")
    axes[2].set_xlabel("training wall-clock (s)")
    axes[2].set_ylabel("FD/real (training prompts, first seed)")
    axes[2].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("Figure 6 at toy scale: cost per update and peak memory (left), quality vs training time (right)")
    fig.tight_layout()
    with AtomicFile(path) as tmp:  # never a half-written plot
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    cfg = report["config"]
    lines = [
        "# Self Forcing at toy scale: Table 2 and Figure 6",
        "",
        f"{report['status']}",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; machine: {report['machine']}; wall-clock of the whole run: "
        f"{report['total_minutes']:.1f} min",
        f"- teacher: `{report['teacher']}`; training clip: {report['clip_frames']} latent frames",
        f"- budget: {cfg['generator_updates']} generator updates per paradigm at batch {cfg['batch_size']} "
        f"(distillation: each with its critic updates; many-step TF/DF: optimizer steps); ODE initialisation "
        f"{cfg['ode_steps']} steps, shared by the distillation paradigms",
        f"- evaluation: {cfg['num_prompts']} prompts per split x seeds {cfg['seeds']}; intervals: "
        f"{int(cfg['level'] * 100)} % bootstrap over videos ({cfg['num_bootstrap']} resamples), FD and KD by "
        f"half-sampling without replacement ({cfg['num_subsets']} subsets)",
        "",
    ]
    for fpc, results in report["results"].items():
        chunking = _chunking(int(fpc))
        for split in ("train", "heldout"):
            lines += [f"## Table 2, {chunking} ({fpc} frame{'s' if int(fpc) > 1 else ''} per chunk), {split} prompts",
                      "", "| model | " + " | ".join(t for _, t in TABLE_METRICS) + " | s/video |",
                      "|---|" + "---:|" * (len(TABLE_METRICS) + 1)]
            for label, entry in results.items():
                h = entry["horizon"][split]
                cells = [_fmt(h["metrics"].get(m)) for m, _ in TABLE_METRICS]
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {h['seconds_per_video']:.3f} |")
            lines.append("")
        lines += [f"## Error accumulation, {chunking}, training prompts", "",
                  f"Slope per frame of the mean curve, and the mean of the last {cfg['gap_frames']} frames minus "
                  f"the first {cfg['gap_frames']} (`accumulation_f{fpc}.png`).", "",
                  "| model | " + " | ".join(f"{m} slope | {m} gap" for m in report["curve_metrics"]) + " |",
                  "|---|" + "---:|---:|" * len(report["curve_metrics"])]
        for label, entry in results.items():
            acc = entry["horizon"]["train"]["accumulation"]
            cells = []
            for m in report["curve_metrics"]:
                a = acc[m]
                cells += [_fmt(a.get("slope_ci") or {"mean": a["slope"]}, 4),
                          _fmt(a.get("gap_ci") or {"mean": a["gap"]})]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"![error accumulation](accumulation_f{fpc}.png)", ""]
        lines += [f"## Extrapolation with the rolling KV cache, {chunking}", "",
                  "Per window of the training length; `clip`: rolling window of the training clip, `restricted`: "
                  "window of the clip minus one chunk (the last chunk of a window cannot see its first).", ""]
        for label, entry in results.items():
            ext = entry.get("extrapolation")
            if not ext:
                continue
            lines += [f"**{label}**", "", "| rollout | window | persistence | bg | FD/real |", "|---|---:|---|---|---|"]
            for key, e in ext.items():
                for w, win in enumerate(e["windows"]):
                    lines.append(f"| {key} | {w + 1} | {_fmt(win['persistence'])} | "
                                 f"{_fmt(win['background_fidelity'])} | {_fmt(win['fd_ratio'])} |")
            lines.append("")
        lines += [f"![extrapolation](extrapolation_f{fpc}.png)", ""]
    lines += ["## Figure 6: training cost", "",
              "Peak memory is the run's peak; `above set-up` subtracts what the process held when the run was set up "
              "(with `isolate: false` earlier stages' leftovers are in both).", "",
              "| model | chunking | s / generator update | s / iteration | train s | peak memory (MiB) | above set-up "
              "(MiB) | memory |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for fpc, results in report["results"].items():
        for label, entry in results.items():
            c = entry.get("training")
            if c:
                lines.append(f"| {label} | {_chunking(int(fpc))} | {c['seconds_per_generator_update']:.3f} | "
                             f"{c['seconds_per_iteration']:.3f} | {c['train_seconds']:.1f} | "
                             f"{c['peak_memory_mb']:.0f} | {c['peak_memory_mb'] - c['memory_at_setup_mb']:.0f} | "
                             f"{c['memory_kind']} |")
    lines += ["", "![Figure 6](figure6.png)", ""]
    with AtomicFile(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------
# The command


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch threads {threads}, {gpu}, torch {torch.__version__}"


def run(cfg: ReproduceConfig, out: Path, *, command: str, status: str, resume: bool = True) -> dict[str, Any]:
    """Train and evaluate everything ``cfg`` asks for; write the report into ``out``; return it.

    With ``resume``, stages already finished in ``out`` by a run of the same config and teacher are reused
    (:class:`StageRecords`); the report lists them under ``resumed_stages``.
    """
    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.export import export_checkpoint

    teacher = toy_teacher_folder(cfg.teacher, "reproduce")
    if cfg.teacher is not None:
        cfg = replace(cfg, teacher=str(teacher))  # the absolute path, for every stage
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    record = read_checkpoint(teacher)
    clip_frames = cfg.num_frames or record.settings.geometry.num_frames
    pixel_frames = record.build_codec().num_pixel_frames(clip_frames)
    evaluator = Evaluator(cfg, pixel_frames)
    records = StageRecords(out, run_fingerprint(cfg, teacher), resume=resume)
    from sfvideo.metrics.toy import FRAME_METRICS

    report: dict[str, Any] = {
        "status": status,
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "teacher": str(teacher),
        "clip_frames": clip_frames,
        "config": asdict(cfg),
        "curve_metrics": [m for m in FRAME_METRICS if m not in ("brightness_error", "saturation_error")],
        "results": {},
    }
    banner("teacher (reference)")
    teacher_entry = records.load("teacher")
    if teacher_entry is None:
        teacher_engine, _ = evaluation_engine(teacher, sampling_steps=cfg.sampling_steps, num_frames=clip_frames)
        teacher_entry = {"horizon": evaluator.horizon(teacher_engine), "kind": "teacher"}
        records.save("teacher", teacher_entry)
        del teacher_engine
    needs_ode = any(PARADIGMS[p].kind == "distillation" for p in cfg.paradigms)
    for fpc in cfg.frames_per_chunk:
        results: dict[str, Any] = {TEACHER_LABEL: teacher_entry}
        ode_dir = None
        stages: list[tuple[str, Paradigm]] = ([("ode", ODE)] if needs_ode else []) + [
            (k, PARADIGMS[k]) for k in cfg.paradigms]
        for key, paradigm in stages:
            banner(f"{_chunking(fpc)}: {paradigm.label} ({paradigm.config})")
            name = f"{key}_f{fpc}"
            entry = records.load(name)
            if entry is not None and (paradigm.kind != "ode" or Path(entry["export"]).is_dir()):
                if paradigm.kind == "ode":
                    ode_dir = Path(entry["export"])
                results[paradigm.label] = entry
                continue
            trained = train_stage(cfg, out, key, paradigm, fpc, clip_frames, pixel_frames, ode_dir)
            if paradigm.kind == "ode":
                ode_dir = export_checkpoint(trained["checkpoint"], out / "exports" / f"ode_f{fpc}", overwrite=True)
            engine, ema = evaluation_engine(trained["checkpoint"], sampling_steps=cfg.sampling_steps)
            clock = clock_summary(trained["clock"])
            entry: dict[str, Any] = {"key": key, "config": f"configs/toy/{paradigm.config}", "kind": paradigm.kind,
                                     "ema": ema, "training": clock, "stage_seconds": trained["stage_seconds"]}
            entry["horizon"] = evaluator.horizon(engine)
            entry["extrapolation"] = evaluator.extrapolate(engine, clip_frames, fpc)
            if paradigm.kind != "ode":
                entry["wallclock"] = [
                    {"generator_steps": s["generator_steps"], "seconds": s["seconds"],
                     **evaluator.snapshot(s["path"], cfg.sampling_steps)} for s in clock["snapshots"]
                ] + [{"generator_steps": clock["generator_updates"], "seconds": clock["train_seconds"], "ema": ema,
                      **entry["horizon"]["train"]["per_seed"][0]}]
            if paradigm.kind == "ode":
                entry["export"] = str(ode_dir)
            records.save(name, entry)
            results[paradigm.label] = entry
        report["results"][str(fpc)] = results
        plot_accumulation(results, fpc, out / f"accumulation_f{fpc}.png", tuple(report["curve_metrics"]))
        plot_extrapolation(results, fpc, out / f"extrapolation_f{fpc}.png")
    report["total_minutes"] = (time.perf_counter() - start) / 60  # this invocation's (see resumed_stages)
    report["resumed_stages"] = records.reused
    plot_figure6(report, out / "figure6.png")
    with AtomicFile(out / "reproduction.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_markdown(report, out / "reproduction.md")
    return report


QUICK_STATUS = ("**Smoke run (`--quick`): every stage for a few steps. These numbers measure nothing about the "
                "paradigms; they only show that the pipeline runs.**")
FULL_STATUS = "Full run (`configs/toy/reproduce.yaml`): the budget below, measured on the machine below."
CUSTOM_STATUS = "Run of a custom config (`{config}`): the budget below, measured on the machine below."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sfvideo reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help="run config (default: configs/toy/reproduce.yaml, or reproduce_quick.yaml with --quick)")
    p.add_argument("--quick", action="store_true", help="every stage for a few steps (a smoke run, as the tests do)")
    p.add_argument("--out", default="lightning_logs/reproduce", help="folder for runs, report, plots and JSON")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every stage (default: reuse the stages a run of the same config and teacher "
                        "already finished in --out, i.e. resume an interrupted run)")
    p.add_argument("--teacher", default=None,
                   help="exported teacher folder to run from (default: the config's `teacher`, else the shipped one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the config, the value as YAML (repeatable), e.g. "
                        "--set frames_per_chunk=[3]")
    args = p.parse_args(argv)
    config = args.config or config_path("reproduce_quick.yaml" if args.quick else "reproduce.yaml")
    try:
        cfg = load_config(config, args.overrides)
    except ValueError as e:
        p.error(str(e).splitlines()[0])
    if args.teacher is not None:
        cfg = replace(cfg, teacher=args.teacher)
    command = "sfvideo reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.quick:
        status = QUICK_STATUS
    elif args.config is None and not args.overrides:
        status = FULL_STATUS
    else:
        status = CUSTOM_STATUS.format(config=" with ".join(
            [args.config or "configs/toy/reproduce.yaml"] + ([", ".join(args.overrides)] if args.overrides else [])))
    report = run(cfg, Path(args.out), command=command.strip(), status=status, resume=not args.fresh)
    print(f"\nreport: {Path(args.out) / 'reproduction.md'}  ({report['total_minutes']:.1f} min)")


if __name__ == "__main__":
    main()
