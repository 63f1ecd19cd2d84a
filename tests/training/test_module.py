"""SelfForcingDMD through the real CLI entry point, resume, and the rollout's gradient paths on a real model."""

import json
from pathlib import Path

import pytest
import torch

from sfvideo.cli import main
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import self_forcing_rollout
from sfvideo.nn.wan import WanTransformer

DEBUG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]


def _fit(tmp_path, *extra):
    main(["fit", "--config", DEBUG, "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET, *extra])


def _last(tmp_path) -> dict:
    (path,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, weights_only=False, map_location="cpu")


def test_fit_writes_tensorboard_events_and_checkpoint(tmp_path):
    _fit(tmp_path)
    run = next(tmp_path.glob("lightning_logs/version_*"))
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events written"
    ckpt = _last(tmp_path)
    # debug.yaml: 2 generator updates, 2 critic updates per generator update -> 4 critic updates.
    assert ckpt["sfvideo"]["generator_steps"] == 2
    assert ckpt["sfvideo"]["critic_steps"] == 4
    assert ckpt["rank_local"]["generator_ema"]["num_updates"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")], "frozen teacher must not be saved"
    assert any(k.startswith("generator.") for k in ckpt["state_dict"])
    assert any(k.startswith("critic.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2


def test_resume_continues_counters_optimizer_and_data_and_matches_uninterrupted(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _fit(straight, "--model.init_args.max_generator_steps", "4")
    _fit(split, "--model.init_args.max_generator_steps", "2")
    first = _last(split)
    _fit(split, "--model.init_args.max_generator_steps", "4", "--ckpt_path", "last")
    resumed, reference = _last(split), _last(straight)
    assert len(list(split.glob("lightning_logs/version_*"))) == 1, "resume must continue in the same run folder"
    assert resumed["sfvideo"]["generator_steps"] == 4 and resumed["sfvideo"]["critic_steps"] == 8
    assert resumed["PromptDataModule"]["batches_consumed"] == reference["PromptDataModule"]["batches_consumed"] == 8
    assert first["optimizer_states"][0]["state"][0]["step"] == 2
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 4
    # Noise and exit steps are derived from the counters and the data position is restored: the resumed run is the
    # uninterrupted run.
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in reference["rank_local"]["generator_ema"]["shadow"].items():
        got = resumed["rank_local"]["generator_ema"]["shadow"][key]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)


def test_bad_flag_value_is_a_clear_error(tmp_path):
    with pytest.raises((SystemExit, ValueError)):
        _fit(tmp_path, "--model.init_args.optim.critic_updates_per_generator_update", "0")


# ---------------------------------------------------------------------------------------------------------------
# The rollout on a real (tiny) transformer: which forwards carry gradient, and where gradient can flow.


def _tiny(seed=0):
    torch.manual_seed(seed)
    return WanTransformer.from_flavor("debug")


def _rollout(model, noise, context, exits, grad_mode):
    cache = model.new_kv_cache(noise.shape[0], 4, noise.shape[1], grad_mode=grad_mode)
    return self_forcing_rollout(
        Denoiser(model),
        noise,
        context,
        step_sigmas=torch.tensor([1.0, 0.9375, 0.8333, 0.625]),
        frames_per_chunk=2,
        kv_cache=cache,
        exit_steps=exits,
        noise_generator=torch.Generator().manual_seed(1),
    )


def test_generator_calls_and_grad_modes_per_rollout():
    model = _tiny()
    calls: list[bool] = []
    model.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    noise = torch.randn(1, 6, 4, 4, 4)
    context = torch.randn(1, 5, 32)
    exits = [2, 0, 3]
    result = _rollout(model, noise, context, exits, "truncate")
    assert len(calls) == sum(e + 2 for e in exits) == result.num_calls
    # Per chunk: `exit` no-grad steps, one grad step (the exit), one no-grad cache refresh.
    expected = [flag for e in exits for flag in [False] * e + [True, False]]
    assert calls == expected


@pytest.mark.parametrize("grad_mode, reaches_earlier_chunk", [("truncate", False), ("straight_through", True)])
def test_gradient_through_the_cache(grad_mode, reaches_earlier_chunk):
    model = _tiny()
    noise = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    context = torch.randn(1, 5, 32)
    result = _rollout(model, noise, context, [0, 0], grad_mode)
    result.x0[:, 2:].square().sum().backward()  # loss on the last chunk only
    earlier = noise.grad[:, :2].abs().sum()
    own = noise.grad[:, 2:].abs().sum()
    assert own > 0
    assert (earlier > 0) == reaches_earlier_chunk, f"{grad_mode}: gradient into chunk 0 = {earlier}"


def test_truncate_and_straight_through_have_identical_forward_values():
    model = _tiny()
    noise = torch.randn(1, 4, 4, 4, 4)
    context = torch.randn(1, 5, 32)
    a = _rollout(model, noise, context, [1, 2], "truncate").x0
    b = _rollout(model, noise, context, [1, 2], "straight_through").x0
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same calls and shapes; straight-through adds an exact 0


def test_export_generator_and_ema_as_diffusers_folder(tmp_path):
    from diffusers import WanTransformer3DModel

    from sfvideo.export import export_checkpoint

    _fit(tmp_path)
    (ckpt,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    plain = WanTransformer.from_pretrained(export_checkpoint(ckpt, tmp_path / "gen"))
    ema = WanTransformer3DModel.from_pretrained(export_checkpoint(ckpt, tmp_path / "ema", ema=True))
    source = json.loads((tmp_path / "ema" / "sfvideo.json").read_text())["source"]
    assert source == {"checkpoint": "last.ckpt", "epoch": state["epoch"], "global_step": state["global_step"],
                      "ema": True} and state["global_step"] > 0
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, state["state_dict"]["generator." + name], rtol=0, atol=0)
    ema_params = dict(ema.named_parameters())
    shadow = state["rank_local"]["generator_ema"]["shadow"]
    for name, value in shadow.items():
        torch.testing.assert_close(ema_params[name], value, rtol=0, atol=0)
    assert any((dict(plain.named_parameters())[k] != v).any() for k, v in shadow.items())
    with pytest.raises(ValueError, match="critic|network"):
        export_checkpoint(ckpt, tmp_path / "x", network="teacher")


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands(tmp_path, subcommand):
    main([subcommand, "--config", DEBUG, "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET])
    assert list(tmp_path.glob("lightning_logs/version_*/events.out.tfevents.*"))


def test_compile_blocks_callback_compiles_the_trained_networks_and_trains_the_same(tmp_path):
    from types import SimpleNamespace

    from sfvideo.training.callbacks import CompileBlocks

    # dynamo with the eager backend: the wiring of the callback without code generation (seconds, not minutes)
    spec = '{"class_path": "sfvideo.training.callbacks.CompileBlocks", "init_args": {"backend": "eager"}}'
    _fit(tmp_path / "plain")
    _fit(tmp_path / "compiled", f"--trainer.callbacks+={spec}")
    plain, compiled = _last(tmp_path / "plain"), _last(tmp_path / "compiled")
    assert plain["state_dict"].keys() == compiled["state_dict"].keys(), "compiling must not rename parameters"
    for key, value in plain["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    module = SimpleNamespace(engine_modules=("generator", "critic"), generator=_tiny(), critic=_tiny(1))
    callback = CompileBlocks(backend="eager")
    callback.on_fit_start(None, module)
    assert callback.compiled == ["generator", "critic"]
    assert all(b._compiled_call_impl is not None for b in [*module.generator.blocks, *module.critic.blocks])
    with pytest.raises(ValueError, match="trains no network"):
        CompileBlocks().on_fit_start(None, SimpleNamespace(engine_modules=()))
