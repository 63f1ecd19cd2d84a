"""The toy world: determinism, the prompt grammar, the split, and the physics the prompts promise."""

import pytest
import torch

from sfvideo.toy.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SceneAttributes,
    ToyWorldConfig,
    all_combinations,
    heldout_prompts,
    is_heldout,
    parse_prompt,
    prompt_for,
    render,
    sample_prompts,
    simulate,
    train_prompts,
)

TWO = "a red circle moving left and a blue square moving up on a light background"


def test_render_is_deterministic():
    a, ta = render("a green triangle moving down on a dark background", seed=7)
    b, tb = render("a green triangle moving down on a dark background", seed=7)
    c, _ = render("a green triangle moving down on a dark background", seed=8)
    assert torch.equal(a, b) and torch.equal(ta.centres, tb.centres)
    assert not torch.equal(a, c)
    assert a.shape == (21, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1


def test_prompt_round_trip():
    scenes = all_combinations(1) + all_combinations(2)[::97]
    for attrs in scenes:
        assert parse_prompt(prompt_for(attrs)) == attrs
    assert parse_prompt("A Red Circle moving LEFT on a dark background") == SceneAttributes.single(
        "red", "circle", "left", "dark"
    )
    assert len(parse_prompt(TWO).objects) == 2


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a purple circle moving left on a dark background", "'purple'"),
        ("a red circle moving left on a dark backdrop", "'backdrop'"),
        ("a red left moving circle on a dark background", "expected a shape"),
        ("a red circle moving left", "ends early"),
        ("a red circle moving left on a dark background and", "expected the end"),
        ("a red circle moving left and a red square moving up on a dark background", "distinct colours"),
    ],
)
def test_parse_prompt_is_strict(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_prompt(text)


def test_heldout_split_is_disjoint_and_covers_every_word():
    for n in (1, 2):
        train, held = set(train_prompts(num_objects=n)), set(heldout_prompts(num_objects=n))
        assert train and held and not train & held
        assert train | held == {prompt_for(a) for a in all_combinations(n)}
    train_attrs = [parse_prompt(p).objects[0] for p in train_prompts()]
    assert {o.colour for o in train_attrs} == set(COLOURS)
    assert {o.shape for o in train_attrs} == set(SHAPES)
    assert {o.direction for o in train_attrs} == set(DIRECTIONS)
    assert len(all_combinations(1)) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) * len(BACKGROUNDS)


def test_sample_prompts_respects_split_and_seed():
    for split in ("train", "heldout"):
        ps = sample_prompts(40, torch.Generator().manual_seed(0), split=split, two_object_fraction=0.5)
        assert all(is_heldout(parse_prompt(p)) == (split == "heldout") for p in ps)
        assert any(len(parse_prompt(p).objects) == 2 for p in ps)
        assert ps == sample_prompts(40, torch.Generator().manual_seed(0), split=split, two_object_fraction=0.5)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_physics_constant_speed_bounces_and_initial_direction(direction):
    cfg = ToyWorldConfig()
    half = cfg.object_size / 2
    for seed in range(6):
        truth = simulate(SceneAttributes.single("red", "square", direction), seed, cfg)
        c, v = truth.centres[:, 0].double(), truth.velocities[:, 0].double()
        unit = torch.tensor(DIRECTIONS[direction], dtype=torch.float64)
        # The word is the direction at frame 0, and no bounce happens in the first min_frames_before_bounce steps.
        k = cfg.min_frames_before_bounce
        assert (v[: k + 1] @ unit > 0).all()
        speed = v.norm(dim=1)
        assert torch.allclose(speed, speed[0].expand_as(speed))
        assert cfg.speed_range[0] <= speed[0] <= cfg.speed_range[1]
        # Box inside the frame; away from walls each step equals the velocity.
        assert (c - half >= -1e-6).all() and (c[:, 0] + half <= cfg.width + 1e-6).all()
        step = c[1:] - c[:-1]
        same = (v[1:] == v[:-1]).all(dim=1)
        assert torch.allclose(step[same], v[1:][same], atol=1e-5)
        # Bounces are elastic: the speed along the axis is conserved, the sign flips.
        flips = ~same
        assert torch.allclose(v[1:][flips], -v[:-1][flips])


def test_two_objects_never_touch():
    cfg = ToyWorldConfig()
    for seed in range(10):
        truth = simulate(parse_prompt(TWO), seed, cfg)
        gap = (truth.centres[:, 0] - truth.centres[:, 1]).abs().amax(dim=1)
        assert (gap >= cfg.object_size + cfg.min_gap - 1e-5).all()


def test_pixels_match_truth():
    video, truth = render("a yellow square moving right on a light background", seed=3)
    x, y = truth.centres[0, 0].tolist()
    assert torch.allclose(video[0, :, int(y), int(x)], torch.tensor(COLOURS["yellow"]))
    assert torch.allclose(video[0, :, 0, 0], torch.tensor(BACKGROUNDS["light"]))
    hard, _ = render("a yellow square moving right on a light background", 3, ToyWorldConfig(antialias=1))
    fg = (hard[:, 0] - BACKGROUNDS["light"][0]).abs() > 0.05
    assert (fg.sum(dim=(1, 2)) == 64).all()  # half-open pixel test: exactly s² pixels at any sub-pixel offset


def test_config_is_validated():
    with pytest.raises(ValueError, match="speed_range"):
        ToyWorldConfig(speed_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="object_size"):
        ToyWorldConfig(object_size=30)
