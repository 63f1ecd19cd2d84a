"""Tests of the multi-network strategies, the sharded EMA and the memory plan.

The distributed tests run ``tests/training/_dist_module.py`` as a subprocess (Lightning launches the second
rank) on CPU with gloo and ``DS_ACCELERATOR=cpu``, under a hard timeout that kills the whole process group.
One launch runs ZeRO-2, ZeRO-3 and FSDP2 one after the other; each trains the tiny two-network module for 8
optimizer steps (2 ranks × batch 2 × accumulation 2), stopping after 4, then resuming from
``ckpt_path="last"`` in a fresh Trainer and module. The result is compared with one uninterrupted
single-process run on batch 8 without accumulation (plain PyTorch, the oracle). The first DeepSpeed run
JIT-builds a CPU comm op (~30 s) into ~/.cache/torch_extensions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sfvideo.geometry import VideoGeometry
from sfvideo.training import memory
from sfvideo.training.ema import ShardedEMA
from sfvideo.training.strategies import (
    FSDP2Strategy,
    MultiEngineDeepSpeedStrategy,
    clip_network_gradients,
    network,
)
from sfvideo.training.strategies import load_rank_local as _load_rank_local
from sfvideo.training.strategies import save_rank_local as _save_rank_local

SCRIPT = Path(__file__).with_name("_dist_module.py")
RUN_TIMEOUT_S = 240
TINY_NUMEL = 4 * (8 * 8 + 8)  # TinyNet(dim=8, depth=2): input, 2 blocks, output Linear(8, 8)
NETWORKS = ("generator", "critic", "teacher")


# ---------------------------------------------------------------------------------------------------------------
# subprocess runs
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root: Path, strategies: tuple[str, ...], *args: str) -> dict[str, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    cmd = [sys.executable, str(SCRIPT), "--strategy", ",".join(strategies), *args, "--root", str(root)]
    # A new session so that a timeout kills the launcher *and* the rank it spawned.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} timed out after {RUN_TIMEOUT_S}s:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[1:])} failed (rc={proc.returncode}):\n{out[-6000:]}")
    runs = {}
    for strategy in strategies:
        files = sorted((root / strategy / "results").glob("rank*.pt"))
        runs[strategy] = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    return runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, batch 8 = 2 ranks × 2 × accumulation 2, no interruption, plain PyTorch."""
    root = tmp_path_factory.mktemp("single")
    (result,) = _launch(root, ("single",), "--devices", "1", "--batch-size", "8", "--max-steps", "8")["single"]
    return result


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> tuple[dict[str, list[dict]], Path]:
    """ZeRO-2, ZeRO-3 and FSDP2, each: 2 ranks × batch 2 × accumulation 2, fit to step 4, then a fresh Trainer
    and module resume from ``last`` to step 8. One launch runs all three (saves two start-ups)."""
    root = tmp_path_factory.mktemp("dist")
    runs = _launch(
        root,
        ("zero2", "zero3", "fsdp2"),
        "--devices",
        "2",
        "--batch-size",
        "2",
        "--accumulate",
        "2",
        "--max-steps",
        "8",
        "--resume-at",
        "4",
    )
    for results in runs.values():
        assert [r["rank"] for r in results] == [0, 1]
    return runs, root


