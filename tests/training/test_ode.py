from dataclasses import replace

import lightning as L
import pytest
import torch
from torch import nn

from sfvideo.config import OptimConfig, StepSchedule
from sfvideo.data.ode_pairs import CAUSVID_ODE, generate_ode_pairs, load_ode_pairs
from sfvideo.data.prompts import PromptDataModule
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.sampling import ode_sigmas, record_sigmas_for
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.geometry import VideoGeometry
from sfvideo.losses.ode import ode_regression_loss, sample_chunk_indices
from sfvideo.toy.encoders import ToyTextEncoder
from sfvideo.training import base as ode_mod
from sfvideo.training.ode import ODEInit

GEO = VideoGeometry(num_frames=4, channels=4, height=4, width=4, frames_per_chunk=2)
PROMPTS = ["a red ball", "a blue cube", "a green cone", "a small star"]


class MockTextEncoder:
    """Deterministic embeddings from the prompt's characters; "" encodes to zeros (the negative prompt)."""

    text_len = 3
    dim = 5

    def encode(self, prompts):
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for b, p in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            out[b] = torch.randn(self.text_len, self.dim, generator=g) if p else 0.0
        return out


class MockWan(nn.Module):
    """flow = (1 + a_c) x + b_c + w t + mean(context); records every call."""

    def __init__(self, channels=GEO.channels):
        super().__init__()
        self.a = nn.Parameter(torch.full((channels,), 0.1))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.2, channels))
        self.w = nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, timestep, context, *, attention="bidirectional", frames_per_chunk=1, **kwargs):
        self.calls.append(
            {"x": x.detach().clone(), "timestep": timestep.detach().clone(), "attention": attention,
             "frames_per_chunk": frames_per_chunk, "grad": torch.is_grad_enabled()}
        )  # fmt: skip
        b, f = x.shape[:2]
        t = timestep / 1000
        t = t[:, None].expand(b, f) if t.ndim == 1 else t
        c = (1, 1, -1, 1, 1)
        ctx = context.mean((1, 2)).view(b, 1, 1, 1, 1)
        return x * (1 + self.a.view(c)) + self.b.view(c) + self.w * t[..., None, None, None] + ctx


@pytest.fixture
def mock_builder(monkeypatch):
    built = []

    def build(source, *, overrides=None, seed=0, like=None):
        assert source == "mock"
        torch.manual_seed(seed)
        net = MockWan()
        built.append(net)
        return net

    monkeypatch.setattr(ode_mod, "build_transformer", build)
    return built


def prompt_data(tmp_path, batch_size=2):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return PromptDataModule(prompts_file=str(f), batch_size=batch_size)


def trainer(max_steps):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def make_module(**kw):
    kw.setdefault("teacher", "mock")
    kw.setdefault("geometry", GEO)
    kw.setdefault("text_encoder", MockTextEncoder())
    kw.setdefault("ode", replace(CAUSVID_ODE, num_steps=8))
    return ODEInit(**kw)


# ------------------------------------------------------------------------------------------------ pure pieces


def test_chunk_indices_are_shared_within_a_chunk():
    g = torch.Generator().manual_seed(0)
    idx = sample_chunk_indices(64, 6, 3, 4, g)
    assert idx.shape == (64, 6) and idx.dtype == torch.long
    assert bool((idx[:, :3] == idx[:, :1]).all()) and bool((idx[:, 3:] == idx[:, 3:4]).all())
    assert set(idx.unique().tolist()) == {0, 1, 2, 3}
    assert bool((idx[:, 0] != idx[:, 3]).any())  # chunks draw independently
    assert torch.equal(idx, sample_chunk_indices(64, 6, 3, 4, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="does not split"):
        sample_chunk_indices(1, 5, 3, 4, g)


def test_regression_input_is_the_indexed_state_and_target_the_final_state():
    b, f = 3, 4
    step_sigmas = torch.tensor([1.0, 0.5, 0.0])  # a list ending at 0: its frames carry no loss
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(b, 4, f, 2, 2, 2, generator=g)
    index = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0], [1, 1, 2, 2]])
    context = torch.zeros(b, 3, 5)

    class Recorder(nn.Module):  # flow = 0.25 x, so x0_pred = (1 - sigma / 4) x
        def forward(self, x, timestep, context, *, attention, frames_per_chunk):
            assert attention == "block_causal" and frames_per_chunk == 2
            self.x, self.t = x.clone(), timestep.clone()
            return 0.25 * x

    model = Recorder()
    loss, logs = ode_regression_loss(Denoiser(model), traj, step_sigmas, index, context, frames_per_chunk=2)
    for bi in range(b):
        for fi in range(f):
            assert torch.equal(model.x[bi, fi], traj[bi, index[bi, fi], fi])
    torch.testing.assert_close(model.t, step_sigmas[index] * 1000)
    sigma = step_sigmas[index].view(b, f, 1, 1, 1)
    x0_pred = (1 - sigma / 4) * model.x
    per_frame = (x0_pred - traj[:, -1]).square().mean((2, 3, 4))
    mask = step_sigmas[index] != 0
    torch.testing.assert_close(loss, per_frame[mask].mean())
    torch.testing.assert_close(logs["x0_mse_step1"], per_frame[index == 1].mean())
    with pytest.raises(ValueError, match="expected len"):
        ode_regression_loss(Denoiser(model), traj[:, :3], step_sigmas, index, context, frames_per_chunk=2)


