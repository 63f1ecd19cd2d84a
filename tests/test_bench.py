"""``sfvideo bench generate`` in its tiny ``--quick`` mode: runs and writes JSON with the expected keys.

No timing is asserted (timings on a shared CPU are noise); only structure, finiteness and the weight parity.
"""

import json
import math

import pytest
import torch


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_generate_quick_writes_json(tmp_path):
    from sfvideo.bench import main

    out = tmp_path / "bench.json"
    res = main(["generate", "--quick", "--out", str(out), "--chunks", "6"])
    data = json.loads(out.read_text())
    assert set(data) >= {"date", "command", "machine", "config", "vs_diffusers", "rolling_vs_recompute",
                         "per_chunk", "wall_s"}
    vs = data["vs_diffusers"]
    for key in ("sfvideo", "sfvideo_no_decode", "diffusers", "throughput_ratio", "latency_ratio", "parity_max_abs"):
        assert key in vs
    # Our weights loaded 1:1 into diffusers' WanTransformer3DModel give the same forward.
    assert vs["parity_max_abs"] < 1e-4
    assert _finite_positive(vs["throughput_ratio"]) and _finite_positive(vs["latency_ratio"])
    geo = data["config"]["geometry"]
    assert vs["sfvideo"]["latent_frames"] == vs["diffusers"]["latent_frames"] == geo["num_frames"]
    # Same VAE, same length: the same number of pixel frames (1 + 4 (F - 1)).
    assert vs["sfvideo"]["pixel_frames"] == vs["diffusers"]["pixel_frames"] == 1 + 4 * (geo["num_frames"] - 1)
    assert vs["diffusers"]["steps"] == 50
    assert set(data["rolling_vs_recompute"]) == {"2x", "4x"}
    for r in data["rolling_vs_recompute"].values():
        assert all(_finite_positive(r[k]) for k in ("rolling_s", "recompute_s", "speedup"))
    pc = data["per_chunk"]
    assert pc["chunks"] == 6 and len(pc["per_chunk_s"]) == 6 and _finite_positive(pc["last_first_ratio"])
    assert res["per_chunk"]["chunks"] == 6


def test_bench_gpu_without_cuda_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from sfvideo.bench import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--gpu", "--out", str(tmp_path / "g.json")])
    assert e.value.code == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "g.json").exists()
