"""Exact metrics of the toy world (its "VBench"): what a generated video got right, per video and per frame index.

Videos ``(B, T, 3, H, W)`` in [-1, 1] are judged against the attributes of their prompts (``toy/world.py``) with
plain image analysis, no learned weights. Per frame ``t``:

1. Foreground = pixels farther than ``fg_threshold`` (L2, RGB) from the prompt's background colour; its
   8-connected components with at least ``min_blob_area`` pixels are the *blobs*.
2. Each blob's colour = mean of its core pixels (those at >= ``core_fraction`` of the blob's largest distance to the
   background), classified to the nearest palette colour.
3. Object matching: one-object prompts take the largest blob whatever its colour; two-object prompts take, per
   object, the largest blob of that object's colour (the world guarantees distinct colours and non-touching objects).
4. Per matched blob, soft coverage ``clamp(<x - bg, c - bg> / |c - bg|², 0, 1)`` over the blob dilated by one pixel
   gives area, centroid, width = sum over columns of the column-max coverage, height likewise, and fill ratio
   area / (width · height): shape = nearest of the fill ratios the world's own renders have (about square 1,
   circle 0.8, triangle 0.6).

Metrics (``ToyVideoMetrics.compute()`` keys; curves are ``<name>_curve``, shape ``(T,)``):

- ``colour_acc``: matched blob has the prompted colour (mean over objects).
- ``shape_acc``: matched blob has the prompted shape.
- ``persistence``: exactly as many blobs as objects, each matched, width and height within ``size_tolerance``
  (relative) of the world's ``object_size``.
- ``motion_acc`` (per step t-1 -> t, curve entry 0 is NaN): the centroid moves along the prompted axis
  (perpendicular step <= ``perp_tolerance`` px, step <= 1.5·max speed + 0.5) with the expected sign and at least
  half the minimum speed. The expected sign starts as the prompted direction and may flip only when the object is
  within reach of a wall (centre within s/2 + s/6 + max speed + 1 px of it) after the first
  ``min_frames_before_bounce`` steps (the world guarantees no bounce before), which accounts for bounces; steps
  within reach of a wall need no minimum displacement (a bounce can cancel a step).
- ``direction_acc`` (per video only): displacement over the first ``min_frames_before_bounce`` frames points in the
  prompted direction (>= half the minimum speed per frame, perpendicular part <= half of it).
- ``background_fidelity``: fraction of pixels outside the (dilated) matched objects whose largest channel error
  to the background colour is <= ``bg_tolerance``.
- ``flicker`` (lower is better; per step, entry 0 NaN): mean absolute change of the pixels outside the objects
  of both frames, i.e. change the motion does not explain. 0 for real videos.
- ``brightness_error`` / ``saturation_error``: frame mean luma (BT.601) / chroma (max - min of RGB) on the [0, 1]
  scale minus that of the prompt's reference frame. Curves are signed; per-video values are mean absolute errors.
- ``brightness_drift`` / ``saturation_drift``: FramePack-style ΔDrift of the signed curves, mean of the last 15 %
  of frames minus mean of the first 15 % (positive: brighter / more saturated at the end, CausVid's failure).

Per-video values average a video's frames; the reported scalars average videos. Real world videos score 1.0 on the
accuracies and ~0 on errors (tests check >= 0.95). This module does not know about encoders or FVD-like distances
(``toy/features.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from sfvideo.toy.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    FrameTruth,
    SceneAttributes,
    ToyWorldConfig,
    parse_prompt,
    render_truth,
)

FRAME_METRICS: tuple[str, ...] = (
    "colour_acc",
    "shape_acc",
    "persistence",
    "motion_acc",
    "background_fidelity",
    "flicker",
    "brightness_error",
    "saturation_error",
)
"""Metrics with a per-frame-index curve, in state order."""
VIDEO_METRICS: tuple[str, ...] = FRAME_METRICS + ("direction_acc",)
"""Metrics with a per-video value, in state order."""
_SIGNED = ("brightness_error", "saturation_error")  # per-video value = mean |error|, curve = signed mean
_PALETTE_NAMES = tuple(COLOURS)
_LUMA = (0.299, 0.587, 0.114)


def _luma_saturation(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame mean luma (BT.601) and chroma on the [0, 1] scale; ``frames (T, 3, H, W)`` in [-1, 1].

    Saturation is measured as chroma ``max(rgb) - min(rgb)``: HSV's ``(max - min) / max`` explodes on the dark
    background under tiny noise.
    """
    x = ((frames.float() + 1) / 2).clamp(0, 1)
    luma = torch.einsum("tchw,c->thw", x, x.new_tensor(_LUMA))
    chroma = x.amax(dim=1) - x.amin(dim=1)
    return luma.mean(dim=(1, 2)), chroma.mean(dim=(1, 2))


