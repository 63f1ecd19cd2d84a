"""The ``sfvideo`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands (config files, ``--print_config``,
overrides such as ``--trainer.max_steps 10``). Commands that need no Trainer are dispatched first:

- ``generate``: stream a video from a trained generator (``sfvideo.generate``);
- ``bench``: benchmarks printing a table and writing JSON (``sfvideo.bench``);
- ``export``: write the generator (or its EMA) of a Lightning checkpoint as a diffusers folder;
- ``encode-prompts``: precompute umT5 prompt embeddings to disk;
- ``ode-pairs``: write the teacher ODE trajectories of an ODE-initialisation config to disk (``sfvideo.ode_pairs``);
- ``memory``: the per-GPU memory plan of a configuration;
- ``demo``: the embedded toy-world job (``make demo``).

Errors a user can fix are one line, ``sfvideo <command>: error: ...``, and exit status 2; Ctrl-C exits 130
(``sfvideo.errors``). ``sfvideo --version`` prints the version.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sfvideo.errors import EXIT_USAGE, OneLineErrors, fail, nested_error_line, one_line

SUBCOMMANDS = ("fit", "validate", "test", "predict")
CHECKPOINT_WORDS = ("last", "best", "hpc")
"""``--ckpt_path`` values that are not paths (``last``: the newest ``last.ckpt`` of the run folder)."""
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": ".", "name": "lightning_logs"},
}
"""The CLI's logger; its ``save_dir`` follows ``--trainer.default_root_dir`` (an explicit ``--trainer.logger``
wins)."""
FIT_DESCRIPTION = (
    "Fit a model. For the distillation modules (SelfForcingDMD, SiD, GAN, CausVid DMD) --trainer.max_steps counts "
    "generator updates (as model.init_args.max_generator_steps does; Lightning's global_step counts the updates of "
    "both networks) and the progress bar counts generator steps."
)

# Lightning's notes on every run that say nothing about this one.
NOISE_LOGS = ("GPU available", "TPU available", "HPU available", "💡 Tip", "Seed set to", "LOCAL_RANK:")
NOISE_WARNINGS = (
    r"LightningCLI's args parameter",
    r"`max_epochs` was not set",
    r".*isinstance\(treespec, LeafSpec\)",
    r"Found \d+ module\(s\) in eval mode",
    r"Using ModelCheckpoint with manual optimization",
    r"The '\w+_dataloader' does not have many workers",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"The dirpath has changed from",
    r"Checkpoint directory .* exists and is not empty",  # resuming into the run's own folder
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_LOGS)


def silence_lightning_noise() -> None:
    """Drop Lightning's per-run notes (accelerators found, the LitLogger tip, ...) and warnings that do not apply
    to sfvideo's modules; real warnings pass."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def constructor_error(error: BaseException) -> str:
    """The one line of a constructor's error (see :func:`nested_error_line`)."""
    return nested_error_line(str(error)) if str(error).strip() else type(error).__name__


GROUP_FLAGS = {"VideoGeometry.": "--model.init_args.geometry.", "FlowMatchSchedule.": "--model.init_args.schedule.",
               **{f"{g}.": f"--model.init_args.{g}." for g in ("schedule", "rollout", "dmd", "sid", "discriminator",
                                                                "ema", "optim", "sampling", "ode")}}
"""Config groups' own names in their validation messages -> the flags of ``sfvideo fit``."""


def model_flag(message: str) -> str:
    """A config group's validation message in terms of the command's flags (``dmd.guidance_scale`` ->
    ``--model.init_args.dmd.guidance_scale``); the class prefix dropped when the message names its key."""
    named = re.match(r"[\w.]+(?: \([^)]*\))?: (.*)", message)
    if named and named.group(1).startswith(("--", "model.init_args", *GROUP_FLAGS)):
        message = named.group(1)
    for prefix, flag in GROUP_FLAGS.items():
        if message.startswith(prefix):
            return flag + message[len(prefix):]
    return message


class SFVideoParser(OneLineErrors, LightningArgumentParser):
    """The LightningCLI parser with one-line errors and no option abbreviations."""

    def one_line_error(self, message: str) -> str:  # noqa: D102
        return nested_error_line(message)


