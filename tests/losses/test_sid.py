"""SiD loss on Gaussians, where teacher and critic denoisers are exact in closed form (as tests/losses/test_dmd.py).

For data N(mu, s^2) per element noised as xt = (1 - sigma) x + sigma eps, with a = 1 - sigma,
E[x0 | xt] = mu + k (xt - a mu), k = a s^2 / (a^2 s^2 + sigma^2), so d E / d x = k a elementwise.
With r, f the teacher/critic estimates, d = r - f, n the (stopped) normaliser and L = mean d ((r - x) - alpha d) / n:
    dL/dx = [d' (r - x - alpha d) + d (r' - 1 - alpha d')] / (n numel),   r' = k_r a, d' = (k_r - k_f) a.
"""

import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.losses.dmd import dmd_loss
from sfvideo.losses.sid import sid_loss

SHAPE = (4, 3, 2, 2, 2)  # (B, F, C, H, W)


def gain(sigma, s):
    """k a = d E[x0 | xt] / d x for data std s, shaped to broadcast over (B, F, C, H, W)."""
    a = 1 - sigma.reshape(-1, 1, 1, 1, 1)
    sig = sigma.reshape(-1, 1, 1, 1, 1)
    return a * s**2 / (a**2 * s**2 + sig**2) * a


def exact_x0(xt, sigma, mu, s):
    a = 1 - sigma.reshape(-1, *([1] * (xt.ndim - 1)))
    sig = sigma.reshape(-1, *([1] * (xt.ndim - 1)))
    k = a * s**2 / (a**2 * s**2 + sig**2)
    return mu + k * (xt - a * mu)


class ExactGaussianModel(nn.Module):
    """Flow model whose x0 is E[x0 | xt] of N(mu_c, s^2); c = round(context[:, 0, 0]) picks the mean. ``p`` (=1)
    multiplies the flow, so it receives gradient whenever the loss differentiates through the model."""

    def __init__(self, *mus, s=0.5):
        super().__init__()
        self.mus = [m.double() for m in mus]
        self.s = s
        self.p = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, timestep, context, **kwargs):
        sigma = timestep.double() / 1000
        mu = torch.stack([self.mus[i] for i in context[:, 0, 0].round().long().tolist()])
        x0 = exact_x0(x, sigma, mu, self.s)
        return self.p * (x - x0) / sigma.reshape(-1, 1, 1, 1, 1)