def _assert_same_on_ranks(results: list[dict]) -> None:
    # Data parallelism: every rank applies the same all-reduced update to the same weights with the same kernels,
    # so ranks agree exactly (a mismatch means a desynchronised update, not rounding).
    for name in NETWORKS:
        for key, value in results[0]["params"][name].items():
            torch.testing.assert_close(results[1]["params"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    for key, value in results[0]["ema"].items():
        torch.testing.assert_close(results[1]["ema"][key], value, rtol=0, atol=0)


def _assert_matches_reference(results: list[dict], reference: dict) -> None:
    """Resumed 2-rank run == uninterrupted 1-rank run: counters, per-step losses, weights (teacher untouched), EMA."""
    for r in results:
        assert (r["global_step"], r["generator_steps"], r["critic_steps"]) == (8, 4, 4)
        assert r["micro_steps"] == 16 and r["ema_num_updates"] == 4
        assert not r["teacher_in_optimizer"] and r["num_optimizers"] == 2
    # The loss of a step on 8 samples is the mean of the two ranks' (accumulated) losses on 4 samples each.
    losses = [(a[0] + b[0]) / 2 for a, b in zip(results[0]["history"], results[1]["history"])]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor([h[0] for h in reference["history"]]), rtol=1e-5, atol=1e-6
    )
    for name in NETWORKS:
        for key, value in reference["params"][name].items():
            torch.testing.assert_close(
                results[0]["params"][name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}"
            )
    for key, value in reference["ema"].items():
        torch.testing.assert_close(results[0]["ema"][key], value, rtol=1e-5, atol=1e-6)


def _optimizer_state_numel(results: list[dict]) -> list[int]:
    """Adam moments summed over ranks, per optimizer: the networks' numel, i.e. no teacher state anywhere."""
    return [sum(r["moments"][i]["exp_avg"].numel() for r in results) for i in range(2)]


# ---------------------------------------------------------------------------------------------------------------
# distributed tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_zero2_engines_resume_and_data_parallel_equivalence(distributed_runs, reference):
    results, root = distributed_runs[0]["zero2"], distributed_runs[1] / "zero2"
    assert results[0]["networks"] == {"generator": "DeepSpeedEngine", "critic": "DeepSpeedEngine", "teacher": "TinyNet"}
    assert results[0]["engine_steps"] == {"generator": 4, "critic": 4}
    _assert_same_on_ranks(results)
    _assert_matches_reference(results, reference)
    assert _optimizer_state_numel(results) == [TINY_NUMEL, TINY_NUMEL]
    # ZeRO-2 partitions are contiguous slices of the flat fp32 group (in parameter order), so the two ranks'
    # Adam moments concatenated are the single-process moments: the moments survived the resume.
    for i in range(2):
        for key in ("exp_avg", "exp_avg_sq"):
            joined = torch.cat([r["moments"][i][key] for r in results])
            torch.testing.assert_close(joined, reference["moments"][i][key], rtol=1e-4, atol=1e-7)
    ckpt = root / "ckpt" / "last.ckpt"
    assert {p.name for p in ckpt.iterdir()} >= {"generator", "critic", "rank_local"}
    # The EMA is replicated under ZeRO-2 (written once); the per-rank loss history is not.
    assert {p.name for p in (ckpt / "rank_local").iterdir()} == {"rank_00000.pt", "rank_00001.pt", "replicated.pt"}


@pytest.mark.distributed
def test_zero3_partitions_teacher_and_matches_reference(distributed_runs, reference):
    results = distributed_runs[0]["zero3"]
    assert results[0]["networks"] == {n: "DeepSpeedEngine" for n in NETWORKS}
    _assert_same_on_ranks(results)
    _assert_matches_reference(results, reference)
    numels = _optimizer_state_numel(results)
    assert all(TINY_NUMEL <= n < 2 * TINY_NUMEL for n in numels), numels  # < 2×: no teacher state


@pytest.mark.distributed
def test_fsdp2_shards_per_block_and_matches_reference(distributed_runs, reference):
    results = distributed_runs[0]["fsdp2"]
    assert all(name.startswith("FSDP") for name in results[0]["networks"].values()), results[0]["networks"]
    _assert_same_on_ranks(results)
    _assert_matches_reference(results, reference)
    assert _optimizer_state_numel(results) == [TINY_NUMEL, TINY_NUMEL]
    # One Adam state per parameter tensor (a DTensor shard each): 8 tensors per TinyNet.
    assert all(len(r["moments"][i]["steps"]) == 8 for r in results for i in range(2))


@pytest.mark.distributed
def test_clip_network_gradients_hooks_report_norms(distributed_runs):
    """The resumed half (steps 5-8) of each run logs one norm per update: FSDP2 the current one, DeepSpeed the
    previous one (NaN right after the resume); the critic's exceed max_norm=0.5, so clipping was exercised by the
    equivalence tests above."""
    fsdp2 = [n for _, n in distributed_runs[0]["fsdp2"][0]["grad_norms"]]
    zero2 = [n for _, n in distributed_runs[0]["zero2"][0]["grad_norms"]]
    assert len(fsdp2) == len(zero2) == 4 and max(fsdp2[1::2]) > 0.5
    assert all(n != n for n in zero2[:2])  # NaN: no step of the fresh engines yet
    torch.testing.assert_close(torch.tensor(zero2[2:]), torch.tensor(fsdp2[:2]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# in-process tests
# ---------------------------------------------------------------------------------------------------------------


def test_sharded_ema_follows_closed_form_from_start_step():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = ShardedEMA(decay=0.9, start_step=2)
    assert not ema.update(net, step=1) and not ema.initialized
    w0 = net.weight.detach().clone()
    assert ema.update(net, step=2)
    torch.testing.assert_close(ema.shadow["weight"], w0)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=3)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    state = ema.state_dict()
    assert state["replicated"] and state["num_updates"] == 2
    restored = ShardedEMA()
    restored.load_state_dict(state)
    full = restored.full_state_dict(net)
    assert set(full) == {"weight", "bias"}
    torch.testing.assert_close(full["weight"], ema.shadow["weight"])
    frozen = nn.Linear(3, 3).requires_grad_(False)
    ema_frozen = ShardedEMA(start_step=0)
    ema_frozen.update(frozen, step=0)
    assert ema_frozen.shadow == {}  # only trainable parameters are averaged


def test_sharded_ema_rejects_mismatched_shards():
    ema = ShardedEMA(start_step=0)
    ema.update(nn.Linear(3, 2), step=0)
    with pytest.raises(ValueError, match="local shape"):
        ema.update(nn.Linear(4, 2), step=1)
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(decay=1.0)


def test_rank_local_files_roundtrip_and_check_world_size(tmp_path):
    state = {"ema": {"shadow": torch.ones(2), "replicated": True}, "history": {"values": [1.0]}}
    for rank in (0, 1):
        _save_rank_local(tmp_path, state if rank == 0 else {**state, "history": {"values": [2.0]}}, rank, 2)
    assert {p.name for p in (tmp_path / "rank_local").iterdir()} == {"rank_00000.pt", "rank_00001.pt", "replicated.pt"}
    loaded = _load_rank_local(tmp_path, 1, 2)
    assert loaded["history"]["values"] == [2.0] and torch.equal(loaded["ema"]["shadow"], torch.ones(2))
    with pytest.raises(ValueError, match="world size"):
        _load_rank_local(tmp_path, 0, 4)
    with pytest.raises(FileNotFoundError, match="same world size"):
        _load_rank_local(tmp_path, 3, 4)
    assert _load_rank_local(tmp_path / "absent", 0, 2) is None


def test_deepspeed_config_from_constructor():
    s = MultiEngineDeepSpeedStrategy(
        stage=3,
        bf16=True,
        offload_optimizer=True,
        offload_params=True,
        gradient_clipping=10.0,
        overrides={"zero_optimization": {"reduce_bucket_size": 123}},
    )
    cfg = s.config
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 123
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 10.0
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["managed_gradient_accumulation"] is False
    assert "offload_optimizer" not in s._frozen_config()["zero_optimization"]  # the teacher has no optimizer
    assert MultiEngineDeepSpeedStrategy(stage=1).config["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ValueError, match="stage"):
        MultiEngineDeepSpeedStrategy(stage=4)
    with pytest.raises(ValueError, match="offload_params needs stage=3"):
        MultiEngineDeepSpeedStrategy(stage=2, offload_params=True)


def test_strategies_build_from_lightning_cli_yaml():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    for yaml, cls in (
        (
            "strategy: {class_path: sfvideo.training.strategies.MultiEngineDeepSpeedStrategy, "
            "init_args: {stage: 2, gradient_clipping: 1.0}}",
            MultiEngineDeepSpeedStrategy,
        ),
        (
            "strategy: {class_path: sfvideo.training.strategies.FSDP2Strategy, init_args: {shard_frozen: false}}",
            FSDP2Strategy,
        ),
    ):
        built = parser.instantiate_classes(parser.parse_string(yaml)).strategy
        assert isinstance(built, cls)
    assert built.shard_frozen is False


def test_clip_gradients_checks_deepspeed_config_and_network_falls_back():
    strategy = MultiEngineDeepSpeedStrategy(stage=2, gradient_clipping=1.0)

    class Module(pl.LightningModule):
        engine_modules = ("generator",)

        def __init__(self):
            super().__init__()
            self.generator = nn.Linear(2, 2)

    module = Module()
    assert network(module, "generator") is module.generator  # no trainer: the plain submodule
    module._trainer = types.SimpleNamespace(strategy=strategy)
    clip_network_gradients(module, "generator", None, 1.0)  # DeepSpeed clips in engine.step(); matching is accepted
    with pytest.raises(ValueError, match="gradient_clipping"):
        clip_network_gradients(module, "generator", None, 5.0)


# ---------------------------------------------------------------------------------------------------------------
# memory plan
# ---------------------------------------------------------------------------------------------------------------


def test_memory_plan_matches_hand_computed_values():
    small, large = memory.SIZES["1.3B"], memory.SIZES["14B"]
    # One block: 8d² + 2df + 21d + f.
    assert small.block_params == 8 * 1536**2 + 2 * 1536 * 8960 + 21 * 1536 + 8960 == 46_440_704
    assert 1.40e9 < small.num_params < 1.45e9 and 13.5e9 < large.num_params < 14.5e9
    geometry = VideoGeometry()
    assert geometry.seq_len == 21 * 1560
    # KV cache, 1.3B: 2 (K, V) × 30 layers × 32760 tokens × 1536 × 2 bytes + cross-attention 512 text tokens.
    assert memory.kv_cache_bytes(small, geometry) == 2 * 30 * 32760 * 1536 * 2 + 2 * 30 * 512 * 1536 * 2
    p = small.num_params
    z2 = memory.plan(memory.Setup("zero2", 8, small, small, small))
    assert z2["params"] == 2 * (2 * p)  # bf16 generator + critic, replicated
    assert z2["optimizer"] == 12 * (2 * p) / 8  # fp32 master + Adam m, v, partitioned over 8
    assert z2["ema"] == 4 * p and z2["teacher"] == 2 * p
    z3 = memory.plan(memory.Setup("zero3", 64, small, small, large))
    assert z3["teacher"] == 2 * large.num_params / 64
    assert z3["gathered"] == 2 * 2 * large.block_params
    # Checkpointed generator activations: block inputs (d per token per layer) + one chunk's block recomputed.
    act = memory.activation_bytes(small, 32760, checkpointing=True, tokens_per_forward=3 * 1560)
    assert act == 1536 * 2 * 32760 * 30 + (12 * 1536 + 2 * 8960) * 2 * 3 * 1560
    assert memory.activation_bytes(small, 32760, checkpointing=False, tokens_per_forward=4680) == (
        (12 * 1536 + 2 * 8960) * 2 * 32760 * 30
    )


def test_memory_smallest_fit_and_cli_output(capsys):
    small, large = memory.SIZES["1.3B"], memory.SIZES["14B"]
    best = memory.smallest_fitting(large)
    assert best is not None and memory.fits(best) and best.checkpointing
    smaller = [
        memory.Setup(s, n, small, small, large, checkpointing=c)
        for s in memory.STRATEGIES
        for n in (1, 2, 4, 8, 16, 32, 64)
        if n < best.num_gpus
        for c in (False, True)
    ]
    assert not any(memory.fits(setup) for setup in smaller)
    # Without checkpointing nothing fits, whatever the sharding: activations alone are ~72 GB.
    assert not memory.fits(memory.Setup("zero3", 64, small, small, small, checkpointing=False))
    memory.main([])
    out = capsys.readouterr().out
    assert "zero2" in out and "fsdp2" in out and "smallest fit" in out and out.count("\n") > 20
