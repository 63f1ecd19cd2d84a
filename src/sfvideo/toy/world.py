"""The toy world: a procedural, exactly measurable text-to-video domain that trains on a laptop CPU.

A scene is one or two flat-coloured shapes moving over a uniform background, described by a compositional prompt::

    "a red circle moving left on a dark background"
    "a red circle moving left and a blue square moving up on a light background"

Vocabulary: ``COLOURS`` (6), ``SHAPES`` (circle, square, triangle), ``DIRECTIONS`` (left, right, up, down),
``BACKGROUNDS`` (dark, light). Grammar (whitespace-separated, case-insensitive, strict)::

    prompt := object ["and" object] "on" "a" background "background"
    object := "a" colour shape "moving" direction

Physics (exact, closed form, per object):

- Pixel ``(i, j)`` (row, column) covers ``[j, j+1) x [i, i+1)``; positions are in pixels, ``x`` to the right and
  ``y`` downwards, so "up" is ``-y``. The object centre is the centre of its ``object_size``-pixel bounding box.
- Constant speed ``v`` (pixels per frame) along one axis, drawn uniformly from ``speed_range``; the other axis is
  fixed. The direction word is the direction of motion **at frame 0**.
- Elastic bounces: the bounding box stays inside the frame, i.e. the centre is reflected inside
  ``[s/2, size - s/2]`` (a triangle wave in time), so the velocity sign flips at each wall.
- The start position along the motion axis leaves room for at least ``min_frames_before_bounce`` frames of
  motion before the first bounce, so the direction word is visible in the first frames; the fixed coordinate is
  uniform over its valid range.
- Two-object scenes are redrawn (same generator, up to ``max_layout_tries``) until the two bounding boxes stay at
  least ``min_gap`` pixels apart in every frame: objects never touch, so every frame is exactly measurable.
  The two objects of a scene must have different colours (the metrics tell them apart by colour).

Rendering: per-pixel coverage of the shape (``antialias`` x ``antialias`` supersampling; 1 = hard edges), then
``frame = bg (1 - cov) + colour cov`` per object in prompt order. Output ``(T, 3, H, W)`` in [-1, 1].
Shapes (s = ``object_size``): square = the box; circle = disc of diameter s; triangle = isosceles, apex up,
base s at the bottom edge of the box, height s.

Determinism: ``render(attrs, seed)`` draws everything from ``torch.Generator().manual_seed(seed)`` (CPU float32
arithmetic only), so the same seed gives the same scene everywhere: bit-identical on the same machine and thread
count, equal to fp32 rounding across machines (vectorised reductions depend on the instruction set).

Held-out split: the (colour, shape) pairs in ``HELDOUT_PAIRS`` never occur in ``train_prompts()`` (every colour and
every shape still does); a two-object scene is held out if either object is.

This module knows nothing about text embeddings, latents or metrics (see ``toy/encoders.py``, ``metrics/toy.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

# Colours and backgrounds as RGB in [-1, 1]. Every pair of palette colours differs by 1.6 in at least one channel
# and every colour is >= 1.5 (L2) from both backgrounds, so nearest-colour classification has wide margins.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, -0.7, -0.7),
    "green": (-0.7, 0.9, -0.7),
    "blue": (-0.7, -0.7, 0.9),
    "yellow": (0.9, 0.9, -0.7),
    "magenta": (0.9, -0.7, 0.9),
    "cyan": (-0.7, 0.9, 0.9),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "dark": (-0.8, -0.8, -0.8),
    "light": (0.8, 0.8, 0.8),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Unit velocity (dx, dy) per direction word; y points down the image."""
FUNCTION_WORDS: tuple[str, ...] = ("a", "moving", "and", "on", "background")
VOCABULARY: tuple[str, ...] = FUNCTION_WORDS + tuple(COLOURS) + SHAPES + tuple(DIRECTIONS) + tuple(BACKGROUNDS)
"""Every word a prompt may contain, in a fixed order (the text encoder's token ids follow it)."""

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "square"), ("cyan", "triangle")}
)
"""(colour, shape) pairs never used in training; each colour and each shape keeps >= 1 training pair."""

