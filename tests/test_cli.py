"""A newcomer's first hour through the real entry point (issue 11, items 3-8): where runs write, predict, one-line
errors for bad input (exit status 2), nothing silently accepted, and the conventions (generator steps, --version,
memory --config, export folder modes).

Every error case stops before a network is built, so each costs a parse; the runs are the tiny ``debug.yaml``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfvideo.cli import main
from sfvideo.training.networks import asset_path

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]
EVERY_STEP = ["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
              '"init_args": {"save_last": true, "every_n_train_steps": 1}}]']  # last.ckpt: the final state
PROMPT = "a red circle moving left on a dark background"


def error_of(argv: list[str]) -> str:
    """The one-line error ``main(argv)`` stops with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = e.value.code
    assert isinstance(text, str) and "\n" not in text and len(text) <= 400, text
    return text


def state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["sfvideo"]


# ------------------------------------------------------------------ 4, 3, 8: where runs write; predict; max_steps
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``fit --trainer.default_root_dir ROOT --trainer.max_steps 1`` from an empty working directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = Path.cwd()
    os.chdir(cwd)
    try:
        main(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(cwd / "root"), "--trainer.max_steps", "1",
              *EVERY_STEP, *QUIET])
    finally:
        os.chdir(old)
    return cwd


def test_default_root_dir_holds_logs_checkpoints_and_is_where_last_resumes(run):
    (ckpt,) = run.glob("root/lightning_logs/version_0/checkpoints/last.ckpt")
    assert not (run / "lightning_logs").exists()
    assert list(run.glob("root/lightning_logs/version_0/events.out.tfevents.*"))
    # --trainer.max_steps counts generator updates (debug.yaml: 2 critic updates each), not both optimizers' steps.
    assert (state(ckpt)["generator_steps"], state(ckpt)["critic_steps"]) == (1, 2)
    main(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(run / "root"), "--ckpt_path", "last",
          "--trainer.max_steps", "2", *EVERY_STEP, *QUIET])
    assert [p.name for p in (run / "root" / "lightning_logs").iterdir()] == ["version_0"]
    assert (state(ckpt)["generator_steps"], state(ckpt)["critic_steps"]) == (2, 4)


def test_last_checkpoint_is_the_final_state_whatever_the_save_interval(tmp_path):
    # 2 generator updates x (1 + 2 critic) = 6 optimizer steps; batches end at global steps 2, 3, 5, 6. Saving every
    # 5 left Lightning 2.6's last.ckpt at step 5 (before the last critic update) until FinalLastCheckpoint.
    every_5 = ["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
               '"init_args": {"save_last": true, "every_n_train_steps": 5}}]']
    main(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
          *every_5, *QUIET])
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = state(ckpts / "last.ckpt")
    assert (last["generator_steps"], last["critic_steps"]) == (2, 4)
    (periodic,) = ckpts.glob("epoch=*-step=5.ckpt")  # the periodic checkpoints are Lightning's, unchanged
    assert (state(periodic)["generator_steps"], state(periodic)["critic_steps"]) != (2, 4)


def test_an_explicit_logger_wins_over_default_root_dir(tmp_path):
    main(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.max_steps", "1",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "mine"), "--trainer.enable_checkpointing", "false",
          "--trainer.callbacks", "[]", *QUIET])
    assert list(tmp_path.glob("mine/lightning_logs/version_0/events.out.tfevents.*"))
    assert not list(tmp_path.glob("root/lightning_logs/*"))


def test_predict_needs_a_checkpoint_and_writes_its_own_folder(run, tmp_path):
    root = ["--trainer.default_root_dir", str(run / "root")]
    assert "needs --ckpt_path" in error_of(["predict", "--config", DEBUG, *root])
    assert "no last.ckpt" in error_of(["predict", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path),
                                        "--ckpt_path", "last"])
    assert not list(tmp_path.iterdir())
    training_config = (run / "root/lightning_logs/version_0/config.yaml").read_bytes()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    main(["predict", "--config", DEBUG, *root, "--ckpt_path", "last", "--data.init_args.predict_prompts_file",
          str(prompts), "--trainer.callbacks+=sfvideo.training.writers.VideoPredictionWriter", *QUIET])
    assert (run / "root/lightning_logs/version_0/config.yaml").read_bytes() == training_config
    assert list(run.glob("root/lightning_logs/predict_0/predictions/*.pt"))  # debug.yaml has no codec: latents
    assert (run / "root/lightning_logs/predict_0/config.yaml").is_file()
    ckpt = str(run / "root/lightning_logs/version_0/checkpoints/last.ckpt")
    # A missing prompts file, a config the checkpoint does not fit: one line, no folder left.
    text = error_of(["predict", "--config", DEBUG, *root, "--ckpt_path", ckpt, "--data.init_args.predict_prompts_file",
                     str(tmp_path / "missing.txt")])
    assert "--data.init_args.predict_prompts_file" in text and "missing.txt" in text
    text = error_of(["predict", "--config", str(ROOT / "configs/toy/dmd.yaml"), *root, "--ckpt_path", ckpt])
    assert "geometry.channels" in text and "--ckpt_path" in text
    assert sorted(p.name for p in (run / "root/lightning_logs").iterdir()) == ["predict_0", "version_0"]


