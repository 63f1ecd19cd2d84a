"""The context probe of ``sfvideo probe-teacher`` reads what it claims, on denoisers whose answer is known."""

from types import SimpleNamespace

import pytest
import torch

from sfvideo.probe_teacher import ATTRIBUTES, context_probe, swap_attribute, text_probe
from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder
from sfvideo.toy.world import train_prompts


def engine(denoise):
    return SimpleNamespace(decoder=ToyCodec(spatial_stride=4), device=torch.device("cpu"), dtype=torch.float32,
                           encode=lambda prompts: None, denoiser=lambda x, sigma, cond: denoise(x, sigma))


PROMPTS = train_prompts()[:3]
SIGMAS = [0.5, 0.9]


def test_a_denoiser_that_ignores_the_other_frames_gains_nothing_from_them():
    # per frame: x0 = x / (1 - sigma) shrunk towards 0, a function of the frame alone
    report = context_probe(engine(lambda x, s: (1 - s) * x), PROMPTS, SIGMAS, seed=0)
    for r in report.values():
        assert r["own"] == r["other"] == r["alone"]
        assert r["gain"] == 0.0


def test_a_denoiser_that_pools_its_clip_gains_from_its_own_context_only():
    # x0 = the clip mean of x / (1 - sigma) in every frame: pooling T frames of the same scene divides the noise
    # variance by ~T, a foreign scene's frames pull the estimate away, and alone it is the noisy frame itself
    report = context_probe(engine(lambda x, s: x.mean(dim=1, keepdim=True).expand_as(x) / (1 - s)),
                           PROMPTS, SIGMAS, seed=0)
    for r in report.values():
        assert r["own"] < r["other"] and r["own"] < r["alone"]
        assert r["gain"] > 0
    assert set(report) == {"0.5", "0.9"}


def test_guidance_scale_replaces_the_recorded_one_of_many_step_samplers_only():
    from sfvideo.evaluation import evaluation_engine
    from sfvideo.training.networks import asset_path

    teacher, generator = asset_path("toy_teacher"), asset_path("toy_generator")
    recorded, _ = evaluation_engine(teacher, use_ema=False)
    unguided, _ = evaluation_engine(teacher, use_ema=False, guidance_scale=0.0)
    assert recorded.settings.sampling.guidance_scale == 3.0
    assert unguided.settings.sampling.guidance_scale == 0.0
    with pytest.raises(ValueError, match="many-step samplers"):
        evaluation_engine(generator, use_ema=False, guidance_scale=1.0)
    # The cache-refresh timestep is replaced the same way (scripts/diagnose_generator.py --context_noise).
    refreshed, _ = evaluation_engine(generator, use_ema=False, context_noise=500.0)
    assert evaluation_engine(generator, use_ema=False)[0].settings.context_noise == 0.0
    assert refreshed.settings.context_noise == 500.0


def test_swap_attribute_changes_one_word_of_its_kind_and_keeps_two_colours_distinct():
    p = "a red circle moving left on a dark background"
    assert swap_attribute(p, "colour") == "a green circle moving left on a dark background"
    assert swap_attribute(p, "shape") == "a red square moving left on a dark background"
    assert swap_attribute(p, "direction") == "a red circle moving right on a dark background"
    assert swap_attribute(p, "background") == "a red circle moving left on a light background"
    two = swap_attribute("a red circle moving up and a magenta square moving down on a light background", "colour")
    assert two == "a green circle moving up and a cyan square moving down on a light background"


def test_the_text_probe_sees_exactly_the_words_a_denoiser_reads():
    # the flow depends on the prompt only through token 1 (the colour word of a one-object prompt)
    text = ToyTextEncoder()
    flow = lambda x, sigma, cond: x * (1 + cond[:, 1].mean(-1).view(-1, 1, 1, 1, 1))  # noqa: E731
    eng = SimpleNamespace(decoder=ToyCodec(spatial_stride=4), device=torch.device("cpu"), dtype=torch.float32,
                          encode=text.encode, denoiser=SimpleNamespace(flow=flow))
    report = text_probe(eng, PROMPTS, SIGMAS, seed=0)
    assert set(report) == {"0.5", "0.9"}
    for r in report.values():
        assert set(r) == set(ATTRIBUTES)
        assert r["colour"] > 0.01
        assert r["shape"] == r["direction"] == r["background"] == 0.0