MAX_OBJECTS = 2


@dataclass(frozen=True)
class ToyWorldConfig:
    """Rendering and physics parameters of the toy world (all sizes in pixels)."""

    height: int = 32
    """Frame height."""
    width: int = 32
    """Frame width."""
    num_frames: int = 21
    """Pixel frames per clip (the toy codec keeps time 1:1, so also latent frames: 7 chunks of 3)."""
    object_size: int = 8
    """Side of every object's bounding box."""
    speed_range: tuple[float, float] = (0.75, 1.5)
    """Uniform range of the speed in pixels per frame."""
    min_frames_before_bounce: int = 3
    """Frames of unobstructed motion guaranteed at the start (makes the direction word visible)."""
    antialias: int = 4
    """Supersampling factor per axis for edge coverage; 1 renders hard edges."""
    min_gap: float = 2.0
    """Two-object scenes: minimum distance between the two bounding boxes in every frame."""
    max_layout_tries: int = 1000
    """Two-object scenes: redraws allowed to find a non-touching layout."""

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames", "object_size", "antialias", "max_layout_tries"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ToyWorldConfig.{name} must be positive, got {getattr(self, name)}")
        lo, hi = self.speed_range
        if not 0 < lo <= hi:
            raise ValueError(f"ToyWorldConfig.speed_range must satisfy 0 < low <= high, got {self.speed_range}")
        travel = min(self.height, self.width) - self.object_size
        if hi * self.min_frames_before_bounce >= travel:
            raise ValueError(
                f"ToyWorldConfig: object_size={self.object_size} leaves {travel} px of travel, too little for "
                f"min_frames_before_bounce={self.min_frames_before_bounce} at speed {hi}"
            )

    def object_area(self, shape: str) -> float:
        """Continuous area of a shape in pixels (square s², circle pi s²/4, triangle s²/2)."""
        s2 = float(self.object_size) ** 2
        return {"square": s2, "circle": math.pi * s2 / 4, "triangle": s2 / 2}[_check(shape, SHAPES, "shape")]


