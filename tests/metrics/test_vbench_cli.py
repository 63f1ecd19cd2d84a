"""``sfvideo evaluate`` end to end on mp4 folders (two models side by side) and on a generator + prompt file."""

from __future__ import annotations

import json

import pytest
import torch
from vbench_fixtures import save_tiny_models

from sfvideo.cli import main as cli_main
from sfvideo.evaluate import main, prompt_of, read_video
from sfvideo.video import write_mp4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_cli")
    paths = save_tiny_models(root / "models")
    g = torch.Generator().manual_seed(0)
    for model in ("steady", "flicker"):
        (root / model).mkdir()
        for i in range(2):
            base = torch.rand(3, 32, 48, generator=g) * 2 - 1
            video = base.expand(40, -1, -1, -1).clone()  # 40 frames at 8 fps: 5 s, clips of 16 frames
            if model == "flicker":
                video[1::2] += 0.3 * torch.arange(40)[1::2].view(-1, 1, 1, 1) / 40  # grows over time
            write_mp4(root / model / f"a static scene-{i}.mp4", video.clamp(-1, 1), fps=8)
    return root, paths


def _flags(paths):
    # CLIP-L/14 and the aesthetic head are covered in test_vbench_models.py; fewer models keep this test short.
    return [f"--{k}={v}" for k, v in paths.items() if k in ("dino", "clip_b32", "interpolator")]


def test_evaluate_two_folders_report(setup, tmp_path):
    root, paths = setup
    out = tmp_path / "report"
    results = main([str(root / "steady"), f"flick={root / 'flicker'}", *_flags(paths), "--horizon_seconds", "2",
                    "--report", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert set(results) == {"steady", "flick"}
    steady, flick = results["steady"], results["flick"]
    assert steady["videos"] == 2
    # lossy H.264 of a still image: nearly, not exactly, static
    assert steady["dimensions"]["temporal_flickering"] > 0.99 > flick["dimensions"]["temporal_flickering"]
    assert steady["dimensions"]["motion_smoothness"] > flick["dimensions"]["motion_smoothness"]
    assert flick["drift"]["temporal_flickering"]["slope_per_second"] < 0  # flicker grows: the score drifts down
    assert flick["drift"]["temporal_flickering"]["beyond_minus_within_horizon"] < 0
    assert len(flick["per_clip"]["temporal_flickering"]["value"]) == 3  # 40 frames: 16 + 16 + a last one borrowing 8
    for d in ("dynamic_degree", "imaging_quality"):
        assert steady["dimensions"][d] is None and d in steady["missing"]
    assert steady["aggregate"]["total"]["status"] == "partial"
    md = (out / "report.md").read_text()
    assert "| temporal_flickering |" in md and "steady | flick" in md and "partial" in md
    assert "dynamic_degree" in md.split("## Missing dimensions")[1]
    for png in ("temporal_flickering.png", "subject_consistency.png", "coherence.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    saved = json.loads((out / "results.json").read_text())
    names = [v["name"] for v in saved["models"]["flick"]["per_video"]]
    assert names == ["a static scene-0.mp4", "a static scene-1.mp4"]
    assert json.loads((tmp_path / "r.json").read_text())["models"]["steady"]["dimensions"] == steady["dimensions"]


def test_full_info_restricts_dimensions(setup, tmp_path):
    root, paths = setup
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "a static scene", "dimension": ["temporal_flickering"]},
                                {"prompt_en": "a dog", "dimension": ["subject_consistency"]}]))
    r = main([str(root / "steady"), *_flags(paths), "--full_info", str(info), "--quiet"])["steady"]
    assert r["dimensions"]["temporal_flickering"] is not None
    assert r["dimensions"]["subject_consistency"] is None
    assert r["missing"]["subject_consistency"] == "no video was scored for this dimension"
    assert prompt_of(root / "steady" / "a static scene-1.mp4") == "a static scene"


def test_read_video_and_errors(setup, tmp_path, capsys):
    root, _ = setup
    frames, fps = read_video(root / "steady" / "a static scene-0.mp4")
    assert frames.shape == (40, 3, 32, 48) and frames.dtype == torch.uint8 and fps == 8
    with pytest.raises(SystemExit, match="video folder not found"):
        main([str(tmp_path / "none"), "--quiet"])
    with pytest.raises(SystemExit, match="--generator needs --prompts"):
        main(["--generator", "x=y.ckpt", "--quiet"])
    with pytest.raises(SystemExit, match="unknown or unsupported"):
        main([str(root / "steady"), "--dimensions", "scene", "--quiet"])


def test_evaluate_generator_with_prompt_file(tmp_path):
    """A trained generator (debug transformer, toy codec) generates 2 prompts x 2 samples named like VBench's."""
    from sfvideo.geometry import VideoGeometry
    from sfvideo.training.module import SelfForcingDMD

    geo = VideoGeometry(num_frames=6, channels=12, height=4, width=4, frames_per_chunk=2)
    from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder

    m = SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12}, geometry=geo,
                       text_encoder=ToyTextEncoder(), codec=ToyCodec(spatial_stride=2))
    m.configure_model()
    ckpt = tmp_path / "last.ckpt"
    state = {"state_dict": dict(m.state_dict()), "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(state)  # what Lightning writes: weights and the run's record (encoders, settings)
    torch.save(state, ckpt)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a dark background\na blue square moving up on a light background\n")
    out = tmp_path / "out"
    cli_main(["evaluate", "--generator", f"sf={ckpt}", "--prompts", str(prompts), "--samples_per_prompt", "2",
              "--report", str(out), "--quiet"])
    videos = sorted(p.name for p in (out / "videos" / "sf").glob("*.mp4"))
    assert videos == [f"{p}-{i}.mp4" for p in sorted(prompts.read_text().split("\n")[:2]) for i in range(2)]
    r = json.loads((out / "results.json").read_text())["models"]["sf"]
    assert r["videos"] == 4 and r["dimensions"]["temporal_flickering"] is not None
