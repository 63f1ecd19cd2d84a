"""Every file in configs/ parses against the real CLI (types, class paths, keys), without building models."""

from pathlib import Path

import pytest

from sfvideo.cli import SFVideoCLI

ALL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
RUN_CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("reproduce")]  # `sfvideo reproduce`'s own run configs
CONFIGS = [p for p in ALL_CONFIGS if p not in RUN_CONFIGS]  # LightningCLI configs


class _ParseOnly(SFVideoCLI):
    def instantiate_classes(self) -> None:  # parse and type-check only; building 14B models is not the point
        pass


def test_there_are_configs():
    assert any(p.name == "dmd.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path):
    cli = _ParseOnly(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(path)],
    )
    assert "model" in cli.config


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_reproduce_config_parses(path):
    from sfvideo.reproduce import ODE, PARADIGMS, load_config

    cfg = load_config(path)
    assert cfg.paradigms
    toy = {p.name for p in CONFIGS if p.parent.name == "toy"}
    for name in cfg.paradigms:  # every fit config a run trains is a toy config (each parsed above)
        assert PARADIGMS[name].config in toy
    assert ODE.config in toy


def test_config_with_an_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")
        .read_text()
        .replace("    teacher: debug", "    teacher: debug\n    tacher_typo: 1")
    )
    with pytest.raises(SystemExit):
        _ParseOnly(
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            run=False,
            args=["--config", str(bad)],
        )


@pytest.mark.parametrize(
    "override, keys",
    [
        (["--model.init_args.geometry.channels", "12"],
         ("model.init_args.geometry.channels", "model.init_args.teacher")),
        (["--model.init_args.text_encoder.init_args.dim", "16"],
         ("model.init_args.text_encoder", "model.init_args.teacher")),
    ],
)
def test_pieces_that_do_not_fit_are_one_line_errors_naming_both_keys(override, keys):
    # geometry.channels must equal the teacher's in_channels (and the codec's latent channels); the text
    # encoder's width must equal the teacher's text_dim. Checked when the module is built, before any network.
    from sfvideo.cli import main

    debug = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(debug), *override])
    error = e.value.code
    assert error.startswith("sfvideo fit: error: ") and "\n" not in error and all(key in error for key in keys), error
