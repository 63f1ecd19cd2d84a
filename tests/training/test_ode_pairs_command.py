"""``sfvideo ode-pairs``: a tiny teacher writes the ODE pairs of an ODEInit config once (resumably, split across
ranks), then ``sfvideo fit`` of the same config reads them without calling the teacher, and the DF baseline trains
on their final states (configs/toy/ode.yaml, configs/toy/df.yaml with tiny overrides: the debug transformer,
4 latent frames of 12 x 4 x 4)."""

from pathlib import Path

import pytest
import torch

from sfvideo.cli import main
from sfvideo.data.ode_pairs import ODEPairsDataModule, load_ode_pairs
from sfvideo.ode_pairs import main as ode_pairs
from sfvideo.training import ode as ode_module

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "toy"
PROMPTS = ["a red circle moving left on a dark background", "a green triangle moving right on a dark background",
           "a yellow square moving up on a dark background"]  # fmt: skip
GEOMETRY = ["--model.init_args.geometry.num_frames", "4", "--model.init_args.geometry.channels", "12",
            "--model.init_args.geometry.height", "4", "--model.init_args.geometry.width", "4",
            "--model.init_args.geometry.frames_per_chunk", "2"]  # fmt: skip
TWELVE = '{"in_channels": 12, "out_channels": 12}'
TINY_ODE = ["--config", str(CONFIGS / "ode.yaml"), "--model.init_args.teacher", "debug",
            "--model.init_args.teacher_overrides", TWELVE, *GEOMETRY,
            "--model.init_args.codec.init_args.spatial_stride", "2",
            "--model.init_args.ode.num_steps", "2"]  # fmt: skip
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONLY_CHECKPOINT = ["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                   '"init_args": {"save_last": true}}]']


def write(out: Path, prompts: Path, *extra: str) -> dict:
    return ode_pairs([*TINY_ODE, "--prompts_file", str(prompts), "--out", str(out), "--shard_size", "2", "--quiet",
                      *extra])  # fmt: skip


def test_pairs_are_written_once_resumably_and_training_reads_them_without_the_teacher(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs"
    first = write(out, prompts)
    assert [Path(p).name for p in first["written"]] == ["shard_00000.pt", "shard_00001.pt"]
    pairs = load_ode_pairs(out)
    assert pairs.prompts == PROMPTS and pairs.state_shape == (5, 4, 12, 4, 4)  # 4 step sigmas + the final state
    assert pairs.trajectories.dtype == torch.float16  # the official LMDB's storage
    # Resume: complete shards are kept, a missing one is rewritten, with the same values (noise per prompt index).
    assert write(out, prompts)["written"] == []
    (out / "shard_00001.pt").unlink()
    with pytest.raises(ValueError, match="1 of 2 shards missing"):
        load_ode_pairs(out)
    assert [Path(p).name for p in write(out, prompts)["written"]] == ["shard_00001.pt"]
    assert torch.equal(load_ode_pairs(out).trajectories, pairs.trajectories)
    # Two ranks write disjoint shards (i mod 2) and together the same folder.
    split = tmp_path / "split"
    assert [Path(p).name for p in write(split, prompts, "--rank", "1", "--world_size", "2")["written"]] == [
        "shard_00001.pt"]
    write(split, prompts, "--rank", "0", "--world_size", "2")
    assert torch.equal(load_ode_pairs(split).trajectories, pairs.trajectories)
    # Other settings never mix into an existing folder.
    with pytest.raises(SystemExit, match="other settings"):
        write(out, prompts, "--model.init_args.ode.num_steps", "3")

    # sfvideo fit of the same config reads the folder; the teacher is never run.
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although trajectories were given")

    monkeypatch.setattr(ode_module, "ode_trajectories", no_teacher)
    main(["fit", *TINY_ODE, "--model.init_args.trajectories", str(out), "--data.init_args.prompt_source", "null",
          "--data.init_args.prompts_file", str(prompts), "--data.init_args.batch_size", "2",
          "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "ode"), *QUIET,
          *ONLY_CHECKPOINT])  # fmt: skip
    (ckpt,) = (tmp_path / "ode").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["sfvideo"]["generator_steps"] == 2 and not any(k.startswith("teacher.") for k in state["state_dict"])

    # The DF baseline trains on the pairs' final states (official trainer/diffusion.py: batch["ode_latent"][:, -1]).
    data = ODEPairsDataModule(str(out), batch_size=2, seed=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rows = [pairs.prompts.index(p) for p in batch["prompts"]]
    assert torch.equal(batch["latents"], pairs.trajectories[rows, -1].float())
    main(["fit", "--config", str(CONFIGS / "df.yaml"), "--model.init_args.model", "debug",
          "--model.init_args.model_overrides", TWELVE, *GEOMETRY, "--data",
          '{"class_path": "sfvideo.data.ode_pairs.ODEPairsDataModule", "init_args": {"trajectories": "'
          + str(out) + '", "batch_size": 2}}', "--trainer.max_steps", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "df"), *QUIET, *ONLY_CHECKPOINT])  # fmt: skip
    (ckpt,) = (tmp_path / "df").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_command_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="ODEInit fit config"):
        ode_pairs(["--config", str(CONFIGS / "df.yaml"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no output folder"):
        ode_pairs(TINY_ODE)
