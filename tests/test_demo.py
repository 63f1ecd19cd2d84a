"""``sfvideo demo --teacher``: a candidate teacher reaches both training stages and the evaluation (the stages
themselves are the ordinary CLI, exercised by the training tests; here they are recorded, not run)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import sfvideo.checkpoints
import sfvideo.demo as demo
import sfvideo.export


def test_demo_rejects_a_teacher_that_is_not_an_export_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"--teacher .*no sfvideo.json"):
        demo.main(["--out", str(tmp_path / "out"), "--teacher", str(tmp_path)])


@pytest.mark.parametrize("given", [True, False])
def test_demo_passes_its_teacher_to_both_stages_and_the_evaluation(tmp_path, monkeypatch, given):
    teacher = tmp_path / "candidate"
    teacher.mkdir()
    (teacher / "sfvideo.json").write_text("{}")
    stages, evaluated = [], []

    def fit_stage(config, save_dir, name, *extra):
        stages.append((Path(config).name, name, extra))
        return tmp_path / f"{name}.ckpt"

    def evaluate(out, teacher_dir, ode_dir, sf_dir, **kwargs):
        evaluated.append(teacher_dir)
        return {"train": {"teacher": {"colour_acc": 1.0}}}

    monkeypatch.setattr(demo, "fit_stage", fit_stage)
    monkeypatch.setattr(demo, "_evaluate", evaluate)
    monkeypatch.setattr(sfvideo.export, "export_checkpoint", lambda ckpt, out, **kw: Path(out))
    monkeypatch.setattr(
        sfvideo.checkpoints, "read_checkpoint", lambda path: SimpleNamespace(ema_state=lambda network: None)
    )
    out = tmp_path / "out"
    demo.main(["--out", str(out)] + (["--teacher", str(teacher)] if given else []))

    assert [(config, name) for config, name, _ in stages] == [("ode.yaml", "ode"), ("dmd.yaml", "self_forcing")]
    for _, _, extra in stages:
        flags = list(extra)
        if given:
            assert flags[flags.index("--model.init_args.teacher") + 1] == str(teacher)
        else:  # the configs' own `teacher: toy_teacher` (the shipped asset) stays in force
            assert "--model.init_args.teacher" not in flags
    shipped = sfvideo.training.networks.asset_path("toy_teacher")
    assert evaluated == [teacher if given else shipped]
    assert json.loads((out / "metrics.json").read_text()) == {"train": {"teacher": {"colour_acc": 1.0}}}


def test_demo_overrides_reach_only_the_stage_they_belong_to(tmp_path, monkeypatch):
    stages = []
    monkeypatch.setattr(demo, "fit_stage", lambda config, save_dir, name, *extra: stages.append((name, list(extra))))
    monkeypatch.setattr(demo, "_evaluate", lambda *args, **kwargs: {})
    monkeypatch.setattr(sfvideo.export, "export_checkpoint", lambda ckpt, out, **kw: Path(out))
    monkeypatch.setattr(
        sfvideo.checkpoints, "read_checkpoint", lambda path: SimpleNamespace(ema_state=lambda network: None)
    )
    demo.main(["--out", str(tmp_path), "--ode_steps", "7", "--generator_steps", "5", "--guidance_scale", "2"])
    (ode, ode_flags), (sf, sf_flags) = stages
    assert (ode, sf) == ("ode", "self_forcing")
    assert ode_flags == ["--trainer.max_steps", "7"]
    assert sf_flags[sf_flags.index("--model.init_args.max_generator_steps") + 1] == "5"
    assert sf_flags[sf_flags.index("--model.init_args.dmd.guidance_scale") + 1] == "2.0"