def find_last_checkpoint(log_root: Path) -> Path | None:
    """The most recently written ``version_*/checkpoints/last.ckpt`` under ``log_root``."""
    found = sorted(log_root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def next_predict_version(log_root: Path) -> str:
    """``predict_<n>``: the next free prediction folder name under ``log_root`` (never a training run's)."""
    taken = {int(m.group(1)) for p in log_root.glob("predict_*") if (m := re.fullmatch(r"predict_(\d+)", p.name))}
    return f"predict_{max(taken, default=-1) + 1}"


def device_count(devices: Any) -> int:
    """Devices asked for by ``--trainer.devices`` (an int, a list, ``"2"``, ``"0,1"``); 1 for ``auto``/-1."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else 1


class SFVideoCLI(LightningCLI):
    """LightningCLI whose model brings its own two optimizers (generator and critic).

    ``--ckpt_path last`` resumes the newest ``<save_dir>/lightning_logs/version_*/checkpoints/last.ckpt`` and keeps
    logging into that version's folder (Lightning alone would look only in the new run's empty folder). The
    default logger's ``save_dir`` is ``--trainer.default_root_dir`` (``.`` unless given). ``predict`` needs a
    checkpoint and writes into a folder of its own, ``<save_dir>/lightning_logs/predict_<n>``.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER})

    @property
    def prog(self) -> str:
        return f"sfvideo {self.config.get('subcommand') or ''}".strip()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:  # noqa: D102
        # Lightning warns when both ``args`` and ``sys.argv`` are given; ``main`` always passes its own list.
        self.config = parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt is None or ckpt in CHECKPOINT_WORDS or str(ckpt).startswith("registry"):
            return
        path = Path(ckpt)
        if not path.exists():
            fail(self.prog, f"--ckpt_path {ckpt}: no such file")
        if path.is_file():
            from sfvideo.checkpoints import read_checkpoint
            from sfvideo.nn.checkpoint import CheckpointError

            try:
                if path.suffix == ".ckpt":
                    read_checkpoint(path)
                super()._parse_ckpt_path()
            except CheckpointError as e:
                fail(self.prog, f"--ckpt_path {ckpt}: {e}")
            except SystemExit:
                raise
            except Exception as e:  # noqa: BLE001 - not a checkpoint: one line naming it
                fail(self.prog, f"--ckpt_path {ckpt} is not a Lightning checkpoint ({type(e).__name__}: "
                                f"{one_line(e, 120)})")

    def instantiate_classes(self) -> None:  # noqa: D102
        # Constructor validation (a bad value, a missing model file, pieces that do not fit) is a one-line usage
        # error, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            hint = f" (the model's hyper-parameters come from --ckpt_path {ckpt})" if ckpt else ""
            fail(self.prog, model_flag(constructor_error(e)) + hint)

    def before_instantiate_classes(self) -> None:  # noqa: D102
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        init = self._follow_default_root_dir(cfg)
        self._check_devices(cfg)
        self._check_optimizers(cfg)
        self._check_precision(cfg)
        ckpt = cfg.get("ckpt_path")
        if sub == "predict" and ckpt is None:
            fail(self.prog, "needs --ckpt_path: a trained checkpoint (.ckpt), or last for the newest run's "
                            "last.ckpt (an untrained model predicts noise)")
        if ckpt == "last":
            root = Path(str(init.get("save_dir", "."))) / str(init.get("name", "lightning_logs")) if init else None
            last = find_last_checkpoint(root) if root is not None else None
            if last is None:
                if sub != "fit":
                    fail(self.prog, f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints")
                print(f"sfvideo: --ckpt_path last: no last.ckpt under {root}/version_*/checkpoints; starting fresh")
                cfg.ckpt_path = None
            else:
                print(f"sfvideo: {'resuming' if sub == 'fit' else sub + 'ing'} from {last}")
                cfg.ckpt_path = str(last)
                if sub == "fit":
                    init.version = last.parent.parent.name
        if sub == "predict" and init is not None and init.get("version") is None:
            # Its own folder: never a training run's (whose config.yaml it would overwrite).
            root = Path(str(init.get("save_dir", "."))) / str(init.get("name", "lightning_logs"))
            init.version = next_predict_version(root)

    def _follow_default_root_dir(self, cfg: Namespace) -> Namespace | None:
        """The logger's ``init_args`` (None for no logger / another kind); the default logger's ``save_dir`` set to
        ``--trainer.default_root_dir`` when that is given."""
        logger = cfg.trainer.get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or "save_dir" not in init:
            return None
        root = cfg.trainer.get("default_root_dir")
        default = logger.get("class_path") == DEFAULT_LOGGER["class_path"] and str(init.save_dir) == "."
        if root is not None and default:
            init.save_dir = str(root)
        return init

    def _check_devices(self, cfg: Namespace) -> None:
        devices, strategy = cfg.trainer.get("devices", "auto"), cfg.trainer.get("strategy", "auto")
        if device_count(devices) > 1 and strategy in ("auto", None):
            fail(self.prog, f"--trainer.devices {devices} needs a strategy for several networks: --trainer.strategy "
                            "sfvideo.training.strategies.MultiEngineDeepSpeedStrategy (DeepSpeed ZeRO) or "
                            "sfvideo.training.strategies.FSDP2Strategy (docs/distributed.md)")

    def _check_precision(self, cfg: Namespace) -> None:
        """A warning, not an error: bf16 on a CPU that emulates it still computes the same thing, slowly."""
        from sfvideo.nn.precision import cpu_precision_warning

        warning = cpu_precision_warning(cfg.trainer.get("precision"), cfg.trainer.get("accelerator", "auto"))
        if warning is not None:
            print(f"{self.prog}: warning: {warning}", file=sys.stderr)

    def _check_optimizers(self, cfg: Namespace) -> None:
        """Build each optimizer of the model's config on a dummy parameter, so a bad value (``lr -1``) is an error
        naming its key now, not a traceback once the networks are built."""
        import torch
        from jsonargparse._typehints import import_object  # noqa: PLC2701 - jsonargparse's own class resolver

        init_args = (cfg.get("model") or Namespace()).get("init_args") or Namespace()
        for key, value in vars(init_args).items():
            if not isinstance(value, Namespace) or "class_path" not in value or "." in key:
                continue
            try:
                cls = import_object(value.class_path)
            except Exception:  # noqa: BLE001 - not ours to judge here
                continue
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                continue
            kwargs = value.get("init_args")
            kwargs = kwargs.as_dict() if isinstance(kwargs, Namespace) else dict(kwargs or {})
            try:
                cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
            except (ValueError, TypeError) as e:
                fail(self.prog, f"--model.init_args.{key} ({value.class_path}): {one_line(e)}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:  # noqa: D102
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.callbacks import RichProgressBar

        from sfvideo.training.callbacks import FinalLastCheckpoint, GeneratorStepProgressBar

        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar and hasattr(self.model, "generator_steps"):
            trainer.callbacks[trainer.callbacks.index(bar)] = GeneratorStepProgressBar()
        if trainer.checkpoint_callbacks and not any(isinstance(c, FinalLastCheckpoint) for c in trainer.callbacks):
            # Before the checkpoint callbacks (Lightning runs them last): last.ckpt is the final state.
            trainer.callbacks.insert(0, FinalLastCheckpoint())
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        log_dir = self.trainer.log_dir
        if subcommand == "predict":
            print(f"sfvideo: predictions go to {log_dir}")
        existed = log_dir is not None and Path(log_dir).exists()
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            if log_dir is not None and not existed:
                shutil.rmtree(log_dir, ignore_errors=True)  # nothing half-made is left
            lines = [ln.strip() for ln in str(e).splitlines()]
            detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                          lines[0])
            ckpt = self.config[subcommand].get("ckpt_path")
            fail(self.prog, f"--ckpt_path {ckpt} does not match the config (--config / --model.*): {detail}")


def _lazy(module: str, attr: str = "main") -> Callable[[list[str]], Any]:
    def run(argv: list[str]) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "generate": (_lazy("sfvideo.generate"), "Stream a video from a trained generator."),
    "bench": (_lazy("sfvideo.bench"), "Benchmarks: print a table and write JSON."),
    "export": (_lazy("sfvideo.export"), "Export a generator (or its EMA) as a diffusers folder."),
    "encode-prompts": (_lazy("sfvideo.encode_prompts"), "Precompute prompt embeddings."),
    "ode-pairs": (_lazy("sfvideo.ode_pairs"), "Write the teacher's ODE trajectories of an ODEInit config, resumably."),
    "memory": (_lazy("sfvideo.training.memory"), "Per-GPU memory plan of a configuration."),
    "serve": (_lazy("sfvideo.serve.command"), "A local web page streaming a generator live, with prompt switching."),
    "evaluate": (_lazy("sfvideo.evaluate"), "VBench quality dimensions, curves over time and a report."),
    "curves": (_lazy("sfvideo.curves"), "Training curves of a run as a PNG and a CSV."),
    "probe-teacher": (_lazy("sfvideo.probe_teacher"), "How far a toy-world teacher has learned its world."),
    "demo": (_lazy("sfvideo.demo"), "The embedded toy-world job: teacher -> Self Forcing -> samples -> metrics."),
    "reproduce": (_lazy("sfvideo.reproduce"), "Table 2 and Figure 6 of the paper at toy scale, every paradigm."),
}