@dataclass(frozen=True)
class ObjectAttributes:
    """One object of a scene."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        _check(self.colour, COLOURS, "colour")
        _check(self.shape, SHAPES, "shape")
        _check(self.direction, DIRECTIONS, "direction")


@dataclass(frozen=True)
class SceneAttributes:
    """What a prompt says: one or two objects and a background."""

    objects: tuple[ObjectAttributes, ...]
    background: str = "dark"

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"SceneAttributes.objects: need 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        _check(self.background, BACKGROUNDS, "background")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"SceneAttributes.objects: the objects of a scene need distinct colours, got {colours}")

    @classmethod
    def single(cls, colour: str, shape: str, direction: str, background: str = "dark") -> SceneAttributes:
        return cls((ObjectAttributes(colour, shape, direction),), background)


@dataclass(frozen=True)
class FrameTruth:
    """Per-frame ground truth of a rendered video (N objects, T frames)."""

    centres: torch.Tensor
    """``(T, N, 2)`` bounding-box centres ``(x, y)`` in pixels."""
    velocities: torch.Tensor
    """``(T, N, 2)`` velocity ``(dx, dy)`` in pixels/frame at each frame (sign after any bounce at that frame)."""
    colours: torch.Tensor
    """``(N, 3)`` RGB in [-1, 1]."""
    size: float
    """Bounding-box side of every object."""
    background: torch.Tensor
    """``(3,)`` RGB in [-1, 1]."""
    shapes: tuple[str, ...] = field(default=())


def _check(word: str, allowed, what: str) -> str:
    if word not in allowed:
        raise ValueError(f"unknown {what} {word!r}; expected one of {sorted(allowed)}")
    return word


# --------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_for(attrs: SceneAttributes) -> str:
    """The canonical prompt of a scene (``parse_prompt(prompt_for(a)) == a``)."""
    objs = " and ".join(f"a {o.colour} {o.shape} moving {o.direction}" for o in attrs.objects)
    return f"{objs} on a {attrs.background} background"


def parse_prompt(text: str) -> SceneAttributes:
    """Parse a prompt of the toy grammar (see the module docstring) into scene attributes.

    Raises:
        ValueError: naming the first unknown word, or the first word that breaks the grammar.
    """
    words = text.lower().split()
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(f"unknown word {w!r} in prompt {text!r}; the toy vocabulary is {sorted(VOCABULARY)}")
    pos = 0

    def take(allowed, what: str) -> str:
        nonlocal pos
        if pos >= len(words):
            raise ValueError(f"prompt {text!r} ends early: expected {what} at word {pos}")
        w = words[pos]
        if w not in allowed:
            raise ValueError(f"unexpected word {w!r} at position {pos} of prompt {text!r}: expected {what}")
        pos += 1
        return w

    objects = []
    while True:
        take(("a",), "'a'")
        colour = take(COLOURS, "a colour")
        shape = take(SHAPES, "a shape")
        take(("moving",), "'moving'")
        direction = take(DIRECTIONS, "a direction")
        objects.append(ObjectAttributes(colour, shape, direction))
        if take(("and", "on"), "'and' or 'on'") == "on":
            break
    take(("a",), "'a'")
    background = take(BACKGROUNDS, "a background")
    take(("background",), "'background'")
    if pos != len(words):
        raise ValueError(f"unexpected word {words[pos]!r} at position {pos} of prompt {text!r}: expected the end")
    return SceneAttributes(tuple(objects), background)


def is_heldout(attrs: SceneAttributes) -> bool:
    """True when any object's (colour, shape) pair is in ``HELDOUT_PAIRS``."""
    return any((o.colour, o.shape) in HELDOUT_PAIRS for o in attrs.objects)


