"""SelfForcingDMD under DeepSpeed ZeRO-2 on 2 CPU processes through the real CLI: SIGKILL between checkpoints,
resume with ``--ckpt_path last``, and the result equals an uninterrupted run."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
TIMEOUT_S = 300

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(cwd: Path, *extra: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "sfvideo", "fit", "--config", str(DEBUG), "--trainer.devices", "2",
           "--trainer.strategy", "sfvideo.training.strategies.MultiEngineDeepSpeedStrategy",
           "--trainer.strategy.init_args.stage", "2", "--trainer.strategy.init_args.gradient_clipping", "10.0",
           "--trainer.enable_progress_bar", "false", "--model.init_args.max_generator_steps", "4", *extra]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run may outlive the test
        except ProcessLookupError:
            pass
    (cwd / "log.txt").write_text(out)
    return proc.returncode


def _final(cwd: Path) -> dict:
    state = torch.load(cwd / "lightning_logs/version_0/checkpoints/last.ckpt/generator/mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    return state


def test_zero2_sigkill_then_resume_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert _fit(straight) == 0, (straight / "log.txt").read_text()[-3000:]
    kill = ["--trainer.callbacks+=_kill.KillAfterCriticStep", "--trainer.callbacks.critic_step", "5"]
    assert _fit(killed, *kill) == -signal.SIGKILL, (killed / "log.txt").read_text()[-3000:]
    assert _fit(killed, "--ckpt_path", "last") == 0, (killed / "log.txt").read_text()[-3000:]
    assert "resuming from" in (killed / "log.txt").read_text()
    a, b = _final(straight), _final(killed)
    assert a["sfvideo"]["generator_steps"] == b["sfvideo"]["generator_steps"] == 4
    assert a["sfvideo"]["critic_steps"] == b["sfvideo"]["critic_steps"] == 8
    assert a["PromptDataModule"] == b["PromptDataModule"]
    for key, value in a["module"].items():
        torch.testing.assert_close(b["module"][key], value, rtol=1e-5, atol=1e-6, msg=key)
