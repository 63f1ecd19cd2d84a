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
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI


def constructor_error(error: BaseException) -> str:
    """The one line of a constructor's error. jsonargparse reports a failing subclass constructor as "Does not
    validate against any of the Union subtypes" with the constructor's message among the listed errors; that
    message is the line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    causes = [ln[2:] for ln in lines if ln.startswith("- ") and not ln.startswith("- Expected a <class 'NoneType'>")]
    wrapped = lines[0].startswith("Does not validate against any of the Union subtypes")
    return causes[0] if wrapped and causes else lines[0]


def find_last_checkpoint(log_root: Path) -> Path | None:
    """The most recently written ``version_*/checkpoints/last.ckpt`` under ``log_root``."""
    found = sorted(log_root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class SFVideoCLI(LightningCLI):
    """LightningCLI whose model brings its own two optimizers (generator and critic).

    ``--ckpt_path last`` resumes the newest ``lightning_logs/version_*/checkpoints/last.ckpt`` and keeps logging
    into that version's folder (Lightning alone would look only in the new run's empty folder).
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": ".", "name": "lightning_logs"},
                }
            }
        )

    def instantiate_classes(self) -> None:  # noqa: D102
        # Constructor validation (a bad value, a missing model file, pieces that do not fit) is a one-line usage
        # error, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            self.parser.error(constructor_error(e))

    def before_instantiate_classes(self) -> None:  # noqa: D102
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.get("ckpt_path") != "last":
            return
        logger = cfg.trainer.get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        root = Path(str(init.get("save_dir", "."))) / str(init.get("name", "lightning_logs")) if init else None
        last = find_last_checkpoint(root) if root is not None else None
        if last is None:
            print(f"sfvideo: --ckpt_path last: no last.ckpt under {root}/version_*/checkpoints; starting fresh")
            cfg.ckpt_path = None
            return
        print(f"sfvideo: resuming from {last}")
        cfg.ckpt_path = str(last)
        init.version = last.parent.parent.name


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
    "probe-teacher": (_lazy("sfvideo.probe_teacher"), "How far a toy-world teacher has learned its world."),
    "demo": (_lazy("sfvideo.demo"), "The embedded toy-world job: teacher -> Self Forcing -> samples -> metrics."),
    "reproduce": (_lazy("sfvideo.reproduce"), "Table 2 and Figure 6 of the paper at toy scale, every paradigm."),
}


def run_lightning(args: list[str] | None = None) -> SFVideoCLI:
    return SFVideoCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    """The ``sfvideo`` command (the console script: it returns nothing, so the exit status is 0 or the error's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]][0](argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:16s}{doc}")
        print("\nLightning subcommands (fit, validate, test, predict):\n")
    run_lightning(argv)


if __name__ == "__main__":
    main()
