"""``sfvideo reproduce --quick``: every paradigm, chunk-wise and frame-wise, trained a few steps and reported."""

import json
from dataclasses import replace

import pytest
import torch

from sfvideo.reproduce import (
    PARADIGMS,
    ReproduceConfig,
    StageRecords,
    accumulation,
    bootstrap_mean,
    run_fingerprint,
    snapshot_steps,
)
from sfvideo.training.networks import asset_path

needs_teacher = pytest.mark.skipif(asset_path("toy_teacher") is None, reason="toy teacher asset not built")


def test_accumulation_slope_and_gap():
    t = torch.arange(9, dtype=torch.float64)
    curves = torch.stack([1 - 0.1 * t, 1 - 0.1 * t + 0.02])  # two videos, slope -0.1 per frame
    curves[:, 0] = float("nan")  # an undefined frame (a step metric) is ignored
    acc = accumulation(curves, 3, torch.Generator().manual_seed(0), 50, 0.95)
    assert acc["slope"] == pytest.approx(-0.1)
    # Last 3 frames (6, 7, 8: mean at 7) minus the defined first ones (1, 2: mean at 1.5).
    assert acc["gap"] == pytest.approx(-0.1 * (7 - 1.5))
    assert acc["slope_ci"]["low"] <= acc["slope"] <= acc["slope_ci"]["high"]
    assert len(acc["curve"]) == len(acc["curve_low"]) == 9


def test_bootstrap_mean_and_snapshot_steps():
    stat = bootstrap_mean(torch.tensor([0.0, 1.0, float("nan"), 1.0]), torch.Generator().manual_seed(0), 200, 0.95)
    assert stat["mean"] == pytest.approx(2 / 3) and 0 <= stat["low"] <= stat["mean"] <= stat["high"] <= 1
    assert snapshot_steps(80, 4) == [20, 40, 60, 80] and snapshot_steps(2, 5) == [1, 2]


def test_config_errors_are_one_line():
    base = dict(generator_updates=1, batch_size=1, ode_steps=1, num_prompts=1, seeds=(0,), extrapolation_factors=(2,),
                extrapolation_prompts=1, snapshots=1, num_bootstrap=1, num_subsets=1, gap_frames=1)
    with pytest.raises(ValueError, match="unknown paradigms"):
        ReproduceConfig(**base, paradigms=("nope",))
    with pytest.raises(ValueError, match="not a multiple of every chunk size"):
        ReproduceConfig(**base, num_frames=4, frames_per_chunk=(3, 1))


def test_set_overrides_one_field_typed_and_names_a_bad_one():
    from sfvideo.demo import config_path
    from sfvideo.reproduce import load_config, main

    path = config_path("reproduce.yaml")
    base = load_config(path)
    cfg = load_config(path, ["frames_per_chunk=[3]", "generator_updates=7"])
    assert cfg.frames_per_chunk == (3,) and cfg.generator_updates == 7
    assert replace(cfg, frames_per_chunk=base.frames_per_chunk, generator_updates=base.generator_updates) == base
    with pytest.raises(ValueError, match="'nope=1' is not FIELD=VALUE"):
        load_config(path, ["nope=1"])
    with pytest.raises(ValueError, match="generator_updates"):
        load_config(path, ["generator_updates=0"])
    with pytest.raises(SystemExit):
        main(["--set", "frames_per_chunk"])


@pytest.mark.parametrize("teacher", [None, "/elsewhere/candidate"])
def test_every_stage_takes_its_teacher_from_the_config(tmp_path, monkeypatch, teacher):
    """``--teacher``: the many-step baselines start from it, every other stage distils from it; without it the
    configs' own ``toy_teacher`` (the shipped asset) stays in force. The stages are recorded, not run."""
    import sfvideo.reproduce as reproduce

    cfg = ReproduceConfig(generator_updates=1, batch_size=1, ode_steps=1, num_prompts=1, seeds=(0,),
                          extrapolation_factors=(2,), extrapolation_prompts=1, snapshots=1, num_bootstrap=1,
                          num_subsets=1, gap_frames=1, teacher=teacher)
    stages = {**PARADIGMS, "ode": reproduce.ODE}
    runs = {}
    monkeypatch.setattr(reproduce, "_run_fit", lambda cfg, config, root, name, extra: runs.setdefault(name, extra))
    for key, paradigm in stages.items():
        reproduce.train_stage(cfg, tmp_path, key, paradigm, 3, 21, 21, None if paradigm.kind != "distillation"
                              else tmp_path / "ode")
    assert set(runs) == {f"{key}_f3" for key in stages}
    for key, paradigm in stages.items():
        extra = runs[f"{key}_f3"]
        flag = "--model.init_args.model" if paradigm.kind == "many_step" else "--model.init_args.teacher"
        if teacher is None:
            assert "--model.init_args.teacher" not in extra and "--model.init_args.model" not in extra, key
        else:
            assert extra[extra.index(flag) + 1] == teacher, key


