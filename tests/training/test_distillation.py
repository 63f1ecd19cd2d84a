"""The distillation paradigms (issue 13): CausVid-style DF/TF + DMD, SF-SiD, SF-GAN over the shared loop, and the
fidelity of what exists (EMA unit, absent EMA, effective batch, recorded cache gradient mode, long rollouts).

Every config runs through the real CLI with tiny overrides (the debug transformer at the toy codec's 48 channels,
6 latent frames, one generator update), and ``sfvideo generate <checkpoint>`` samples what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sfvideo.checkpoints import read_checkpoint
from sfvideo.cli import main
from sfvideo.config import CriticOptimConfig, DiscriminatorConfig, EMAConfig, RolloutConfig
from sfvideo.geometry import VideoGeometry
from sfvideo.losses.gan import GANLossConfig
from sfvideo.toy.encoders import ToyCodec, ToyTextEncoder
from sfvideo.training.gan import SelfForcingGAN
from sfvideo.training.module import CausVidDMD, SelfForcingDMD
from sfvideo.training.sid import SelfForcingSiD
from sfvideo.video import read_mp4

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle moving left on a dark background"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"save_last": True, "every_n_train_steps": 1}}  # every step: last.ckpt = the final state
CALLBACKS = json.dumps([
    CHECKPOINT,
    # The shared evaluation callback, at the end of training (no scorer: the toy metrics need 21 frames).
    {"class_path": "sfvideo.training.callbacks.SampleEvaluator",
     "init_args": {"prompts": [PROMPT], "every_n_generator_steps": 0, "write_videos": False,
                   "scorer": None}},
])
TINY = ["--model.init_args.teacher", "debug",
        "--model.init_args.teacher_overrides", "{in_channels: 48, out_channels: 48}",
        "--model.init_args.geometry.num_frames", "6", "--model.init_args.max_generator_steps", "1",
        "--model.init_args.optim.critic_updates_per_generator_update", "1", "--data.init_args.batch_size", "1",
        "--trainer.callbacks", CALLBACKS, *QUIET]
LATENT_DATA = ["--data.init_args.world.num_frames", "6", "--data.init_args.num_workers", "0"]
PARADIGMS = {"sid": [], "df_dmd": LATENT_DATA, "tf_dmd": LATENT_DATA, "gan": LATENT_DATA}


def fit(root: Path, config: Path, *extra: str) -> Path:
    main(["fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(root), *extra])
    (ckpt,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> dict[str, Path]:
    """One generator update of each paradigm's toy config (cached: the GAN tests read its checkpoint)."""
    return {}


def toy_run(toy_runs: dict[str, Path], tmp_path_factory, name: str) -> Path:
    if name not in toy_runs:
        root = tmp_path_factory.mktemp(name)
        toy_runs[name] = fit(root, ROOT / "configs" / "toy" / f"{name}.yaml", *TINY, *PARADIGMS[name])
    return toy_runs[name]


@pytest.mark.parametrize("name", sorted(PARADIGMS))
def test_each_paradigm_config_trains_and_its_checkpoint_generates(name, toy_runs, tmp_path_factory, tmp_path):
    ckpt = toy_run(toy_runs, tmp_path_factory, name)
    record = read_checkpoint(ckpt)
    expected = {"sid": "SelfForcingSiD", "df_dmd": "CausVidDMD", "tf_dmd": "CausVidDMD", "gan": "SelfForcingGAN"}
    source = {"df_dmd": "diffusion_forcing", "tf_dmd": "teacher_forcing"}.get(name, "self_forcing")
    assert record.module == expected[name] and record.training["source"] == source
    assert record.counter("generator_steps") == 1 and record.counter("critic_steps") == 1
    assert "teacher" not in record.network_names()
    # The record is enough to sample it: the few-step causal sampler at the run's geometry and codec.
    main(["generate", str(ckpt), "--prompt", PROMPT, "-o", str(tmp_path / "out.mp4"), "--quiet"])
    assert read_mp4(tmp_path / "out.mp4").shape == (6, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------------------
# In-process modules on a tiny world: the debug transformer at the toy codec's 12 channels (stride 2), 4 latent
# frames in chunks of 2.

GEO = VideoGeometry(num_frames=4, channels=12, height=4, width=4, frames_per_chunk=2)


def tiny(cls=SelfForcingDMD, **kwargs):
    module = cls(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12}, geometry=GEO,
                 text_encoder=ToyTextEncoder(), codec=ToyCodec(spatial_stride=2), **kwargs)
    module.configure_model()
    return module


