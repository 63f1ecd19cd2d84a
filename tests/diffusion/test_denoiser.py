import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser, GuidedDenoiser, cfg, guided_x0


class RecordingFlowModel(nn.Module):
    """Deterministic stand-in for WanTransformer.forward: flow = a*x + b*t/1000 (per frame) + mean(context)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, timestep, context, **kwargs):
        self.calls.append({"x": x, "timestep": timestep, "context": context, **kwargs})
        t = timestep / 1000
        t = t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))
        ctx = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return self.a * x + 0.3 * t + ctx


def test_timestep_conversion_and_shapes():
    model = RecordingFlowModel()
    den = Denoiser(model, model_kwargs={"attention": "bidirectional"})
    xt = torch.randn(2, 3, 4, 2, 2)
    ctx = torch.randn(2, 5, 6)
    den(xt, torch.tensor([0.25, 0.5]), ctx)
    torch.testing.assert_close(model.calls[-1]["timestep"], torch.tensor([250.0, 500.0]))
    assert model.calls[-1]["attention"] == "bidirectional"
    den(xt, torch.full((2, 3), 0.625), ctx, attention="block_causal", start_frame=3)
    assert model.calls[-1]["timestep"].shape == (2, 3)
    assert model.calls[-1]["attention"] == "block_causal" and model.calls[-1]["start_frame"] == 3
    den(xt, 0.1, ctx)
    torch.testing.assert_close(model.calls[-1]["timestep"], torch.tensor([100.0, 100.0]))
    with pytest.raises(ValueError, match="sigma"):
        den(xt, torch.ones(3), ctx)


def test_x0_is_xt_minus_sigma_flow():
    model = RecordingFlowModel()
    den = Denoiser(model)
    xt = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    ctx = torch.randn(2, 5, 6, dtype=torch.float64)
    sigma = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]], dtype=torch.float64)
    flow = den.flow(xt, sigma, ctx)
    expected_flow = 0.5 * xt + 0.3 * sigma[..., None, None, None] + ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(flow, expected_flow)
    torch.testing.assert_close(den(xt, sigma, ctx), xt - sigma[..., None, None, None] * expected_flow)


def test_output_dtype_follows_xt_and_gradient_flows():
    model = RecordingFlowModel()
    den = Denoiser(model)
    xt = torch.randn(1, 2, 3, 2, 2).bfloat16()
    out = den(xt, torch.tensor([0.5]), torch.randn(1, 4, 3).bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.a.grad is not None and model.a.grad != 0


def test_cfg_convention():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg(cond, uncond, 3.0).item() == 5.0  # cond + 3 (cond - uncond) == uncond + 4 (cond - uncond)
    assert cfg(cond, uncond, 0.0).item() == 2.0


def test_guided_batched_matches_two_calls():
    model = RecordingFlowModel()
    den = Denoiser(model)
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(2, 3, 4, 2, 2, generator=g)
    cond = torch.randn(2, 5, 6, generator=g)
    uncond = torch.randn(1, 5, 6, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    n0 = len(model.calls)
    batched = guided_x0(den, xt, sigma, cond, uncond, 3.0)
    assert len(model.calls) == n0 + 1 and model.calls[-1]["x"].shape[0] == 4
    two = guided_x0(den, xt, sigma, cond, uncond, 3.0, batched=False)
    assert len(model.calls) == n0 + 3
    torch.testing.assert_close(batched, two)
    expected = cfg(den(xt, sigma, cond), den(xt, sigma, uncond.expand(2, -1, -1)), 3.0)
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(GuidedDenoiser(den, uncond, 3.0)(xt, sigma, cond), expected)
    torch.testing.assert_close(GuidedDenoiser(den, uncond, 0.0)(xt, sigma, cond), den(xt, sigma, cond))