def run_lightning(args: list[str] | None = None) -> SFVideoCLI:
    silence_lightning_noise()
    parser_kwargs: dict[str, Any] = {"prog": "sfvideo"}
    for sub in SUBCOMMANDS:
        parser_kwargs[sub] = {"prog": f"sfvideo {sub}"}
    parser_kwargs["fit"]["description"] = FIT_DESCRIPTION
    return SFVideoCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_class=SFVideoParser,
        parser_kwargs=parser_kwargs,
        args=args,
    )


def dispatch(argv: list[str]) -> None:
    if argv and argv[0] in ("--version", "-V"):
        from sfvideo import __version__

        print(f"sfvideo {__version__}")
        return
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]][0](argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:16s}{doc}")
        print("\nLightning subcommands (fit, validate, test, predict):\n")
    try:
        run_lightning(argv)
    except UnicodeDecodeError:
        # A binary --config: jsonargparse reads it as text before it can say which file.
        sub = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), None)
        config = config or next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-c="))), "?")
        fail(f"sfvideo {sub}" if sub else "sfvideo", f"--config {config} is not a text (YAML) file")


def main(argv: list[str] | None = None) -> None:
    """The ``sfvideo`` command.

    Called with ``argv`` (tests, other Python code) an error is raised as ``SystemExit("sfvideo <command>: error:
    ...")``; as the console script (no ``argv``) the line goes to stderr and the exit status is 2
    (``sfvideo.errors``).
    """
    if argv is not None:
        dispatch(list(argv))
        return
    try:
        dispatch(list(sys.argv[1:]))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        raise


if __name__ == "__main__":
    main()