class CountingCodec(ToyCodec):
    """The toy codec, counting how many frames each ``encode`` call receives."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoded_frames: list[int] = []

    def encode(self, video):
        self.encoded_frames.append(video.shape[1])
        return super().encode(video)


def test_long_rollouts_draw_a_shared_length_reencode_the_window_start_and_mask_its_first_chunk():
    module = tiny(rollout=RolloutConfig(rollout_frames=8))
    codec = CountingCodec(spatial_stride=2)
    object.__setattr__(module, "_codec", codec)
    cond = ToyTextEncoder().encode([PROMPT])
    lengths = {}
    for step in range(8):
        module.critic_steps = step
        sample = module.rollout(cond, grad=True, role=0, micro=0)
        lengths[step] = sample.num_frames
        assert sample.x.shape[1] == GEO.num_frames  # the teacher's window
        if sample.num_frames == GEO.num_frames:
            assert sample.mask is None  # the official rule: no mask at the minimum length
        else:
            # Longer: the window's first latent is the re-encoded last pixel frame of the prefix (one frame alone),
            # it carries no gradient, and the window's first chunk leaves the loss.
            assert codec.encoded_frames[-1] == 1
            assert sample.mask.tolist() == [False, False, True, True]
            grad = torch.autograd.grad(sample.x[:, 0].sum(), list(module.generator.parameters()), allow_unused=True)
            assert all(g is None or not g.any() for g in grad)
    assert set(lengths.values()) == {4, 6, 8}, lengths  # whole chunks in [geometry.num_frames, rollout_frames]
    # The length is a decision every rank shares: it depends on the step only.
    module.critic_steps = 3
    assert module.rollout(cond, grad=False, role=0, micro=5).num_frames == lengths[3]


def test_long_rollouts_need_a_codec_and_self_forcing():
    with pytest.raises(ValueError, match="needs model.init_args.codec"):
        SelfForcingDMD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12}, geometry=GEO,
                       text_encoder=ToyTextEncoder(), rollout=RolloutConfig(rollout_frames=8))
    with pytest.raises(ValueError, match="applies to source=self_forcing"):
        tiny(CausVidDMD, rollout=RolloutConfig(rollout_frames=8))


def test_the_long_rollout_mask_removes_the_first_chunk_from_the_dmd_gradient():
    module = tiny(rollout=RolloutConfig(rollout_frames=6))
    cond, uncond = module.encode([PROMPT])
    module.critic_steps = next(s for s in range(20) if _length(module, cond, s) == 6)
    sample = module.rollout(cond, grad=True, role=0, micro=0)
    x = sample.x.detach().requires_grad_(True)
    loss, _ = module.generator_objective(type(sample)(x=x, mask=sample.mask, num_frames=6), None, cond, uncond, 0)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad[:, :2].abs().sum() == 0 and grad[:, 2:].abs().sum() > 0


def _length(module, cond, step):
    module.critic_steps = step
    with torch.no_grad():
        return module.rollout(cond, grad=False, role=0, micro=0).num_frames


def test_causvid_sources_denoise_the_batch_latents_in_one_forward():
    calls = []
    for source in ("diffusion_forcing", "teacher_forcing"):
        module = tiny(CausVidDMD, source=source)
        module.generator.register_forward_hook(lambda m, a, kw, o: calls.append(kw["attention"]), with_kwargs=True)
        latents = torch.randn(GEO.latent_shape(2))
        data = {"prompts": [PROMPT, PROMPT], "latents": latents}
        loss, logs = module.generator_loss(data, 0)
        loss.backward()
        assert "dmd_grad_norm" in logs
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert calls == ["block_causal", "teacher_forcing"]  # no rollout, no cache refresh
    with pytest.raises(ValueError, match="needs latents in the batch"):
        tiny(CausVidDMD).generator_loss([PROMPT], 0)


# ---------------------------------------------------------------------------------------------------------------
# SiD


def test_sid_backpropagates_through_the_critic_but_leaves_it_no_gradient():
    module = tiny(SelfForcingSiD, gradient_checkpointing=True)
    assert module.teacher.gradient_checkpointing  # official: on for the real score too
    cond, uncond = module.encode([PROMPT])
    sample = module.rollout(cond, grad=True, role=0, micro=0)
    x = sample.x.detach().requires_grad_(True)
    probe = type(sample)(x=x, mask=None, num_frames=4)
    with module.constant("critic"):  # as Distillation.training_step holds it for the generator update
        loss, _ = module.generator_objective(probe, None, cond, uncond, 0)
        (through_networks,) = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
    assert all(p.grad is None for p in module.critic.parameters()), "the critic got gradient from the SiD loss"
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.critic.parameters())  # thawed after the update
    # The gradient passed through the score networks: with both held fixed (their outputs detached) it is the
    # closed form (f - r) / (n numel), which differs.
    detached = tiny(SelfForcingSiD)
    for name in ("critic", "teacher"):
        getattr(detached, name).load_state_dict(getattr(module, name).state_dict())
        getattr(detached, name).register_forward_hook(lambda m, a, o: o.detach())
    loss_fixed, _ = detached.generator_objective(probe, None, cond, uncond, 0)
    (fixed,) = torch.autograd.grad(loss_fixed, x)
    torch.testing.assert_close(loss_fixed, loss)  # same values, fp64 loss of the same forwards
    assert (through_networks - fixed).abs().max() > 1e-3 * fixed.abs().max()


class GradientSpy:
    """A Lightning callback recording, at each optimizer step, which network steps and whether the critic holds
    gradient."""

    def __new__(cls):
        import lightning as L

        class Spy(L.Callback):
            def __init__(self):
                self.at_step: list[tuple[str, bool]] = []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                gen = {id(p) for p in pl_module.generator.parameters()}
                stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
                which = "generator" if stepped & gen else "critic"
                self.at_step.append((which, any(p.grad is not None for p in pl_module.critic.parameters())))

        return Spy()


def test_sid_training_discards_the_critics_generator_step_gradient(tmp_path):
    import lightning as L

    from sfvideo.data.prompts import PromptDataModule
    from sfvideo.toy.world import train_prompts

    module = SelfForcingSiD(teacher="debug", teacher_overrides={"in_channels": 12, "out_channels": 12},
                            geometry=GEO, text_encoder=ToyTextEncoder(),
                            optim=CriticOptimConfig(critic_updates_per_generator_update=1),
                            max_generator_steps=2)
    spy = GradientSpy()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=PromptDataModule(prompt_source=train_prompts, batch_size=1))
    # Generator steps see no critic gradient; critic steps see only the critic loss's (present).
    assert spy.at_step == [("generator", False), ("critic", True)] * 2


# ---------------------------------------------------------------------------------------------------------------
# GAN


def test_gan_head_is_a_critic_optimizer_group_with_its_lr_multiplier():
    module = tiny(SelfForcingGAN, discriminator=DiscriminatorConfig(lr_multiplier=4.0))
    assert module.head.feature_blocks == (0, 1)  # official (13, 21, 29) of 30 scaled to the 2 debug blocks
    assert "teacher" not in dict(module.named_children()) and module.frozen_modules == ()
    _, critic_opt = module.configure_optimizers()
    trunk, head = critic_opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in module.head.parameters()}
    assert {id(p) for p in trunk["params"]} | {id(p) for p in head["params"]} == {
        id(p) for p in module.critic.parameters()}
    assert head["lr"] == pytest.approx(4.0 * trunk["lr"])


@pytest.mark.parametrize("weights", [(0.0, 0.0), (2.0, 3.0)])
def test_gan_r1_r2_weights_are_wired_into_the_discriminator_loss(weights):
    r1, r2 = weights
    module = tiny(SelfForcingGAN, gan=GANLossConfig(r1_weight=r1, r2_weight=r2))
    data = {"prompts": [PROMPT], "latents": torch.randn(GEO.latent_shape(1))}
    loss, logs = module.critic_loss(data, 0)
    assert (logs["gan_r1"] > 0) == (r1 > 0) and (logs["gan_r2"] > 0) == (r2 > 0)
    # trainer/gan.py: L = gan_D + 0.5 (R1 + R2); fp32 sums of the same values.
    torch.testing.assert_close(loss, logs["gan_d_loss"] + 0.5 * (logs["gan_r1"] + logs["gan_r2"]))
    with pytest.raises(ValueError, match="needs real latents"):
        module.critic_loss([PROMPT], 0)


def _head_state(module):
    return {k: v.detach().clone() for k, v in module.head.state_dict().items()}


def test_one_gan_step_changes_the_head_and_the_generator(toy_runs, tmp_path_factory):
    ckpt = toy_run(toy_runs, tmp_path_factory, "gan")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    fresh = SelfForcingGAN(teacher="debug", teacher_overrides={"in_channels": 48, "out_channels": 48},
                           geometry=VideoGeometry(num_frames=6, channels=48, height=8, width=8, frames_per_chunk=3),
                           text_encoder=ToyTextEncoder(), codec=ToyCodec(spatial_stride=4))
    fresh.configure_model()  # the same seeded initialisation as the run
    for key, value in _head_state(fresh).items():
        assert not torch.equal(state[f"critic.discriminator_head.{key}"], value), key
    assert any(not torch.equal(state[f"generator.{k}"], v) for k, v in fresh.generator.state_dict().items())


def test_gan_warmup_trains_the_head_alone_then_restarts_the_critic_optimizer(tmp_path):
    ckpt = fit(tmp_path / "warmup", ROOT / "configs" / "toy" / "gan.yaml", *TINY, *LATENT_DATA,
               "--model.init_args.discriminator.warmup_steps", "1", "--trainer.limit_train_batches", "1",
               "--trainer.max_epochs", "1")  # one iteration: the warm-up's (max_steps counts generator updates)
    contents = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = contents["state_dict"]
    fresh = SelfForcingGAN(teacher="debug", teacher_overrides={"in_channels": 48, "out_channels": 48},
                           geometry=VideoGeometry(num_frames=6, channels=48, height=8, width=8, frames_per_chunk=3),
                           text_encoder=ToyTextEncoder(), codec=ToyCodec(spatial_stride=4))
    fresh.configure_model()
    assert contents["sfvideo"]["generator_steps"] == 0 and contents["sfvideo"]["critic_steps"] == 1
    for k, v in fresh.generator.state_dict().items():
        assert torch.equal(state[f"generator.{k}"], v), k
    trunk = {k: v for k, v in fresh.critic.state_dict().items() if not k.startswith("discriminator_head.")}
    for k, v in trunk.items():
        assert torch.equal(state[f"critic.{k}"], v), k
    assert any(not torch.equal(state[f"critic.discriminator_head.{k}"], v) for k, v in _head_state(fresh).items())
    # Warm-up optimizer betas (0.9, beta2), official trainer/gan.py.
    assert all(g["betas"] == (0.9, 0.999) for g in contents["optimizer_states"][1]["param_groups"])
    # After the warm-up (iteration 1): a generator update, and the critic optimizer restarted with its own betas.
    after = torch.load(fit(tmp_path / "after", ROOT / "configs" / "toy" / "gan.yaml", *TINY, *LATENT_DATA,
                           "--model.init_args.discriminator.warmup_steps", "1", "--trainer.max_steps", "3"),
                       map_location="cpu", weights_only=False)
    assert after["sfvideo"]["generator_steps"] == 1 and after["sfvideo"]["critic_steps"] == 2
    critic_state = after["optimizer_states"][1]
    assert all(g["betas"] == (0.0, 0.999) for g in critic_state["param_groups"])
    head_ids = critic_state["param_groups"][1]["params"]
    assert {int(critic_state["state"][i]["step"]) for i in head_ids} == {1}  # fresh state: one step since the reset


# ---------------------------------------------------------------------------------------------------------------
# EMA: counted in trainer iterations (critic updates), created then, first folded in at the next generator update.

DEBUG = ROOT / "configs" / "debug.yaml"
NO_CALLBACKS = ["--trainer.callbacks", json.dumps([CHECKPOINT]), *QUIET]


def official_ema_schedule(iterations: int, ratio: int, start: int) -> tuple[int | None, int, bool]:
    """``trainer/distillation.py::Trainer.train`` after ``iterations`` loop iterations: (generator updates before
    the EMA was created, EMA updates since, whether ``save()`` writes it: ``ema_start_step < step``)."""
    step, generator_updates, created_after, lerps = 0, 0, None, 0
    while step < iterations:
        if step % ratio == 0:
            generator_updates += 1
            if created_after is not None:
                lerps += 1
        step += 1
        if step >= start and created_after is None:
            created_after = generator_updates
    return created_after, lerps, start < step


def test_ema_starts_at_the_official_trainer_iteration(tmp_path, capsys):
    ratio, start = 2, 4
    # Official rule: created once the iteration counter reaches 4, from the weights after 2 generator updates
    # (iterations 0, 2); not saved at iteration 4; first updated by the generator update of iteration 4.
    assert official_ema_schedule(4, ratio, start) == (2, 0, False)
    assert official_ema_schedule(6, ratio, start) == (2, 1, True)
    common = [*NO_CALLBACKS, "--model.init_args.ema.start_step", str(start), "--model.init_args.ema.decay", "0.5",
              "--model.init_args.optim.critic_updates_per_generator_update", str(ratio)]
    early = fit(tmp_path / "a", DEBUG, *common, "--model.init_args.max_generator_steps", "2")  # 4 iterations
    late = fit(tmp_path / "b", DEBUG, *common, "--model.init_args.max_generator_steps", "3")  # 6 iterations
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (early, late))
    assert a["sfvideo"]["critic_steps"] == 4 and not a["rank_local"]["generator_ema"]["shadow"]  # not started
    ema = b["rank_local"]["generator_ema"]
    assert b["sfvideo"]["critic_steps"] == 6 and ema["num_updates"] == 1 + 1  # creation + one lerp
    # EMA = decay * (weights after 2 generator updates) + (1 - decay) * (weights after 3): the same seeded run.
    for name, value in ema["shadow"].items():
        want = 0.5 * a["state_dict"][f"generator.{name}"] + 0.5 * b["state_dict"][f"generator.{name}"]
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)  # one fp32 lerp vs. an fp32 mean

    # Asking for an EMA that does not exist is an error everywhere, not the raw weights.
    with pytest.raises(SystemExit, match="EMA starts at trainer iteration 4.*stopped after 4 iterations"):
        main(["generate", str(early), "--prompt", PROMPT, "--use_ema", "--save_latents", str(tmp_path / "x.pt"),
              "-o", str(tmp_path / "x.mp4"), "--quiet"])
    with pytest.raises(SystemExit, match="^sfvideo export: error: .*holds no EMA weights"):
        main(["export", "--ckpt", str(early), "--out", str(tmp_path / "export"), "--ema"])
    assert not (tmp_path / "export").exists()


def test_generate_with_an_absent_ema_is_an_error():
    module = tiny(ema=EMAConfig(decay=0.9, start_step=5))
    with pytest.raises(ValueError, match="has not started yet.*iteration 5"):
        module.generate([PROMPT], use_ema=True)
    module.start_ema_when_due()
    assert not module.ema_ready  # iteration 0 < 5
    module.critic_steps = 5
    module.start_ema_when_due()
    assert module.ema_ready and module.generate([PROMPT], use_ema=True).shape == GEO.latent_shape(1)
    with pytest.raises(ValueError, match="keeps no EMA.*decay is 0"):
        tiny(ema=EMAConfig(decay=0.0)).generate([PROMPT], use_ema=True)


# ---------------------------------------------------------------------------------------------------------------
# Effective batch and the recorded cache gradient mode


def test_effective_batch_is_logged_recorded_and_checked_against_the_recipe(tmp_path, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO)
    args = [*NO_CALLBACKS, "--model.init_args.max_generator_steps", "1",
            "--model.init_args.rollout.cache_grad_mode", "straight_through"]
    with pytest.warns(UserWarning, match=r"effective batch 2 differs from the recipe's 64"):
        ckpt = fit(tmp_path / "a", DEBUG, *args, "--model.init_args.optim.recipe_effective_batch", "64")
    assert "effective batch 2 = 1 devices x 1 nodes x micro-batch 2 x 1 accumulated" in caplog.text
    record = read_checkpoint(ckpt)
    assert record.training["effective_batch"] == 2
    # The gradient mode through the KV cache is part of the run's record (and of its inference settings).
    assert record.training["cache_grad_mode"] == "straight_through"
    assert record.settings.cache_grad_mode == "straight_through"
    events = EventAccumulator(str(next((tmp_path / "a").glob("lightning_logs/version_*"))))
    events.Reload()
    assert {e.value for e in events.Scalars("batch/effective")} == {2.0}
    # Accumulation splits the per-rank batch: the effective batch is unchanged, and a matching recipe is silent.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="effective batch")
        fit(tmp_path / "b", DEBUG, *args, "--model.init_args.optim.recipe_effective_batch", "2",
            "--model.init_args.optim.accumulate_micro_batches", "2")
    assert "micro-batch 1 x 2 accumulated" in caplog.text


@pytest.mark.parametrize("config", ["dmd.yaml", "dmd_1.3b.yaml", "sid.yaml", "gan.yaml"])
def test_paper_recipe_configs_state_the_cache_mode_and_the_effective_batch(config):
    import yaml

    args = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["init_args"]
    assert args["rollout"]["cache_grad_mode"] in ("straight_through", "truncate")
    assert args["optim"]["recipe_effective_batch"] == 64
    assert args["ema"]["start_step"] == 200


def test_causvid_trains_on_the_final_states_of_an_ode_pairs_file(tmp_path):
    from dataclasses import replace

    from sfvideo.data.latents import ODELatentDataModule
    from sfvideo.data.ode_pairs import CAUSVID_ODE, generate_ode_pairs, load_ode_pairs
    from sfvideo.nn.wan import WanTransformer
    from sfvideo.toy.world import train_prompts

    geo = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
    prompts = list(train_prompts())[:5]
    path = generate_ode_pairs(WanTransformer.from_flavor("debug"), ToyTextEncoder(), prompts, tmp_path / "ode.pt",
                              geometry=geo, step_sigmas=SelfForcingDMD(geometry=geo).step_sigmas,
                              ode=replace(CAUSVID_ODE, num_steps=4))
    data = ODELatentDataModule(str(path), batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    pairs = load_ode_pairs(path)
    # Each update its own rows (consecutive batches of the stream), each latent the final ODE state of its prompt.
    assert set(batch["generator"]["prompts"]).isdisjoint(batch["critic"]["prompts"])
    for part in batch.values():
        rows = [pairs.prompts.index(p) for p in part["prompts"]]
        torch.testing.assert_close(part["latents"], pairs.trajectories[rows, -1].float(), rtol=0, atol=0)
    data.count_consumed_batch()
    assert data.state_dict()["batches_consumed"] == 2  # two stream batches per iteration: resume is exact
    ckpt = fit(tmp_path / "run", DEBUG, *NO_CALLBACKS, "--model", "sfvideo.training.module.CausVidDMD",
               "--model.init_args.source", "teacher_forcing", "--data", "sfvideo.data.latents.ODELatentDataModule",
               "--data.init_args.trajectories", str(path), "--data.init_args.batch_size", "2")
    assert read_checkpoint(ckpt).counter("generator_steps") == 2
