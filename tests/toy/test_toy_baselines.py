"""The many-step TF/DF baselines' toy configs (configs/toy/tf.yaml, df.yaml) run a few steps through the CLI, their
checkpoints generate by path alone with the causal_cfg sampler, and the evaluation callback samples them.

Tiny overrides keep this at seconds: the debug transformer (12 channels), 4 latent frames of 4x4 in chunks of 2
from 8x8 toy clips (codec stride 2), 2 sampling steps."""

from pathlib import Path

import pytest
import torch

from sfvideo.checkpoints import read_checkpoint
from sfvideo.cli import main
from sfvideo.video import read_mp4

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "toy"
PROMPT = "a red circle moving left on a dark background"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = [
    "--model.init_args.model", "debug", "--model.init_args.model_overrides", '{"in_channels": 12, "out_channels": 12}',
    "--model.init_args.geometry.num_frames", "4", "--model.init_args.geometry.channels", "12",
    "--model.init_args.geometry.height", "4", "--model.init_args.geometry.width", "4",
    "--model.init_args.geometry.frames_per_chunk", "2", "--model.init_args.sampling.num_steps", "2",
    "--data.init_args.spatial_stride", "2", "--data.init_args.world.height", "8", "--data.init_args.world.width", "8",
    "--data.init_args.world.num_frames", "4", "--data.init_args.world.object_size", "2",
    "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.max_steps", "2",
]  # fmt: skip


def callbacks(*extra: str) -> list[str]:
    checkpoint = '{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}'
    return ["--trainer.callbacks", "[" + ", ".join([checkpoint, *extra]) + "]"]


def fit(root: Path, config: str, *extra: str) -> Path:
    main(["fit", "--config", str(CONFIGS / config), "--trainer.logger.init_args.save_dir", str(root), *QUIET,
          *TINY, *extra])  # fmt: skip
    (ckpt,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return ckpt


@pytest.mark.parametrize("config,attention", [("tf.yaml", "teacher_forcing"), ("df.yaml", "block_causal")])
def test_toy_baseline_trains_and_generates_by_path_alone(tmp_path, config, attention):
    evaluator = ('{"class_path": "sfvideo.training.callbacks.SampleEvaluator", "init_args": {"prompts": ["'
                 + PROMPT + '"], "every_n_generator_steps": 0, "scorer": null}}')
    ckpt = fit(tmp_path / "run", config, *callbacks(evaluator))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["hyper_parameters"]["attention"] == attention
    record = read_checkpoint(ckpt)
    assert record.settings.sampler == "causal_cfg" and record.settings.sampling.solver == "unipc"
    # The evaluation callback sampled the module through its inference engine (causal_cfg) at the end.
    assert list(tmp_path.glob("run/lightning_logs/version_*/samples/step_000002/*.mp4"))
    main(["generate", str(ckpt), "--prompt", PROMPT, "-o", str(tmp_path / "v.mp4"), "--quiet"])
    assert read_mp4(tmp_path / "v.mp4").shape == (4, 8, 8, 3)  # 4 latent frames, the toy codec at stride 2