def test_export_of_the_run_names_what_it_exported_and_is_an_ordinary_folder(run, tmp_path, capsys):
    ckpt = run / "root/lightning_logs/version_0/checkpoints/last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    assert "exported SelfForcingDMD's generator to" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in error_of(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "file/e")])


def test_export_of_what_is_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "random.ckpt").write_bytes(os.urandom(256))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for source, expected in (("random.ckpt", "random.ckpt is not a checkpoint"),
                             ("cut.safetensors", "is not a Lightning checkpoint")):
        text = error_of(["export", "--ckpt", str(tmp_path / source), "--out", str(tmp_path / "out")])
        assert text.startswith("sfvideo export: error: ") and expected in text
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 5, 6, 7: fit / validate errors
@pytest.fixture
def junk(tmp_path) -> Path:
    (tmp_path / "random.ckpt").write_bytes(os.urandom(256))
    (tmp_path / "binary.yaml").write_bytes(b"\xdd\xfe" + os.urandom(256))
    return tmp_path


FIT_ERRORS = {
    "missing checkpoint": (["--ckpt_path", "{tmp}/nonexistent.ckpt"],
                           "--ckpt_path {tmp}/nonexistent.ckpt: no such file"),
    "random checkpoint": (["--ckpt_path", "{tmp}/random.ckpt"], "is not a checkpoint"),
    "two devices on CPU": (["--trainer.devices", "2"], "MultiEngineDeepSpeedStrategy"),
    "negative lr": (["--model.init_args.generator_optimizer.init_args.lr", "-1"],
                    "--model.init_args.generator_optimizer (sfvideo.training.optim.GeneratorAdamW): Invalid learning"),
    "typo key": (["--model.init_args.max_generator_stepz", "3"],
                 "--model.init_args.max_generator_stepz: not an option of sfvideo.training.module.SelfForcingDMD"),
    "chunks": (["--model.init_args.geometry.num_frames", "3"],
               "--model.init_args.geometry.num_frames=3 does not split"),
    "batch 0": (["--data.init_args.batch_size", "0"], "--data.init_args.batch_size must be positive"),
    "no steps": (["--model.init_args.schedule.denoising_steps", "[]"], "--model.init_args.schedule.denoising_steps"),
    "max_generator_steps 0": (["--model.init_args.max_generator_steps", "0"],
                              "--model.init_args.max_generator_steps must be >= 1"),
    "negative guidance": (["--model.init_args.dmd.guidance_scale", "-1"], "--model.init_args.dmd.guidance_scale"),
    "abbreviation": (["--trainer.max_step", "3"], "unrecognized arguments: --trainer.max_step"),
}


@pytest.mark.parametrize("case", sorted(FIT_ERRORS))
def test_fit_error_is_one_line_naming_the_culprit(case, junk):
    extra, expected = FIT_ERRORS[case]
    extra = [a.format(tmp=junk) for a in extra]
    text = error_of(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(junk / "runs"), *extra])
    assert text.startswith("sfvideo fit: error: ") and expected.format(tmp=junk) in text
    assert not (junk / "runs").exists()  # nothing half-made