# ------------------------------------------------------------------------------------------------ ODEInit with mocks


def test_two_training_steps_with_mocks(tmp_path, mock_builder):
    module = make_module()
    trainer(2).fit(module, datamodule=prompt_data(tmp_path))
    teacher, generator = module.teacher, module.generator
    assert module.frozen_modules == ("teacher",)
    assert module.generator_steps == 2
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    start = mock_builder[0]
    assert not torch.equal(generator.a, start.a) or not torch.equal(generator.b, start.b)
    torch.testing.assert_close(teacher.a, torch.full_like(teacher.a, 0.1))  # frozen teacher unchanged

    # Teacher: bidirectional, guided (2B batch), ode grid calls per generated batch, one batch per step.
    grid = ode_sigmas(FlowMatchSchedule(shift=8.0), 8, include=record_sigmas_for(module.step_sigmas))
    assert len(grid) == 9  # 8 steps at shift 8 hold the shift-8 warped [1000, 750, 500, 250]
    assert len(teacher.calls) == 2 * 8
    assert all(c["attention"] == "bidirectional" and c["x"].shape[0] == 4 and not c["grad"] for c in teacher.calls)

    # Generator: one block-causal forward per step with per-frame timesteps on the step list, constant per chunk.
    gen_calls = generator.calls
    assert len(gen_calls) == 2
    step_t = (module.step_sigmas * 1000).tolist()
    for c in gen_calls:
        assert c["attention"] == "block_causal" and c["frames_per_chunk"] == GEO.frames_per_chunk and c["grad"]
        t = c["timestep"]
        assert t.shape == (2, GEO.num_frames)
        assert torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 2], t[:, 3])
        assert all(any(abs(v - s) < 1e-3 for s in step_t) for v in t.flatten().tolist())

    # The last step's input is the cached trajectory at the seeded chunk indices.
    traj = module.trajectory_cache.trajectory
    idx = sample_chunk_indices(2, GEO.num_frames, GEO.frames_per_chunk, 4, module.rng(1, 1, 0))
    gather = traj[torch.arange(2)[:, None], idx, torch.arange(GEO.num_frames)[None, :]]
    torch.testing.assert_close(gen_calls[-1]["x"], gather)
    torch.testing.assert_close(gen_calls[-1]["timestep"], (module.step_sigmas[idx] * 1000).float())

    # Export and checkpoint contents.
    assert module.export_generator() is generator
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"]) and ckpt["sfvideo"]["generator_steps"] == 2


def test_reuse_trajectories_generates_once_per_window(tmp_path, mock_builder):
    module = make_module(reuse_trajectories=3)
    trainer(4).fit(module, datamodule=prompt_data(tmp_path))
    assert len(module.teacher.calls) == 2 * 8  # generated at steps 0 and 3
    assert module.trajectory_cache.step == 3


def test_checkpoint_resume_restores_the_step_counter(tmp_path, mock_builder):
    run = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path)  # fmt: skip
    module = make_module()
    L.Trainer(max_steps=2, **run).fit(module, datamodule=prompt_data(tmp_path))
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    resumed = make_module()
    # weights_only=False: hparams hold a VideoGeometry, not on torch's safe-globals list (reported to the lead).
    L.Trainer(max_steps=3, **run).fit(
        resumed, datamodule=prompt_data(tmp_path), ckpt_path=str(ckpt), weights_only=False
    )
    assert resumed.generator_steps == 3
    assert len(resumed.generator.calls) == 1  # only the third step ran


