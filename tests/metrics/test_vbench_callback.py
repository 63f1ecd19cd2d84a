"""The sample-evaluation callback logs VBench scores and GIF sample videos to TensorBoard on the toy world; the
metric's states are summed over ranks (two gloo processes)."""

from __future__ import annotations

import pytest
import torch
from vbench_fixtures import save_tiny_models, uniform_video

from sfvideo.metrics.vbench import VBenchMetric, VBenchModelPaths, VBenchModels


def test_sample_evaluator_logs_vbench_and_videos(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sfvideo.geometry import VideoGeometry
    from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder
    from sfvideo.training.callbacks import SampleEvaluator
    from sfvideo.training.module import SelfForcingDMD

    paths = save_tiny_models(tmp_path / "models")
    # The toy world's geometry (configs/toy/dmd.yaml: 32x32 pixels, 21 frames) with the small debug transformer.
    geo = VideoGeometry(num_frames=21, channels=48, height=8, width=8, frames_per_chunk=3)
    module = SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 48, "out_channels": 48}, geometry=geo,
                            text_encoder=ToyTextEncoder(dim=32, text_len=16), codec=ToyCodec(spatial_stride=4))
    module.configure_model()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    prompts = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
    from sfvideo.evaluation import score_toy_videos

    cb = SampleEvaluator(prompts=prompts, scorer=score_toy_videos,
                         vbench=VBenchModelPaths(dino=paths["dino"], clip_b32=paths["clip_b32"]))
    scores = cb.evaluate(trainer, module, step=0)
    logger.experiment.flush()
    for d in ("subject_consistency", "background_consistency", "temporal_flickering"):
        assert 0.0 <= scores[f"vbench/{d}"] <= 1.0
    assert "vbench/quality" not in scores  # partial: not logged as a number
    assert cb.vbench.last_result["aggregate"]["quality"]["status"] == "partial"
    assert "eval/colour_acc" in scores  # the toy world's exact metrics are still there
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"vbench/subject_consistency", "vbench/temporal_flickering", "vbench_coherence/dino_gap1"} <= set(
        tags["scalars"])
    videos = [t for t in tags["images"] if t.startswith("samples/video_")]
    assert len(videos) == 2
    gif = acc.Images(videos[0])[0]
    assert gif.encoded_image_string[:6] == b"GIF89a" and (gif.height, gif.width) == (32, 32)


def test_callback_config_is_typed():
    from jsonargparse import ArgumentParser

    from sfvideo.training.callbacks import SampleEvaluator

    p = ArgumentParser()
    p.add_class_arguments(SampleEvaluator, "cb")
    cfg = p.parse_args(["--cb.prompts", '["a red circle moving left on a dark background"]',
                        "--cb.vbench.dino", "weights/dino", "--cb.every_n_generator_steps", "5"])
    assert p.instantiate_classes(cfg).cb.vbench.paths.dino == "weights/dino"


def test_metric_states_reduce_over_ranks():
    """Each rank scores its share; torchmetrics reduces every state with its ``dist_reduce_fx`` (all sums) when it
    syncs. ``merge_state`` applies the same reductions in one process: rank 1's states merged into rank 0's give the
    score of all videos scored at once."""
    videos = [uniform_video([10 * k + (t % 2) * (k + 1) * 3 for t in range(16)]) for k in range(4)]
    ranks = [VBenchMetric(VBenchModels.load(), fps=4, max_frames=16) for _ in range(2)]
    for r, m in enumerate(ranks):
        m.update(torch.stack(videos[r::2]))
    from torchmetrics.utilities.data import dim_zero_sum

    assert all(fx is dim_zero_sum for fx in ranks[0]._reductions.values())
    ranks[0].merge_state(ranks[1])
    single = VBenchMetric(VBenchModels.load(), fps=4, max_frames=16)
    single.update(torch.stack(videos))
    got, want = ranks[0].compute(), single.compute()
    assert got["videos"] == 4
    assert got["dimensions"] == pytest.approx(want["dimensions"])
    assert got["long"] == pytest.approx(want["long"])
    assert got["per_frame"]["temporal_flickering"]["value"] == pytest.approx(
        want["per_frame"]["temporal_flickering"]["value"])