def test_a_paper_config_without_its_weights_names_what_is_missing(tmp_path):
    text = error_of(["fit", "--config", str(ROOT / "configs/dmd.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert text.startswith("sfvideo fit: error: ") and "Union subtypes" not in text
    assert "checkpoints/Wan2.1-T2V" in text  # the first weights it needs (the text encoder's folder)


def test_a_binary_config_is_one_line(junk):
    assert error_of(["fit", "--config", str(junk / "binary.yaml")]) == \
        f"sfvideo fit: error: --config {junk / 'binary.yaml'} is not a text (YAML) file"


# ------------------------------------------------------------------ 5, 6, 7: generate errors
TEACHER = asset_path("toy_teacher")
GENERATE_ERRORS = {
    "chunk -1": (["--frames_per_chunk", "-1"], "--frames_per_chunk must be positive, got -1"),
    "chunk 0": (["--frames_per_chunk", "0"], "--frames_per_chunk must be positive, got 0"),
    "fps 0": (["--fps", "0"], "--fps must be positive"),
    "no steps": (["--schedule.denoising_steps", "[]"], "--schedule.denoising_steps must be a non-empty"),
    "negative step": (["--schedule.denoising_steps", "[-5]"], "--schedule.denoising_steps must be integers"),
    "step 5000": (["--schedule.denoising_steps", "[5000]"], "--schedule.denoising_steps must be integers"),
    "shift 0": (["--schedule.shift", "0"], "--schedule.shift must be positive"),
    "sheet folder": (["--contact_sheet", "{tmp}/nowhere/sheet.png"], "--contact_sheet {tmp}/nowhere/sheet.png: folder"),
    "abbreviation": (["--num_frame", "3"], "unrecognized arguments: --num_frame"),
    "output under a file": (["-o", "{tmp}/file/v.mp4"], "{tmp}/file is a file, not a folder"),
}


@pytest.mark.skipif(TEACHER is None, reason="toy teacher asset not built")
@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_error_is_one_line_and_writes_nothing(case, tmp_path):
    (tmp_path / "file").write_text("x")
    extra, expected = GENERATE_ERRORS[case]
    argv = ["generate", str(TEACHER), "--prompt", PROMPT, "-o", str(tmp_path / "v.mp4"), "--quiet",
            *[a.format(tmp=tmp_path) for a in extra]]
    text = error_of(argv)
    assert text.startswith("sfvideo generate: error: ") and expected.format(tmp=tmp_path) in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_generate_names_a_random_file_and_a_prompt_folder(tmp_path):
    (tmp_path / "random.ckpt").write_bytes(os.urandom(256))
    text = error_of(["generate", str(tmp_path / "random.ckpt"), "--prompt", PROMPT, "-o", str(tmp_path / "v.mp4")])
    assert "random.ckpt is not a checkpoint" in text
    (tmp_path / "prompts").mkdir()
    text = error_of(["generate", str(tmp_path / "random.ckpt"), "--prompts_file", str(tmp_path / "prompts"),
                     "-o", str(tmp_path / "v.mp4")])
    assert "is a directory" in text


@pytest.mark.skipif(TEACHER is None, reason="toy teacher asset not built")
def test_an_overlong_prompt_is_not_echoed_whole(tmp_path):
    text = error_of(["generate", str(TEACHER), "--prompt", "a red circle " * 500, "-o", str(tmp_path / "v.mp4")])
    assert text.startswith("sfvideo generate: error: ") and text.endswith("…")


def test_generate_removes_what_a_killed_run_left_and_keeps_a_live_writers_temporary(tmp_path):
    stale = [tmp_path / ".v.mp4.999999999-0a1b2c3d.partial", tmp_path / ".v.mp4.0a1b2c3d.partial",
             tmp_path / ".v.png.999999999-0a1b2c3d.partial"]
    live = tmp_path / f".v.mp4.{os.getpid()}-0a1b2c3d.partial"
    for p in [*stale, live]:
        p.write_bytes(b"half")
    (tmp_path / "random.pt").write_bytes(os.urandom(64))
    error_of(["generate", str(tmp_path / "random.pt"), "--prompt", PROMPT, "-o", str(tmp_path / "v.mp4")])
    assert not any(p.exists() for p in stale) and live.exists()


# ------------------------------------------------------------------ 7, 8: memory, --version, the exit status
def test_memory_takes_a_config_and_rejects_nonsense(capsys):
    main(["memory", "--config", str(ROOT / "configs/toy/dmd.yaml"), "--gpus", "1", "2"])
    out = capsys.readouterr().out
    assert "teacher toy_teacher" in out and "fits" in out
    assert "--gpus must be positive" in error_of(["memory", "--gpus", "0"])
    assert "--capacity_gb must be positive" in error_of(["memory", "--capacity_gb", "-5"])
    assert "unrecognized arguments: --capacity-gb" in error_of(["memory", "--capacity-gb", "80"])
    assert "unrecognized arguments: --capacity" in error_of(["memory", "--capacity", "80"])  # no abbreviations


def test_version(capsys):
    from sfvideo import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"sfvideo {__version__}"


def test_the_command_exits_2_with_one_quiet_line():
    # The console script: the error on stderr, status 2; no Lightning notes (the "args parameter" warning).
    proc = subprocess.run([sys.executable, "-m", "sfvideo", "fit", "--config", DEBUG, "--trainer.max_step", "3"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sfvideo fit: error: unrecognized arguments: --trainer.max_step 3 (see sfvideo fit --help)"]


def test_progress_bar_counts_generator_steps(tmp_path):
    from sfvideo.cli import SFVideoCLI, run_lightning
    from sfvideo.training.callbacks import GeneratorStepProgressBar

    seen = {}
    original = SFVideoCLI.instantiate_trainer

    def spy(self, **kwargs):
        trainer = original(self, **kwargs)
        seen["bar"] = trainer.progress_bar_callback
        return trainer

    SFVideoCLI.instantiate_trainer = spy
    try:
        run_lightning(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps",
                       "1", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"])
    finally:
        SFVideoCLI.instantiate_trainer = original
    bar = seen["bar"]
    assert isinstance(bar, GeneratorStepProgressBar)
    assert bar.total_train_batches == 1 and bar._get_train_description(0) == "generator steps"


def test_bf16_on_a_cpu_that_emulates_it_warns_naming_the_flag(tmp_path, monkeypatch, capsys):
    from sfvideo.nn import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    main(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
          "--trainer.precision", "bf16-mixed", *QUIET])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert line.startswith("sfvideo fit: warning: --trainer.precision bf16-mixed") and "--trainer.precision 32" in line
    # Nothing to say for fp32, for an accelerator, or on a CPU with bf16 instructions.
    assert precision.cpu_precision_warning("32-true", "cpu") is None
    assert precision.cpu_precision_warning("bf16-mixed", "cuda") is None
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert precision.cpu_precision_warning("bf16-mixed", "cpu") is None
