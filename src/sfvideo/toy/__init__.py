"""The toy world: a procedural text-to-video domain (``world``), its frozen encoders (``encoders``) and an
FD-syn feature network (``features``). Exact metrics live in ``sfvideo.metrics.toy``."""

from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder, toy_geometry
from sfvideo.toy.world import (
    SceneAttributes,
    ToyWorldConfig,
    heldout_prompts,
    parse_prompt,
    prompt_for,
    render,
    render_batch,
    sample_prompts,
    train_prompts,
)

__all__ = [
    "SceneAttributes",
    "ToyCodec",
    "ToyTextEncoder",
    "ToyWorldConfig",
    "heldout_prompts",
    "parse_prompt",
    "prompt_for",
    "render",
    "render_batch",
    "sample_prompts",
    "toy_geometry",
    "train_prompts",
]
