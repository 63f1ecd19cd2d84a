"""Each stage of the toy pipeline (teacher, ODE initialisation, Self Forcing DMD) runs a few steps through the CLI."""

import json
from pathlib import Path

import pytest
import torch

from sfvideo.cli import main
from sfvideo.training.networks import asset_path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "toy"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _fit(tmp_path, name, *extra):
    main(["fit", "--config", str(CONFIGS / name), "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET,
          *extra])
    return next(iter(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")), None)


def test_teacher_stage_runs(tmp_path):
    ckpt = _fit(tmp_path, "teacher.yaml", "--trainer.max_steps", "2", "--data.init_args.batch_size", "2",
                "--data.init_args.num_workers", "0")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert state["rank_local"]["model_ema"]["num_updates"] == 2


def test_a_checkpoint_holds_the_ema_of_its_own_step(tmp_path):
    # ModelCheckpoint saves in its on_train_batch_end, before the module's: the EMA must already have folded in
    # the update of that step, or every saved EMA lags the weights beside it by one update.
    every_step = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"save_top_k": -1, "every_n_train_steps": 1}}])
    _fit(tmp_path, "teacher.yaml", "--trainer.max_steps", "2", "--data.init_args.batch_size", "2",
         "--data.init_args.num_workers", "0", "--trainer.callbacks", every_step)
    for step in (1, 2):
        (ckpt,) = tmp_path.glob(f"lightning_logs/version_*/checkpoints/*step={step}.ckpt")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert state["global_step"] == step and state["rank_local"]["model_ema"]["num_updates"] == step


needs_teacher = pytest.mark.skipif(asset_path("toy_teacher") is None, reason="toy teacher asset not built")


@needs_teacher
def test_ode_stage_runs(tmp_path):
    ckpt = _fit(tmp_path, "ode.yaml", "--trainer.max_steps", "2", "--data.init_args.batch_size", "2",
                "--model.init_args.ode.num_steps", "4")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["sfvideo"]["generator_steps"] == 2
    assert not any(k.startswith("teacher.") for k in state["state_dict"])


@needs_teacher
def test_self_forcing_stage_runs_and_writes_samples(tmp_path):
    ckpt = _fit(tmp_path, "dmd.yaml", "--model.init_args.max_generator_steps", "1",
                "--model.init_args.optim.critic_updates_per_generator_update", "1", "--data.init_args.batch_size", "1")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["sfvideo"]["generator_steps"] == 1 and state["sfvideo"]["critic_steps"] == 1
    samples = list(tmp_path.glob("lightning_logs/version_*/samples/step_*/contact_sheet.png"))
    assert samples, "the evaluation callback wrote no samples"
    assert list(samples[0].parent.glob("*.mp4"))