def test_a_teacher_that_is_not_an_export_is_a_one_line_error_naming_the_flag(tmp_path):
    from sfvideo.reproduce import main

    with pytest.raises(SystemExit, match=r"--teacher .*no sfvideo.json"):
        main(["--quick", "--out", str(tmp_path / "out"), "--teacher", str(tmp_path)])


def test_stage_records_reuse_only_matching_finished_stages(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "w.bin").write_bytes(b"abc")
    base = dict(generator_updates=1, batch_size=1, ode_steps=1, num_prompts=1, seeds=(0,), extrapolation_factors=(2,),
                extrapolation_prompts=1, snapshots=1, num_bootstrap=1, num_subsets=1, gap_frames=1)
    fp = run_fingerprint(ReproduceConfig(**base), teacher)
    assert fp != run_fingerprint(ReproduceConfig(**{**base, "generator_updates": 2}), teacher)
    # which stages run does not change what one stage computes: adding a chunking or a paradigm reuses the others
    assert fp == run_fingerprint(ReproduceConfig(**base, frames_per_chunk=(3,), paradigms=("sf_dmd",)), teacher)
    (teacher / "w.bin").write_bytes(b"abd")
    assert fp != run_fingerprint(ReproduceConfig(**base), teacher)

    out = tmp_path / "out"
    StageRecords(out, fp, resume=True).save("sf_dmd_f3", {"horizon": {"x": [1.0, float("nan")]}})
    loaded = StageRecords(out, fp, resume=True)
    entry = loaded.load("sf_dmd_f3")
    assert entry["horizon"]["x"][0] == 1.0 and loaded.reused == ["sf_dmd_f3"]
    assert StageRecords(out, fp, resume=False).load("sf_dmd_f3") is None  # --fresh
    assert StageRecords(out, "other", resume=True).load("sf_dmd_f3") is None  # another config or teacher
    (out / "stages" / "tf_f3.json").write_text('{"fingerprint": ')  # not written by us: recomputed
    assert StageRecords(out, fp, resume=True).load("tf_f3") is None
    assert not list((out / "stages").glob("*.tmp*"))


@needs_teacher
def test_reproduce_quick_runs_every_paradigm_and_writes_the_report(tmp_path):
    from sfvideo.cli import main

    out = tmp_path / "repro"
    main(["reproduce", "--quick", "--out", str(out)])
    report = json.loads((out / "reproduction.json").read_text())
    assert set(report["results"]) == {"3", "1"}
    for fpc, results in report["results"].items():
        labels = set(results)
        assert {p.label for p in PARADIGMS.values()} | {"ODE init"} <= labels, fpc
        for label, entry in results.items():
            for split in ("train", "heldout"):
                m = entry["horizon"][split]["metrics"]
                for name in ("persistence", "fd_ratio", "kd_diff"):
                    assert m[name]["low"] <= m[name]["mean"] <= m[name]["high"], (fpc, label, split, name)
            if entry.get("kind") == "teacher":
                continue
            assert entry["training"]["peak_memory_mb"] > 0 and entry["training"]["seconds_per_iteration"] > 0
            assert {"clip_x2", "restricted_x2"} <= set(entry["extrapolation"])
            assert len(entry["extrapolation"]["clip_x2"]["windows"]) == 2
            if entry["kind"] != "ode":
                assert entry["wallclock"] and entry["wallclock"][-1]["generator_steps"] == 2
        for png in (f"accumulation_f{fpc}.png", f"extrapolation_f{fpc}.png"):
            assert (out / png).stat().st_size > 0
    assert (out / "figure6.png").stat().st_size > 0
    md = (out / "reproduction.md").read_text()
    assert "Smoke run" in md and "Self Forcing GAN" in md and "frame-wise" in md
    assert report["resumed_stages"] == []

    # Resume: an interrupted run (here: one stage's record lost) recomputes only what is missing.
    (out / "stages" / "sf_gan_f1.json").unlink()
    main(["reproduce", "--quick", "--out", str(out)])
    again = json.loads((out / "reproduction.json").read_text())
    stages = {p.stem for p in (out / "stages").glob("*.json")}
    assert set(again["resumed_stages"]) == stages - {"sf_gan_f1"} and "teacher" in stages
    reused, first = (json.dumps(r["results"]["3"]["Self Forcing DMD"]["horizon"]) for r in (again, report))
    assert reused == first  # as text: NaN entries (undefined metrics) never compare equal as floats
    assert set(again["results"]["1"]) == set(report["results"]["1"])
