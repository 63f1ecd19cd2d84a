"""Scoring generated videos (the toy world's exact metrics); sampling itself is ``sfvideo.inference``.

- :func:`score_toy_videos`: the toy world's exact metrics (``sfvideo.metrics.toy``) plus the feature-space
  distance to real videos (``sfvideo.toy.features``), for one set of generated videos. It is the evaluation
  callback's ``scorer`` in ``configs/toy/dmd.yaml`` and the demo's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

METRIC_LABELS: dict[str, str] = {
    "colour_acc": "colour↑",
    "shape_acc": "shape↑",
    "direction_acc": "direction↑",
    "motion_acc": "motion↑",
    "persistence": "persist↑",
    "background_fidelity": "bg↑",
    "flicker": "flicker↓",
    "brightness_drift": "drift",
    "fd_ratio": "FD/real↓",
    "kd_diff": "KD−real↓",
    "seconds_per_video": "s/video",
}
"""Column titles of the toy metrics in every table (demo, reproduce, probe-teacher), arrows giving the better side."""


def score_toy_videos(
    videos: torch.Tensor,
    prompts: Sequence[str],
    *,
    world: Any = None,
    reference: torch.Tensor | None = None,
    features: Any = None,
) -> dict[str, Any]:
    """Toy-world metrics of ``videos (B, T, 3, H, W)`` in [-1, 1]; with ``reference`` real videos, also the
    feature-space Fréchet distance ratio to real-vs-real (see ``sfvideo.toy.features``)."""
    from sfvideo.metrics.toy import ToyVideoMetrics

    metric = ToyVideoMetrics(world=world, num_frames=videos.shape[1])  # curves of any length
    metric.update(videos.float().cpu(), list(prompts))
    scores = {k: v for k, v in metric.compute().items()}
    if reference is not None and features is not None:
        scores.update(features(videos.float().cpu(), reference.float().cpu()))
    return scores


def evaluation_engine(
    source: Any,
    *,
    sampling_steps: int | None = None,
    num_frames: int | None = None,
    use_ema: bool | None = None,
    guidance_scale: float | None = None,
    context_noise: float | None = None,
) -> tuple[Any, bool]:
    """The inference engine that evaluates a checkpoint, and whether it runs EMA weights.

    Args:
        source: A Lightning checkpoint or export folder (path), or a ``checkpoints.Checkpoint`` already read.
        sampling_steps: Steps of a many-step sampler (``euler``, ``causal_cfg``) instead of the recorded ones; a
            few-step generator keeps its step list.
        num_frames: Clip length instead of the recorded one (extrapolation).
        use_ema: None = a Lightning checkpoint's EMA weights where it has them (an export's weights are what was
            exported); True / False forces the choice.
        guidance_scale: Classifier-free guidance of a many-step sampler instead of the recorded one (in the recorded
            ``guidance`` convention).
        context_noise: Timestep of the KV-cache refresh instead of the recorded one (the engine refuses a non-zero
            one for samplers that refresh with clean context).
    """
    from dataclasses import replace

    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.inference import InferenceEngine

    ckpt = read_checkpoint(source) if not hasattr(source, "settings") else source
    settings = ckpt.settings
    if settings is None:
        raise ValueError(f"{ckpt.path} records no inference settings")
    many_step = settings.sampler in ("euler", "causal_cfg")  # few-step generators keep their step list
    if sampling_steps is not None and many_step:
        settings = replace(settings, sampling=replace(settings.sampling, num_steps=sampling_steps))
    if guidance_scale is not None:
        if not many_step:
            raise ValueError(f"{ckpt.path}: guidance_scale applies to many-step samplers, not {settings.sampler!r}")
        settings = replace(settings, sampling=replace(settings.sampling, guidance_scale=guidance_scale))
    if context_noise is not None:
        settings = replace(settings, context_noise=context_noise)
    if num_frames is not None and num_frames != settings.geometry.num_frames:
        settings = replace(settings, geometry=replace(settings.geometry, num_frames=num_frames))
    if use_ema is None:
        use_ema = ckpt.kind == "lightning" and ckpt.network is not None and ckpt.ema_state(ckpt.network) is not None
    return InferenceEngine.from_checkpoint(ckpt, settings=settings, use_ema=use_ema), use_ema


def toy_eval_prompts(num: int, seed: int) -> dict[str, list[str]]:
    """``num`` prompts per split (``train``, ``heldout``), drawn uniformly with replacement from each pool."""
    from sfvideo.toy.world import heldout_prompts, train_prompts

    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, pool in (("train", train_prompts()), ("heldout", heldout_prompts())):
        idx = torch.randint(len(pool), (num,), generator=g).tolist()
        out[split] = [pool[i] for i in idx]
    return out


def real_toy_features(
    prompts: Sequence[str], features: Any, world: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two independent real sets for ``prompts`` (scene seeds 10000+i and 20000+i): the reference of
    the FD and the real-vs-real floor. ``world``: a ``toy.world.ToyWorldConfig`` (default: the default world)."""
    from sfvideo.toy.world import ToyWorldConfig, render_batch

    n = len(prompts)
    world = world or ToyWorldConfig()
    with torch.no_grad():
        real = features.features(render_batch(list(prompts), [10_000 + i for i in range(n)], world))
        ref = features.features(render_batch(list(prompts), [20_000 + i for i in range(n)], world))
    return real, ref


def evaluate_toy_engine(
    engine: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    features: Any,
    real: tuple[torch.Tensor, torch.Tensor],
) -> tuple[dict[str, float], torch.Tensor]:
    """Generate one video per prompt with ``engine`` (seeded ``seed``) and score it: the exact toy metrics,
    FD/KD against ``real`` (from :func:`real_toy_features`) and ``seconds_per_video``. Returns
    ``(scalar scores, videos (B, T, 3, H, W) in [-1, 1])``."""
    import time

    from sfvideo.toy.features import distance_report

    t0 = time.perf_counter()
    with torch.no_grad():
        latents = engine.generate(list(prompts), seed=seed)
    seconds = time.perf_counter() - t0
    video = engine.decode(latents).clamp(-1, 1)
    scores = {k: float(v) for k, v in score_toy_videos(video, prompts).items() if torch.as_tensor(v).numel() == 1}
    with torch.no_grad():
        dist = distance_report(features.features(video), *real)
    scores.update({k: float(v) for k, v in dist.items() if torch.as_tensor(v).numel() == 1})
    scores["seconds_per_video"] = seconds / len(prompts)
    return scores, video