def _single_objects(split: Literal["train", "heldout", "all"]) -> list[ObjectAttributes]:
    objs = [ObjectAttributes(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
    if split == "all":
        return objs
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return [o for o in objs if ((o.colour, o.shape) in HELDOUT_PAIRS) == (split == "heldout")]


def all_combinations(num_objects: int = 1) -> list[SceneAttributes]:
    """Every scene with exactly ``num_objects`` objects (1: 6·3·4·2 = 144 scenes), in a fixed order."""
    if num_objects == 1:
        return [SceneAttributes((o,), bg) for o in _single_objects("all") for bg in BACKGROUNDS]
    if num_objects == 2:
        objs = _single_objects("all")
        return [SceneAttributes((a, b), bg) for a in objs for b in objs if a.colour != b.colour for bg in BACKGROUNDS]
    raise ValueError(f"num_objects must be 1 or {MAX_OBJECTS}, got {num_objects}")


def train_prompts(config: ToyWorldConfig | None = None, num_objects: int = 1) -> list[str]:
    """Prompts of every scene of ``num_objects`` objects not held out (fixed order).

    ``config`` is accepted for symmetry with the rendering functions; prompts do not depend on it.
    """
    return [prompt_for(a) for a in all_combinations(num_objects) if not is_heldout(a)]


def heldout_prompts(config: ToyWorldConfig | None = None, num_objects: int = 1) -> list[str]:
    """Prompts of every held-out scene of ``num_objects`` objects (fixed order); ``config`` as in ``train_prompts``."""
    return [prompt_for(a) for a in all_combinations(num_objects) if is_heldout(a)]


def sample_prompts(
    n: int,
    generator: torch.Generator,
    split: Literal["train", "heldout", "all"] = "train",
    two_object_fraction: float = 0.0,
) -> list[str]:
    """Draw ``n`` prompts uniformly (with replacement) from ``split``.

    Each prompt has two objects with probability ``two_object_fraction``; a held-out two-object prompt has at
    least one held-out object, a training one has none.
    """
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    singles = [a for a in all_combinations(1) if split == "all" or is_heldout(a) == (split == "heldout")]
    all_objs = _single_objects("all")
    backgrounds = tuple(BACKGROUNDS)
    out = []
    for _ in range(n):
        if torch.rand((), generator=generator).item() >= two_object_fraction:
            out.append(prompt_for(singles[int(torch.randint(len(singles), (), generator=generator))]))
            continue
        while True:  # rejection: distinct colours and the right split (accepts >= 1/3 of the draws)
            a, b = (all_objs[int(i)] for i in torch.randint(len(all_objs), (2,), generator=generator))
            bg = backgrounds[int(torch.randint(len(backgrounds), (), generator=generator))]
            if a.colour == b.colour:
                continue
            scene = SceneAttributes((a, b), bg)
            if split == "all" or is_heldout(scene) == (split == "heldout"):
                out.append(prompt_for(scene))
                break
    return out


# --------------------------------------------------------------------------------------------------------------
# Physics and rendering


def _reflect(u: torch.Tensor, length: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an unbounded coordinate ``u`` (offset from the lower wall) into ``[0, length]``.

    Returns the folded coordinate and the velocity sign (+1 moving away from the lower wall, -1 towards it).
    """
    m = torch.remainder(u, 2 * length)  # period 2L: out to the far wall and back
    forward = m <= length
    return torch.where(forward, m, 2 * length - m), torch.where(forward, 1.0, -1.0)


def _sample_motion(
    obj: ObjectAttributes, config: ToyWorldConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and velocities ``(T, 2)`` of one object; draws 3 uniforms from ``generator``."""
    half = config.object_size / 2
    lo_x, hi_x = half, config.width - half
    lo_y, hi_y = half, config.height - half
    u = torch.rand(3, generator=generator, dtype=torch.float64)
    speed = config.speed_range[0] + (config.speed_range[1] - config.speed_range[0]) * u[0]
    dx, dy = DIRECTIONS[obj.direction]
    room = speed * config.min_frames_before_bounce  # distance to keep from the wall ahead
    # Along the motion axis: start anywhere leaving `room` ahead; across it: anywhere.
    if dx != 0:
        lo_a, hi_a, lo_c, hi_c, sign = lo_x, hi_x, lo_y, hi_y, dx
    else:
        lo_a, hi_a, lo_c, hi_c, sign = lo_y, hi_y, lo_x, hi_x, dy
    start_lo, start_hi = (lo_a, hi_a - room) if sign > 0 else (lo_a + room, hi_a)
    p0 = start_lo + (start_hi - start_lo) * u[1]
    q0 = lo_c + (hi_c - lo_c) * u[2]
    t = torch.arange(config.num_frames, dtype=torch.float64)
    along, vsign = _reflect(p0 - lo_a + sign * speed * t, hi_a - lo_a)
    along = along + lo_a
    across = torch.full_like(t, float(q0))
    vel_along = sign * speed * vsign
    if dx != 0:
        centres = torch.stack([along, across], -1)
        vel = torch.stack([vel_along, torch.zeros_like(t)], -1)
    else:
        centres = torch.stack([across, along], -1)
        vel = torch.stack([torch.zeros_like(t), vel_along], -1)
    return centres, vel


def _coverage(shape: str, centres: torch.Tensor, config: ToyWorldConfig) -> torch.Tensor:
    """Fraction of each pixel covered by the shape, ``(T, H, W)`` for centres ``(T, 2)``."""
    a = config.antialias
    half = config.object_size / 2
    # Subpixel sample positions (pixel i spans [i, i+1)); shape (H*a,) and (W*a,).
    ys = (torch.arange(config.height * a, dtype=torch.float64) + 0.5) / a
    xs = (torch.arange(config.width * a, dtype=torch.float64) + 0.5) / a
    dx = xs[None, None, :] - centres[:, 0, None, None]  # (T, 1, W*a)
    dy = ys[None, :, None] - centres[:, 1, None, None]  # (T, H*a, 1)
    # Half-open intervals keep the pixel count of a square exactly s² at any sub-pixel offset when a == 1.
    in_rows = (dy >= -half) & (dy < half)
    if shape == "square":
        inside = in_rows & (dx >= -half) & (dx < half)
    elif shape == "circle":
        inside = dx * dx + dy * dy < half * half
    elif shape == "triangle":
        inside = in_rows & (dx.abs() < (dy + half) / 2)  # half-width grows from 0 (apex) to s/2 (base)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    t = centres.shape[0]
    cov = inside.to(torch.float32).reshape(t, config.height, a, config.width, a).mean(dim=(2, 4))
    return cov


def _boxes_apart(c0: torch.Tensor, c1: torch.Tensor, config: ToyWorldConfig) -> bool:
    sep = config.object_size + config.min_gap  # centre distance needed along at least one axis
    apart = ((c0 - c1).abs() >= sep).any(dim=-1)
    return bool(apart.all())


def simulate(attrs: SceneAttributes, seed: int, config: ToyWorldConfig | None = None) -> FrameTruth:
    """Object trajectories of a scene (the physics of ``render`` without the pixels)."""
    config = config or ToyWorldConfig()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.max_layout_tries):
        motions = [_sample_motion(o, config, generator) for o in attrs.objects]
        if len(motions) == 1 or _boxes_apart(motions[0][0], motions[1][0], config):
            break
    else:
        raise RuntimeError(
            f"no non-touching layout for {prompt_for(attrs)!r} after max_layout_tries={config.max_layout_tries}"
        )
    return FrameTruth(
        centres=torch.stack([m[0] for m in motions], 1).to(torch.float32),
        velocities=torch.stack([m[1] for m in motions], 1).to(torch.float32),
        colours=torch.tensor([COLOURS[o.colour] for o in attrs.objects]),
        size=float(config.object_size),
        background=torch.tensor(BACKGROUNDS[attrs.background]),
        shapes=tuple(o.shape for o in attrs.objects),
    )


def render_truth(truth: FrameTruth, config: ToyWorldConfig) -> torch.Tensor:
    """Pixels of given trajectories: ``(T, 3, H, W)`` in [-1, 1]."""
    t = truth.centres.shape[0]
    video = truth.background.view(1, 3, 1, 1).expand(t, 3, config.height, config.width).clone()
    for k, shape in enumerate(truth.shapes):
        cov = _coverage(shape, truth.centres[:, k].to(torch.float64), config).unsqueeze(1)  # (T, 1, H, W)
        video = video * (1 - cov) + truth.colours[k].view(1, 3, 1, 1) * cov
    return video


def render(
    attrs: SceneAttributes | str, seed: int, config: ToyWorldConfig | None = None
) -> tuple[torch.Tensor, FrameTruth]:
    """Render a scene deterministically.

    Args:
        attrs: scene attributes or a prompt.
        seed: seeds start positions and speeds (same seed, same tensor).
        config: world parameters (default ``ToyWorldConfig()``).

    Returns:
        ``(video (T, 3, H, W) float32 in [-1, 1], FrameTruth)``.
    """
    config = config or ToyWorldConfig()
    if isinstance(attrs, str):
        attrs = parse_prompt(attrs)
    truth = simulate(attrs, seed, config)
    return render_truth(truth, config), truth


def render_batch(
    prompts: list[str] | list[SceneAttributes], seeds: list[int], config: ToyWorldConfig | None = None
) -> torch.Tensor:
    """``(B, T, 3, H, W)`` videos of ``prompts`` rendered with ``seeds``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"render_batch: {len(prompts)} prompts but {len(seeds)} seeds")
    return torch.stack([render(p, s, config)[0] for p, s in zip(prompts, seeds, strict=True)])