def contexts(batch):
    return torch.zeros(batch, 2, 3, dtype=torch.float64), torch.ones(1, 2, 3, dtype=torch.float64)


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_real = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(SHAPE[1:], generator=g, dtype=torch.float64))
    z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.3, 0.7, 0.98], dtype=torch.float64)
    return mu_real, theta, z, noise, sigma


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_gradient_through_both_networks_matches_closed_form(alpha):
    mu_real, theta, z, noise, sigma = make_case()
    s_real, s_fake = 0.5, 0.8  # different stds: d(r - f)/dx != 0, so the network paths matter
    teacher_model = ExactGaussianModel(mu_real, mu_real, s=s_real)
    critic_model = ExactGaussianModel(theta.detach(), s=s_fake)
    x = (theta.detach() + s_fake * z).requires_grad_(True)
    cond, uncond = contexts(SHAPE[0])
    loss, logs = sid_loss(
        x, teacher=Denoiser(teacher_model), critic=Denoiser(critic_model), cond=cond, uncond=uncond, sigma=sigma,
        noise=noise, alpha=alpha, guidance_scale=0.0,
    )  # fmt: skip
    loss.backward()
    assert loss.dtype == torch.float64
    xd = x.detach()
    xt = (1 - sigma.reshape(-1, 1, 1, 1, 1)) * xd + sigma.reshape(-1, 1, 1, 1, 1) * noise
    r, f = exact_x0(xt, sigma, mu_real, s_real), exact_x0(xt, sigma, theta.detach(), s_fake)
    d = r - f
    n = (xd - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # the DMD normaliser, no gradient
    r_prime, d_prime = gain(sigma, s_real), gain(sigma, s_real) - gain(sigma, s_fake)
    expected = (d_prime * (r - xd - alpha * d) + d * (r_prime - 1 - alpha * d_prime)) / n / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(loss, (d * ((r - xd) - alpha * d) / n).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logs["sid_grad_norm"], (d / n).abs().mean().float())
    # No no_grad around either score network: both models' parameters are in the graph.
    assert teacher_model.p.grad is not None and teacher_model.p.grad.abs() > 0
    assert critic_model.p.grad is not None and critic_model.p.grad.abs() > 0


def test_equal_stds_give_the_dmd_direction_scaled_by_one_minus_gain():
    """With equal stds d(r - f)/dx = 0 and dL/dx = (f - r)(1 - k a) / (n numel): DMD's gradient times (1 - k a)."""
    mu_real, theta, z, noise, sigma = make_case(1)
    teacher = Denoiser(ExactGaussianModel(mu_real, torch.zeros_like(mu_real)))
    critic = Denoiser(ExactGaussianModel(theta.detach()))
    cond, uncond = contexts(SHAPE[0])
    kw = dict(teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=3.0)
    x_sid = (theta.detach() + 0.5 * z).requires_grad_(True)
    sid_loss(x_sid, **kw)[0].backward()
    x_dmd = x_sid.detach().clone().requires_grad_(True)
    dmd_loss(x_dmd, **kw)[0].backward()
    # CFG is affine with weights summing to 1, so the guided teacher's gain is still k a.
    torch.testing.assert_close(x_sid.grad, x_dmd.grad * (1 - gain(sigma, 0.5)), rtol=1e-9, atol=1e-14)
    assert torch.all(x_sid.grad * x_dmd.grad >= 0)  # same sign everywhere


def test_alpha_subtracts_the_squared_normalised_difference():
    mu_real, theta, z, noise, sigma = make_case(2)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_real))
    critic = Denoiser(ExactGaussianModel(theta.detach(), s=0.7))
    cond, uncond = contexts(SHAPE[0])
    x = theta.detach() + 0.5 * z
    kw = dict(teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=0.0)
    l0, l1 = sid_loss(x, alpha=0.0, **kw)[0], sid_loss(x, alpha=1.0, **kw)[0]
    xt = (1 - sigma.reshape(-1, 1, 1, 1, 1)) * x + sigma.reshape(-1, 1, 1, 1, 1) * noise
    r, f = exact_x0(xt, sigma, mu_real, 0.5), exact_x0(xt, sigma, theta.detach(), 0.7)
    n = (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(l0 - l1, ((r - f) ** 2 / n).mean(), rtol=1e-12, atol=1e-14)


def test_descent_moves_fake_mean_towards_real_mean():
    mu_real, theta, _, _, _ = make_case(3)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_real))
    g = torch.Generator().manual_seed(7)
    dist0 = (theta.detach() - mu_real).abs().clone()
    opt = torch.optim.SGD([theta], lr=5.0)
    for step in range(40):
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        sigma = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * 0.96 + 0.02
        critic = Denoiser(ExactGaussianModel(theta.detach().clone()))  # the critic tracks the generator exactly
        cond, uncond = contexts(SHAPE[0])
        loss, _ = sid_loss(theta + 0.5 * z, teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma,
                           noise=noise, guidance_scale=0.0)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert torch.all(theta.grad * (theta.detach() - mu_real) > 0)  # points from mu_real to mu_fake
        opt.step()
    assert (theta.detach() - mu_real).abs().mean() < 0.2 * dist0.mean()


def test_mask_drops_frames_from_the_mean():
    mu_real, theta, z, noise, sigma = make_case(4)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_real))
    critic = Denoiser(ExactGaussianModel(theta.detach(), s=0.7))
    cond, uncond = contexts(SHAPE[0])
    kw = dict(teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=0.0)
    x = (theta.detach() + 0.5 * z).requires_grad_(True)
    sid_loss(x, mask=torch.tensor([False, True, True]), **kw)[0].backward()
    x_full = x.detach().clone().requires_grad_(True)
    sid_loss(x_full, **kw)[0].backward()
    assert torch.all(x.grad[:, 0] == 0)
    torch.testing.assert_close(x.grad[:, 1:], x_full.grad[:, 1:] * 3 / 2)  # elementwise loss: mean over 2/3


def test_bad_shapes():
    mu_real, theta, z, noise, sigma = make_case()
    den = Denoiser(ExactGaussianModel(mu_real, mu_real))
    cond, uncond = contexts(SHAPE[0])
    with pytest.raises(ValueError, match="sigma"):
        sid_loss(theta + z, teacher=den, critic=den, cond=cond, uncond=uncond, sigma=torch.ones(4, 3), noise=noise)
    with pytest.raises(ValueError, match="noise"):
        sid_loss(theta + z, teacher=den, critic=den, cond=cond, uncond=uncond, sigma=sigma, noise=noise[:, :2])