@functools.lru_cache(maxsize=4096)
def _reference_stats(attrs: SceneAttributes, config: ToyWorldConfig) -> tuple[float, float]:
    """Mean luma and saturation of a frame of the scene: objects at fixed, non-touching places.

    Frame statistics do not depend on object positions (objects never leave the frame or touch), up to
    anti-aliasing of the edges (< 1e-3 here).
    """
    n = len(attrs.objects)
    xs = [config.width * (k + 1) / (n + 1) for k in range(n)]
    centres = torch.tensor([[[x, config.height / 2] for x in xs]])  # (1, N, 2)
    truth = FrameTruth(
        centres=centres,
        velocities=torch.zeros_like(centres),
        colours=torch.tensor([COLOURS[o.colour] for o in attrs.objects]),
        size=float(config.object_size),
        background=torch.tensor(BACKGROUNDS[attrs.background]),
        shapes=tuple(o.shape for o in attrs.objects),
    )
    luma, sat = _luma_saturation(render_truth(truth, config))
    return float(luma[0]), float(sat[0])


def _components(fg: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of ``fg (T, H, W)`` bool: 0 off the foreground, else ids unique per video."""
    t, h, w = fg.shape
    ids = torch.arange(1, t * h * w + 1, dtype=torch.float64, device=fg.device).view(t, 1, h, w)
    mask = fg.unsqueeze(1).to(torch.float64)
    labels = ids * mask
    # Propagate the largest id through each component (float64 holds these integers exactly).
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.squeeze(1).long()


def _soft_extent(
    diff: torch.Tensor, colour_minus_bg: torch.Tensor, region: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft coverage of one object per frame and its area, width and height.

    Args:
        diff: ``(T, 3, H, W)`` frames minus the background colour.
        colour_minus_bg: ``(T, 3)`` object colour minus the background colour.
        region: ``(T, H, W)`` bool, where the object may be.

    Returns:
        ``cov (T, H, W)`` in [0, 1], ``area (T,)`` (>= 1e-6), ``width (T,)`` = sum over columns of the column-max
        coverage, ``height (T,)`` likewise over rows.
    """
    t = diff.shape[0]
    norm2 = colour_minus_bg.pow(2).sum(1).clamp_min(1e-6).view(t, 1, 1)
    cov = (torch.einsum("tchw,tc->thw", diff, colour_minus_bg) / norm2).clamp(0, 1) * region
    return cov, cov.sum(dim=(1, 2)).clamp_min(1e-6), cov.amax(dim=1).sum(dim=1), cov.amax(dim=2).sum(dim=1)


@functools.lru_cache(maxsize=16)
def _fill_reference(config: ToyWorldConfig) -> tuple[float, ...]:
    """Mean fill ratio of each shape in ``SHAPES`` as the world renders it (over a fixed grid of sub-pixel offsets).

    Rasterised edges move the fill ratio away from its continuous value (triangle ~0.6 rather than 0.5), so the
    references are measured, not assumed.
    """
    offsets = torch.linspace(0, 1, 5)[:-1]
    grid = torch.cartesian_prod(offsets, offsets)  # (16, 2) sub-pixel offsets
    centres = (grid + torch.tensor([config.width // 2, config.height // 2])).view(-1, 1, 2)
    bg, colour = torch.tensor(BACKGROUNDS["dark"]), torch.tensor(COLOURS["red"])
    refs = []
    for shape in SHAPES:
        truth = FrameTruth(
            centres, torch.zeros_like(centres), colour.view(1, 3), float(config.object_size), bg, (shape,)
        )
        diff = render_truth(truth, config) - bg.view(1, 3, 1, 1)
        t = diff.shape[0]
        _, a, w, h = _soft_extent(diff, (colour - bg).expand(t, 3), torch.ones(t, *diff.shape[-2:], dtype=torch.bool))
        refs.append(float((a / (w * h)).mean()))
    return tuple(refs)


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """One-pixel (3x3) dilation of ``mask (..., H, W)`` bool."""
    shape = mask.shape
    m = mask.reshape(-1, 1, *shape[-2:]).float()
    return (F.max_pool2d(m, 3, stride=1, padding=1) > 0).reshape(shape)


class ToyVideoAnalyser:
    """Per-frame measurements of toy-world videos (the engine behind ``ToyVideoMetrics``)."""

    def __init__(
        self,
        config: ToyWorldConfig | None = None,
        fg_threshold: float = 0.75,
        min_blob_area: int = 3,
        core_fraction: float = 0.9,
        size_tolerance: float = 0.25,
        perp_tolerance: float = 0.5,
        bg_tolerance: float = 0.1,
    ) -> None:
        """
        Args:
            config: the world the prompts live in (object size, speeds).
            fg_threshold: L2 RGB distance to the background above which a pixel is foreground (palette colours are
                >= 1.5 away, so 0.75 is coverage ~1/2).
            min_blob_area: components smaller than this (pixels) are ignored as specks.
            core_fraction: share of a blob's largest background distance that marks its core (colour) pixels.
            size_tolerance: relative tolerance of a blob's width and height to ``config.object_size``.
            perp_tolerance: largest centroid step (px) across the motion axis.
            bg_tolerance: largest per-channel error for a background pixel to count as correct.
        """
        self.config = config or ToyWorldConfig()
        self.fg_threshold = fg_threshold
        self.min_blob_area = min_blob_area
        self.core_fraction = core_fraction
        self.size_tolerance = size_tolerance
        self.perp_tolerance = perp_tolerance
        self.bg_tolerance = bg_tolerance
        self.fill_reference = torch.tensor(_fill_reference(self.config))
        """Measured fill ratio per shape of ``SHAPES``; a blob's shape is the nearest."""

    @torch.no_grad()
    def analyse(self, video: torch.Tensor, attrs: SceneAttributes | str) -> dict[str, torch.Tensor]:
        """Measure one video.

        Args:
            video: ``(T, 3, H, W)`` in [-1, 1].
            attrs: the prompt or its attributes.

        Returns:
            ``{name: (T,) float}`` for ``FRAME_METRICS`` (NaN where undefined) and ``{"direction_acc": ()}``,
            plus ``"centroids"`` ``(T, N, 2)`` (x, y; NaN where the object is missing) and ``"shapes"`` ``(T, N)``
            (index into ``SHAPES``, -1 when missing).
        """
        if isinstance(attrs, str):
            attrs = parse_prompt(attrs)
        if video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"video must be (T, 3, H, W), got {tuple(video.shape)}")
        cfg = self.config
        x = video.detach().float().cpu()
        t_len, _, h, w = x.shape
        n_obj = len(attrs.objects)
        s = float(cfg.object_size)
        bg = torch.tensor(BACKGROUNDS[attrs.background])
        palette = torch.tensor([COLOURS[c] for c in _PALETTE_NAMES])  # (K_pal, 3)

        # 1. Foreground blobs.
        diff = x - bg.view(1, 3, 1, 1)
        dist = diff.norm(dim=1)  # (T, H, W)
        fg = dist > self.fg_threshold
        labels = _components(fg)
        uniq, comp = torch.unique(labels, return_inverse=True)  # comp: (T, H, W) in [0, K]
        k = uniq.numel()
        flat = comp.flatten()
        frame_of_pixel = torch.arange(t_len).view(t_len, 1, 1).expand(t_len, h, w).flatten()
        comp_frame = torch.zeros(k, dtype=torch.long).scatter_reduce(0, flat, frame_of_pixel, "amax")
        area = torch.bincount(flat, minlength=k)
        is_blob = (uniq != 0) & (area >= self.min_blob_area)
        blobs_per_frame = torch.zeros(t_len, dtype=torch.long).index_add_(0, comp_frame, is_blob.long())

        # 2. Blob colours from core pixels, nearest palette colour.
        max_dist = torch.zeros(k).scatter_reduce(0, flat, dist.flatten(), "amax")
        core = (dist.flatten() >= self.core_fraction * max_dist[flat]) & (labels.flatten() != 0)
        pix = x.permute(0, 2, 3, 1).reshape(-1, 3)
        col_sum = torch.zeros(k, 3).index_add_(0, flat[core], pix[core])
        col_n = torch.zeros(k).index_add_(0, flat[core], torch.ones(int(core.sum())))
        blob_colour = col_sum / col_n.clamp_min(1).unsqueeze(1)
        blob_label = torch.cdist(blob_colour, palette).argmin(dim=1)  # (K,)

        # 3. Object matching: the largest eligible blob per frame.
        comp_ids = torch.arange(k)
        colour_ok = torch.zeros(t_len, n_obj, dtype=torch.bool)
        shape_ok = torch.zeros(t_len, n_obj, dtype=torch.bool)
        size_ok = torch.zeros(t_len, n_obj, dtype=torch.bool)
        found = torch.zeros(t_len, n_obj, dtype=torch.bool)
        centroids = torch.full((t_len, n_obj, 2), float("nan"))
        shape_idx = torch.full((t_len, n_obj), -1, dtype=torch.long)
        objects_region = torch.zeros(t_len, h, w, dtype=torch.bool)
        shape_names, fill_ref = SHAPES, self.fill_reference
        ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
        for o, obj in enumerate(attrs.objects):
            want = _PALETTE_NAMES.index(obj.colour)
            eligible = is_blob if n_obj == 1 else is_blob & (blob_label == want)
            score = torch.where(eligible, area, -1)
            best = torch.full((t_len,), -1, dtype=torch.long).scatter_reduce(0, comp_frame, score, "amax")
            cand = torch.where(eligible & (score == best[comp_frame]), comp_ids, k)
            sel = torch.full((t_len,), k, dtype=torch.long).scatter_reduce(0, comp_frame, cand, "amin")
            has = sel < k
            found[:, o] = has
            sel_c = sel.clamp_max(k - 1)
            colour_ok[:, o] = has & (blob_label[sel_c] == want)
            # 4. Soft coverage over the dilated blob, using the blob's own colour (robust to colour errors).
            mask = (comp == sel_c.view(t_len, 1, 1)) & has.view(t_len, 1, 1)
            region = _dilate(mask)
            objects_region |= region
            cov, a, width, height = _soft_extent(diff, blob_colour[sel_c] - bg, region)
            centroids[:, o, 0] = torch.where(has, (cov * xs).sum(dim=(1, 2)) / a, float("nan"))
            centroids[:, o, 1] = torch.where(has, (cov * ys).sum(dim=(1, 2)) / a, float("nan"))
            fill = a / (width * height).clamp_min(1e-6)
            pred = (fill.view(-1, 1) - fill_ref.view(1, -1)).abs().argmin(dim=1)
            shape_idx[:, o] = torch.where(has, pred, -1)
            shape_ok[:, o] = has & (pred == shape_names.index(obj.shape))
            tol = self.size_tolerance * s
            size_ok[:, o] = has & ((width - s).abs() <= tol) & ((height - s).abs() <= tol)

        nan = torch.full((t_len,), float("nan"))
        out: dict[str, torch.Tensor] = {
            "colour_acc": colour_ok.float().mean(1),
            "shape_acc": shape_ok.float().mean(1),
            "persistence": ((blobs_per_frame == n_obj) & size_ok.all(1)).float(),
        }

        # 5. Motion, bounce-aware; and the initial direction.
        v_min, v_max = cfg.speed_range
        wall_reach = s / 2 + s / 6 + v_max + 1  # triangle centroids sit s/6 below the box centre
        motion = torch.zeros(t_len - 1, n_obj) if t_len > 1 else torch.zeros(0, n_obj)
        direction = torch.zeros(n_obj)
        for o, obj in enumerate(attrs.objects):
            dx, dy = DIRECTIONS[obj.direction]
            axis, sign0 = (0, dx) if dx != 0 else (1, dy)
            extent = w if axis == 0 else h
            c = centroids[:, o]
            expected = sign0
            kf = min(cfg.min_frames_before_bounce, t_len - 1)
            for t in range(1, t_len):
                if not (found[t, o] and found[t - 1, o]):
                    continue
                step = c[t] - c[t - 1]
                along, perp = float(step[axis]), float(step[1 - axis])
                pos = (float(c[t, axis]), float(c[t - 1, axis]))
                # The world guarantees no bounce during the first kf steps, so walls excuse nothing there.
                near_wall = t > kf and any(min(p, extent - p) <= wall_reach for p in pos)
                plausible = abs(perp) <= self.perp_tolerance and abs(along) <= 1.5 * v_max + 0.5
                if near_wall:
                    ok = plausible
                    if ok and abs(along) >= 0.5 * v_min:
                        expected = 1 if along > 0 else -1
                else:
                    ok = plausible and along * expected >= 0.5 * v_min
                motion[t - 1, o] = float(ok)
            if kf > 0 and found[0, o] and found[kf, o]:
                disp = c[kf] - c[0]
                along, perp = float(disp[axis]) * sign0, abs(float(disp[1 - axis]))
                direction[o] = float(along >= 0.5 * v_min * kf and perp <= max(self.perp_tolerance, along / 2))
        out["motion_acc"] = torch.cat([nan[:1], motion.mean(1)]) if t_len > 1 else nan

        # 6. Background fidelity and unexplained change.
        bg_pix = ~objects_region
        good = (diff.abs().amax(dim=1) <= self.bg_tolerance) & bg_pix
        out["background_fidelity"] = good.float().sum((1, 2)) / bg_pix.float().sum((1, 2)).clamp_min(1)
        if t_len > 1:
            static = ~(objects_region[1:] | objects_region[:-1])  # (T-1, H, W)
            change = (x[1:] - x[:-1]).abs().mean(dim=1)
            flick = (change * static).sum((1, 2)) / static.float().sum((1, 2)).clamp_min(1)
            out["flicker"] = torch.cat([nan[:1], flick])
        else:
            out["flicker"] = nan

        # 7. Brightness and saturation against the prompt's reference frame.
        luma, sat = _luma_saturation(x)
        ref_luma, ref_sat = _reference_stats(attrs, cfg)
        out["brightness_error"] = luma - ref_luma
        out["saturation_error"] = sat - ref_sat
        out["direction_acc"] = direction.mean()
        out["centroids"] = centroids
        out["shapes"] = shape_idx
        return out


def _video_values(res: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One analysed video -> ``(curves (len(FRAME_METRICS), T), values (len(VIDEO_METRICS),))`` in float64: the
    per-frame curves (NaN where undefined) and the per-video values (mean of the defined frames; mean absolute
    error for the signed metrics)."""
    curves = torch.stack([res[n] for n in FRAME_METRICS]).to(torch.float64)
    per_video = []
    for i, name in enumerate(FRAME_METRICS):
        vals = curves[i][~curves[i].isnan()]
        per_video.append((vals.abs() if name in _SIGNED else vals).mean())
    per_video.append(res["direction_acc"].to(torch.float64))
    return curves, torch.stack(per_video)


def per_video_metrics(
    videos: torch.Tensor,
    prompts: Sequence[str | SceneAttributes],
    analyser: ToyVideoAnalyser | None = None,
) -> dict[str, torch.Tensor]:
    """The metrics of ``ToyVideoMetrics`` per video and per frame, unaggregated (what intervals resample).

    Args:
        videos: ``(B, T, 3, H, W)`` in [-1, 1], any length ``T``.
        prompts: one per video.
        analyser: thresholds and world (default ``ToyVideoAnalyser()``).

    Returns:
        ``{name: (B,)}`` for ``VIDEO_METRICS`` (as each video enters ``ToyVideoMetrics``: its mean over its
        defined frames) and ``{name + "_curve": (B, T)}`` for ``FRAME_METRICS`` (NaN where undefined, e.g. frame 0
        of the step metrics), float64. Averaging the values over videos gives ``ToyVideoMetrics.compute()``.
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"per_video_metrics: videos must be (B, T, 3, H, W), got {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"per_video_metrics: {videos.shape[0]} videos but {len(prompts)} prompts")
    analyser = analyser or ToyVideoAnalyser()
    rows = [_video_values(analyser.analyse(v, p)) for v, p in zip(videos, prompts, strict=True)]
    curves = torch.stack([c for c, _ in rows])  # (B, M, T)
    values = torch.stack([v for _, v in rows])  # (B, M')
    out = {name: values[:, i] for i, name in enumerate(VIDEO_METRICS)}
    out.update({f"{name}_curve": curves[:, i] for i, name in enumerate(FRAME_METRICS)})
    return out


class ToyVideoMetrics(Metric):
    """Toy-world metrics over a dataset of generated videos, with per-frame-index curves.

    ``update(videos (B, T, 3, H, W), prompts)``; ``compute()`` returns ``{name: scalar}`` (mean over videos) for
    ``VIDEO_METRICS``, ``{name + "_curve": (T,)}`` for ``FRAME_METRICS`` (mean over videos per frame index; NaN at
    index 0 for the step metrics ``motion_acc`` and ``flicker``), and ``brightness_drift`` / ``saturation_drift``.
    States are sums and counts reduced with ``sum``, so the metric syncs across ranks.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(
        self,
        world: ToyWorldConfig | None = None,
        num_frames: int | None = None,
        drift_fraction: float = 0.15,
        analyser: ToyVideoAnalyser | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            world: world of the prompts (default ``ToyWorldConfig()``).
            num_frames: frames per video (default ``world.num_frames``); fixed because curves are summed per index.
            drift_fraction: share of frames at each end compared by the drift summaries.
            analyser: custom thresholds (its ``config`` must be ``world``).
            **kwargs: ``torchmetrics.Metric`` options.
        """
        super().__init__(**kwargs)
        self.world = world or ToyWorldConfig()
        self.num_frames = num_frames or self.world.num_frames
        self.drift_fraction = drift_fraction
        self.analyser = analyser or ToyVideoAnalyser(self.world)
        nf, nv = len(FRAME_METRICS), len(VIDEO_METRICS)
        self.add_state("frame_sum", torch.zeros(nf, self.num_frames, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frame_count", torch.zeros(nf, self.num_frames, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("video_sum", torch.zeros(nv, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("video_count", torch.zeros(nv, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, prompts: Sequence[str | SceneAttributes]) -> None:
        if videos.dim() != 5 or videos.shape[2] != 3:
            raise ValueError(f"ToyVideoMetrics.update: videos must be (B, T, 3, H, W), got {tuple(videos.shape)}")
        if videos.shape[1] != self.num_frames:
            raise ValueError(
                f"ToyVideoMetrics.update: videos have {videos.shape[1]} frames, the metric was built for "
                f"num_frames={self.num_frames}"
            )
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"ToyVideoMetrics.update: {videos.shape[0]} videos but {len(prompts)} prompts")
        dev = self.frame_sum.device
        for video, prompt in zip(videos, prompts, strict=True):
            curves, pv = _video_values(self.analyser.analyse(video, prompt))
            curves, pv = curves.to(dev), pv.to(dev)
            valid = ~curves.isnan()
            self.frame_sum += torch.where(valid, curves, 0)
            self.frame_count += valid
            ok = ~pv.isnan()
            self.video_sum += torch.where(ok, pv, 0)
            self.video_count += ok

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        means = self.video_sum / self.video_count
        for i, name in enumerate(VIDEO_METRICS):
            out[name] = means[i].float()
        curves = (self.frame_sum / self.frame_count).float()
        for i, name in enumerate(FRAME_METRICS):
            out[f"{name}_curve"] = curves[i]
        k = max(1, round(self.drift_fraction * self.num_frames))
        for name, key in (("brightness_drift", "brightness_error"), ("saturation_drift", "saturation_error")):
            c = out[f"{key}_curve"]
            out[name] = c[-k:].nanmean() - c[:k].nanmean()
        return out
