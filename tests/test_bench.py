"""``sfvideo bench generate``: the ``--quick`` preset runs and writes JSON with every section; the GPU preset's
code path (CUDA graphs via the EagerGraph stand-in, the ablation, the time budget) runs on a CPU at tiny sizes; the
FLOP schedule is the engine's; decoder FLOPs agree with the profile in docs/decoders.md; presets parse.

No timing is asserted (timings on a shared CPU are noise); only structure, consistency and finiteness.
"""

import json
import math
from dataclasses import replace

import pytest
import torch

from sfvideo import bench


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_generate_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["generate", "--quick", "--json", str(out), "--chunks", "6", "--baseline_steps", "8"])
    data = json.loads(out.read_text())
    assert set(data) >= {"date", "command", "machine", "preset", "config", "model", "features", "decoders",
                         "streaming", "diffusers", "rolling_vs_recompute", "per_chunk", "wall_s", "skipped"}
    assert data["preset"] == "quick" and data["skipped"] == []
    geo = data["config"]["geometry"]
    f, frames = geo["frames_per_chunk"], geo["num_frames"]
    rows = data["streaming"]
    assert [(r["decoder"], r["overlap"]) for r in rows] == [
        ("none", False), ("wan-narrow:8", True), ("wan-narrow:8", False), ("taehv-narrow:8", True),
        ("taehv-narrow:8", False)]
    steps = len(data["config"]["schedule"]["denoising_steps"])
    for r in rows:
        # The analytic schedule is the engine's: S forwards per chunk plus a refresh per chunk but the last.
        assert r["forwards"] == r["forwards_counted"] == frames // f * (steps + 1) - 1
        assert r["latent_frames"] == frames and len(r["per_call"]) == r["chunks"] == frames // f
        b = r["breakdown"]
        assert b["wall_s"] >= b["denoise_s"] + b["refresh_s"] + b["decode_wait_s"] - 1e-9
        assert _finite_positive(r["transformer_flops_per_s"]) and _finite_positive(r["fps"])
        if r["decoder"] != "none":
            # Same decoder contract as the Wan VAE: 1 + 4 (F - 1) frames, 1 + 4 (f - 1) for the first chunk.
            assert r["pixel_frames"] == 1 + 4 * (frames - 1) and r["first_chunk_pixel_frames"] == 1 + 4 * (f - 1)
            assert 0 < r["bound"]["fraction_of_bound"] and _finite_positive(r["bound"]["bound_fps"])
            assert _finite_positive(r["decoder_flops_per_s"])
    for spec in ("wan-narrow:8", "taehv-narrow:8"):
        assert _finite_positive(data["decoders"][spec]["gflop_per_latent_frame"])
    vs = data["diffusers"]
    # Our weights loaded 1:1 into diffusers' WanTransformer3DModel give the same forward.
    assert vs["parity_max_abs"] < 1e-4
    assert vs["run"]["steps"] == 8 and vs["run"]["pixel_frames"] == rows[1]["pixel_frames"]
    assert len(vs["ratios"]) == len(rows) and all(_finite_positive(r["throughput_ratio"]) for r in vs["ratios"])
    assert set(data["rolling_vs_recompute"]) == {"2x", "4x"}
    for r in data["rolling_vs_recompute"].values():
        assert all(_finite_positive(r[k]) for k in ("rolling_s", "recompute_s", "speedup", "flop_bound"))
        assert r["recompute_flops"] > r["rolling_flops"]
    pc = data["per_chunk"]
    assert pc["fill_chunks"] == frames // f and pc["steady_chunks"] == 6 and pc["chunks"] == frames // f + 6
    assert _finite_positive(pc["last_first_ratio"]) and len(pc["per_chunk_s"]) == pc["chunks"]
    assert res["per_chunk"]["steady_chunks"] == 6


def _tiny_gpu_preset(**changes):
    tiny = dict(device="cpu", dtype="float32", flavor="debug", latent_height=4, latent_width=4, long_latent_height=4,
                long_latent_width=4, train_frames=6, frames_per_chunk=2, text_len=8,
                decoders=("none", "taehv-narrow:8"), baseline_decoder="none", compile=False, graph_kind="eager",
                per_chunk_chunks=4, long_multiples=(2,))
    return replace(bench.PRESETS["gpu"], **{**tiny, **changes})


def test_gpu_preset_code_path_on_cpu_with_eager_graphs():
    res = bench.bench_generate(_tiny_gpu_preset(), log=lambda *a: None)
    feats = res["features"]
    assert feats["cuda_graphs"].startswith("on") and feats["compile"] == "off"
    assert feats["cuda_graph_counts"]["replayed"] > feats["cuda_graph_counts"]["captured"] > 0
    assert [r["decoder"] for r in res["streaming"]] == ["none", "taehv-narrow:8", "taehv-narrow:8"]
    assert all(r["forwards_counted"] is None for r in res["streaming"])  # graph replays bypass the model
    assert [a["name"] for a in res["ablation"]] == ["compile off, CUDA graphs off"]  # no eager row: not compiled
    assert res["per_chunk"]["cuda_graphs"].startswith("on") and "2x" in res["rolling_vs_recompute"]
    assert res["skipped"] == []


def test_keep_going_records_a_failed_decoder_and_measures_the_rest(tmp_path):
    missing = tmp_path / "taew2_1.pth"
    res = bench.bench_generate(_tiny_gpu_preset(decoders=("none", f"taehv:{missing}"), ablation=False,
                                                sections=("streaming",)), log=lambda *a: None)
    assert len(res["errors"]) == 1 and res["errors"][0].startswith(f"decoder taehv:{missing}")
    assert [r["decoder"] for r in res["streaming"]] == ["none"]