def test_grad_clip_bounds_the_update(tmp_path, mock_builder):
    module = make_module(optim=OptimConfig(grad_clip=1e-3), optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    trainer(1).fit(module, datamodule=prompt_data(tmp_path))
    start = mock_builder[0]
    delta = torch.cat([(p - q).flatten() for p, q in zip(module.generator.parameters(), start.parameters())])
    assert 0 < delta.norm().item() <= 1e-3 + 1e-7


def test_loss_decreases_on_a_fixed_batch(tmp_path, mock_builder):
    module = make_module(reuse_trajectories=1000, optimizer=lambda p: torch.optim.Adam(p, lr=2e-2))
    module.configure_model()
    module.trajectory_cache = data = module.generate_trajectories(PROMPTS[:2])

    def full_loss():
        with torch.no_grad():
            return sum(
                ode_regression_loss(
                    Denoiser(module.generator), data.trajectory, module.step_sigmas,
                    torch.full((2, GEO.num_frames), k), data.cond, frames_per_chunk=GEO.frames_per_chunk,
                )[0].item()
                for k in range(4)
            )  # fmt: skip

    before = full_loss()
    trainer(20).fit(module, datamodule=prompt_data(tmp_path))
    assert len(module.teacher.calls) == 8  # the fixed batch was never regenerated
    assert full_loss() < 0.5 * before


# ------------------------------------------------------------------------------------------------ trajectories files


def test_generate_ode_pairs_file_round_trip_and_training(tmp_path, mock_builder):
    teacher = MockWan()
    sigmas = FlowMatchSchedule(shift=8.0).step_sigmas([1000, 750, 500, 250])
    path = tmp_path / "pairs" / "ode.pt"
    kw = dict(geometry=GEO, step_sigmas=sigmas, ode=replace(CAUSVID_ODE, num_steps=8), seed=3)
    generate_ode_pairs(teacher, MockTextEncoder(), PROMPTS, path, batch_size=3, **kw)
    assert [p.name for p in path.parent.iterdir()] == ["ode.pt"]  # no temporary left behind
    pairs = load_ode_pairs(path)
    assert pairs.prompts == PROMPTS and pairs.trajectories.shape == (4, 5, *GEO.latent_shape(1)[1:])
    torch.testing.assert_close(pairs.sigmas, record_sigmas_for(sigmas))
    # Noise per prompt index: independent of the batch size.
    generate_ode_pairs(teacher, MockTextEncoder(), PROMPTS, tmp_path / "b1.pt", batch_size=1, **kw)
    torch.testing.assert_close(load_ode_pairs(tmp_path / "b1.pt").trajectories, pairs.trajectories)
    # The first state is Gaussian noise, the last one the teacher's sample (different from it).
    assert abs(pairs.trajectories[:, 0].std().item() - 1) < 0.2
    assert not torch.allclose(pairs.trajectories[:, -1], pairs.trajectories[:, 0])

    module = make_module(trajectories=str(path))
    trainer(2).fit(module, datamodule=prompt_data(tmp_path))
    assert module.generator_steps == 2 and not hasattr(module, "teacher")
    assert module.frozen_modules == () and module.engine_modules == ("generator",)
    assert len(module.generator.calls) == 2

    bad = make_module(trajectories=str(path), schedule=StepSchedule(shift=5.0))
    bad.configure_model()
    with pytest.raises(ValueError, match="differ from this run's step sigmas"):
        bad.lookup_trajectories(PROMPTS[:1])
    missing = make_module(trajectories=str(path))
    missing.configure_model()
    with pytest.raises(KeyError, match="not in the trajectories file"):
        missing.lookup_trajectories(["an unknown prompt"])
    with pytest.raises(ValueError, match="not an sfvideo ODE-pairs file"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        load_ode_pairs(tmp_path / "other.pt")


def test_constructor_errors():
    with pytest.raises(ValueError, match="reuse_trajectories"):
        ODEInit(reuse_trajectories=0)
    with pytest.raises(ValueError, match="denoising_steps"):
        ODEInit(schedule=StepSchedule(denoising_steps=[250, 500]))
    with pytest.raises(ValueError, match="start at 1000"):
        ODEInit(schedule=StepSchedule(denoising_steps=[750, 500]))


# ------------------------------------------------------------------------------------------------ real tiny Wan


def test_real_debug_wan_trains_and_loss_decreases(tmp_path):
    pytest.importorskip("sfvideo.nn.wan")
    from sfvideo.toy.world import train_prompts

    prompts = list(train_prompts())[:2]
    f = tmp_path / "toy.txt"
    f.write_text("\n".join(prompts) + "\n")
    module = ODEInit(
        teacher="debug", geometry=GEO, text_encoder=ToyTextEncoder(), reuse_trajectories=1000,
        ode=replace(CAUSVID_ODE, num_steps=4, guidance_scale=3.0),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )  # fmt: skip
    module.configure_model()
    assert module.generator is not module.teacher
    for p, q in zip(module.generator.parameters(), module.teacher.parameters()):
        assert torch.equal(p, q)  # default init = the teacher's weights
    module.trajectory_cache = data = module.generate_trajectories(prompts)
    assert data.trajectory.shape == (2, 5, *GEO.latent_shape(1)[1:])

    def full_loss():
        with torch.no_grad():
            return sum(
                ode_regression_loss(
                    Denoiser(module.generator), data.trajectory, module.step_sigmas,
                    torch.full((2, GEO.num_frames), k), data.cond, frames_per_chunk=GEO.frames_per_chunk,
                )[0].item()
                for k in range(4)
            )  # fmt: skip

    before = full_loss()
    trainer(8).fit(module, datamodule=PromptDataModule(prompts_file=str(f), batch_size=2))
    assert module.generator_steps == 8
    assert full_loss() < 0.6 * before
    teacher_params = dict(module.teacher.named_parameters())
    assert any(not torch.equal(p, teacher_params[n]) for n, p in module.generator.named_parameters())
