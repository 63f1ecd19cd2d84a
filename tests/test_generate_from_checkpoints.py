"""Every checkpoint sfvideo writes generates from its path alone, through the real entry point (issue 11, 1-2).

Each run is the ordinary ``sfvideo fit`` of a config for one update; ``sfvideo generate <path> --prompt ...`` then
needs no other flag: the checkpoint records the networks, geometry, step list, chunking and encoders.
"""

from pathlib import Path

import pytest
import torch

from sfvideo.cli import main
from sfvideo.training.networks import asset_path
from sfvideo.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left on a dark background"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONLY_CHECKPOINT = ["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                   '"init_args": {"save_last": true}}]']
TOY_VIDEO = (21, 32, 32, 3)  # 21 latent frames, the toy codec: 1 pixel frame each, 4x spatial

needs_teacher = pytest.mark.skipif(asset_path("toy_teacher") is None, reason="toy teacher asset not built")


def fit(root: Path, config: str, *extra: str) -> Path:
    main(["fit", "--config", str(ROOT / "configs" / config), "--trainer.logger.init_args.save_dir", str(root),
          *QUIET, *extra])
    (ckpt,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return ckpt


def generate(source: Path, out: Path, *extra) -> None:
    main(["generate", str(source), "--prompt", PROMPT, "-o", str(out), "--quiet", *map(str, extra)])


SELF_FORCING_ONE_STEP = ("--model.init_args.max_generator_steps", "1", "--data.init_args.batch_size", "1",
                         "--model.init_args.optim.critic_updates_per_generator_update", "1", *ONLY_CHECKPOINT)


@pytest.fixture(scope="module")
def self_forcing_ckpt(tmp_path_factory) -> Path:
    """configs/toy/dmd.yaml: the teacher is the bundled asset name ``toy_teacher``."""
    return fit(tmp_path_factory.mktemp("sf"), "toy/dmd.yaml", *SELF_FORCING_ONE_STEP)


@needs_teacher
def test_generate_from_a_self_forcing_checkpoint_whose_teacher_is_a_bundled_asset(self_forcing_ckpt, tmp_path):
    generate(self_forcing_ckpt, tmp_path / "sf.mp4")
    assert read_mp4(tmp_path / "sf.mp4").shape == TOY_VIDEO


@needs_teacher
def test_generate_from_a_self_forcing_checkpoint_whose_teacher_is_a_folder(tmp_path):
    ckpt = fit(tmp_path / "run", "toy/dmd.yaml", *SELF_FORCING_ONE_STEP,
               "--model.init_args.teacher", str(asset_path("toy_teacher")))
    generate(ckpt, tmp_path / "sf.mp4")
    assert read_mp4(tmp_path / "sf.mp4").shape == TOY_VIDEO


@needs_teacher
def test_generate_from_an_export_of_it(self_forcing_ckpt, tmp_path):
    main(["export", "--ckpt", str(self_forcing_ckpt), "--out", str(tmp_path / "export")])
    generate(tmp_path / "export", tmp_path / "export.mp4", "--save_latents", tmp_path / "export.pt")
    generate(self_forcing_ckpt, tmp_path / "ckpt.mp4", "--save_latents", tmp_path / "ckpt.pt")
    # The export describes the same sampler as its checkpoint: the same video, at the toy geometry.
    assert torch.equal(torch.load(tmp_path / "export.pt"), torch.load(tmp_path / "ckpt.pt"))
    assert read_mp4(tmp_path / "export.mp4").shape == TOY_VIDEO


@needs_teacher
def test_generate_from_an_ode_init_checkpoint(tmp_path):
    ckpt = fit(tmp_path / "run", "toy/ode.yaml", "--trainer.max_steps", "1", "--data.init_args.batch_size", "1",
               "--model.init_args.ode.num_steps", "2", *ONLY_CHECKPOINT)
    generate(ckpt, tmp_path / "ode.mp4")
    assert read_mp4(tmp_path / "ode.mp4").shape == TOY_VIDEO


def test_generate_from_a_teacher_checkpoint(tmp_path):
    # FlowMatchingDiffusion (bidirectional): the whole clip by many-step Euler with CFG, streamed out chunk by
    # chunk; the codec recorded is the data module's.
    ckpt = fit(tmp_path / "run", "toy/teacher.yaml", "--trainer.max_steps", "1", "--data.init_args.batch_size", "1",
               "--data.init_args.num_workers", "0", *ONLY_CHECKPOINT)
    generate(ckpt, tmp_path / "teacher.mp4")
    assert read_mp4(tmp_path / "teacher.mp4").shape == TOY_VIDEO


def test_generate_from_a_debug_checkpoint(tmp_path):
    ckpt = fit(tmp_path / "run", "debug.yaml")
    # No codec for its 4-channel latents: one line saying so and what to do, nothing written.
    with pytest.raises(SystemExit) as e:
        generate(ckpt, tmp_path / "debug.mp4")
    text = str(e.value.code)
    assert text.startswith("sfvideo generate: error:") and "records no codec" in text and "\n" not in text
    assert "--save_latents" in text and not (tmp_path / "debug.mp4").exists()
    # The latents alone, at the run's geometry (4 latent frames of 4 channels, 4x4).
    generate(ckpt, tmp_path / "debug.mp4", "--save_latents", tmp_path / "debug.pt")
    assert torch.load(tmp_path / "debug.pt").shape == (1, 4, 4, 4, 4) and not (tmp_path / "debug.mp4").exists()