def test_time_budget_skips_the_remaining_runs():
    res = bench.bench_generate(_tiny_gpu_preset(time_budget_s=0.0, ablation=False), log=lambda *a: None)
    assert res["streaming"] == [] and "rolling_vs_recompute" not in res and "per_chunk" not in res
    assert "streaming none, overlap -" in res["skipped"] and "per-chunk" in res["skipped"]


def test_stream_calls_are_the_engines_cache_views():
    from sfvideo.config import InferenceSettings
    from sfvideo.geometry import VideoGeometry
    from sfvideo.inference import InferenceEngine, cache_capacity
    from sfvideo.nn.kv_cache import KVCache
    from sfvideo.nn.wan import WanTransformer
    from sfvideo.toy.encoders import ToyTextEncoder

    geo = VideoGeometry(num_frames=6, channels=4, height=4, width=4, frames_per_chunk=2)
    engine = InferenceEngine(WanTransformer.from_flavor("debug").eval(), text_encoder=ToyTextEncoder(),
                             settings=InferenceSettings(geometry=geo))
    views = []  # visible cached frames of every forward the engine makes
    original = KVCache.begin_chunk

    def spy(self, *a, **k):
        step = original(self, *a, **k)
        views.append(len(step.view))
        return step

    KVCache.begin_chunk = spy
    try:
        with engine.session(num_frames=16, window_frames=6, sink_frames=2, decode=False) as session:
            session.start("a red circle moving left on a dark background", seed=0)
            list(session)
    finally:
        KVCache.begin_chunk = original
    calls = bench.stream_calls(16, 2, 4, cache_capacity(16, 6, 2), 6, sink=2)
    # The same views in the same order (chunk k's calls: the refresh of chunk k-1, then k's steps), through the
    # window fill, the evictions and the sink frames.
    assert [v for _, v in calls] == views and len(set(views)) > 2
    assert max(views) == 2 + (6 - 2)  # the sink frames + the window less the chunk itself


def test_decoder_flops_agree_with_the_decoder_profile():
    # docs/decoders.md (scripts/profile_decoders.py): 3376 and 136 GFLOP per latent frame at 240x416.
    from sfvideo.geometry import VideoGeometry

    geo = VideoGeometry(num_frames=21, channels=16, height=30, width=52, frames_per_chunk=3)
    assert bench.decoder_flops_per_latent_frame("wan:96", 16, geo) / 1e9 == pytest.approx(3376, rel=1e-3)
    assert bench.decoder_flops_per_latent_frame("taehv", 16, geo) / 1e9 == pytest.approx(136, rel=5e-3)
    assert bench.decoder_flops_per_latent_frame("none", 16, geo) is None


def test_presets_parse_and_device_peaks():
    for name, cfg in bench.PRESETS.items():
        assert cfg.long_geometry.tokens_per_frame > 0, name
    mid = bench.PRESETS["cpu_mid"]
    model, _ = bench.build_transformer(replace(mid, text_len=2))
    assert 3.9e6 < sum(p.numel() for p in model.parameters()) < 4.1e6 and model.config.num_layers == 6
    assert (mid.geometry.height * 8, mid.geometry.width * 8) == (240, 416)
    gpu = bench.PRESETS["gpu"]
    assert gpu.compile and gpu.cuda_graphs and gpu.time_budget_s < 480 and gpu.flavor == "1.3B"
    assert (gpu.geometry.height * 8, gpu.geometry.width * 8) == (480, 832)
    assert bench.device_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert bench.device_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert bench.device_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.4
    assert bench.device_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert bench.device_peak_tflops("NVIDIA L40S", torch.bfloat16) == 362.1
    assert bench.device_peak_tflops("NVIDIA L4", torch.bfloat16) == 121.0
    assert bench.device_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert bench.device_peak_tflops("Some GPU", torch.bfloat16) is None
    assert bench.parse_decoder_spec("taehv+bf16") == ("taehv", None)
    assert bench.parse_decoder_spec("taehv:/w/taew2_1.pth") == ("taehv", "/w/taew2_1.pth")
    codec = bench.build_decoder("taehv-narrow:8+bf16", 4, "cpu")
    assert codec.dtype == torch.bfloat16 and codec.channels_last
    with pytest.raises(ValueError, match="decoder 'vae:8'"):
        replace(mid, decoders=("vae:8",))


def test_bench_gpu_without_cuda_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit) as e:
        bench.main(["generate", "--gpu", "--out", str(tmp_path / "g.json")])
    assert e.value.code == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "g.json").exists()


def test_report_renders_every_section_of_a_saved_result(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["generate", "--quick", "--json", str(out), "--chunks", "2", "--baseline_steps", "2",
                "--decoders", "none,wan-narrow:8", "--multiples", "2"])
    data = json.loads(out.read_text())
    capsys.readouterr()
    bench.main(["report", str(out), "--markdown"])
    md = capsys.readouterr().out
    # One pipe table per section, with one row per streaming run; the numbers are the JSON's.
    assert md.count("|---|---|") == 4
    for r in data["streaming"]:
        assert f"| {r['fps']:.1f} |" in md and f"| {r['first_chunk_s']:.3f} |" in md
    assert f"| {data['rolling_vs_recompute']['2x']['speedup']:.2f}x |" in md
    assert f"last/first {data['per_chunk']['last_first_ratio']:.3f}" in md
    bench.main(["report", str(out)])  # terminal tables from the same lines
    assert "Where the time goes" in capsys.readouterr().out


def test_report_names_the_file_on_bad_input(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{\"a\": 1}")
    with pytest.raises(SystemExit, match=r"x.json: not a result"):
        bench.main(["report", str(bad)])
    with pytest.raises(SystemExit, match=r"missing.json: no such file"):
        bench.main(["report", str(tmp_path / "missing.json")])
