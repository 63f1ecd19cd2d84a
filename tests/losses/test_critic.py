import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.losses.critic import critic_loss


class PointMassCritic(nn.Module):
    """Exact denoiser of a point mass at ``target``: flow = (xt - target) / sigma, times a trainable gain."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, timestep, context, **kwargs):
        sigma = (timestep / 1000).reshape(*timestep.shape, *([1] * (x.ndim - timestep.ndim)))
        return self.gain * (x - self.target) / sigma


def test_exact_flow_gives_zero_loss_and_gradient_reaches_only_the_critic():
    g = torch.Generator().manual_seed(0)
    gen_param = nn.Parameter(torch.randn(2, 3, 2, 2, 2, generator=g))
    x = gen_param * 2.0  # generator sample, with gradient to the generator
    noise = torch.randn(x.shape, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    model = PointMassCritic(x.detach())
    loss, logs = critic_loss(x, critic=Denoiser(model), context=torch.zeros(2, 1, 1), sigma=sigma, noise=noise)
    assert loss.item() < 1e-10 and loss.dtype == torch.float32
    # A wrong critic gets a positive loss, and only the critic receives gradient.
    model.gain.data.fill_(1.5)
    loss, logs = critic_loss(x, critic=Denoiser(model), context=torch.zeros(2, 1, 1), sigma=sigma, noise=noise)
    expected = (0.5 * (noise - x.detach())).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert gen_param.grad is None
    assert model.gain.grad is not None and model.gain.grad > 0
    assert set(logs) >= {"critic_loss"}


def test_per_frame_sigma():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 1, 2, 2, generator=g)
    noise = torch.randn(x.shape, generator=g)
    model = PointMassCritic(x)
    loss, _ = critic_loss(
        x,
        critic=Denoiser(model),
        context=torch.zeros(2, 1, 1),
        sigma=torch.rand(2, 3, generator=g) * 0.9 + 0.05,
        noise=noise,
    )
    assert loss.item() < 1e-9
