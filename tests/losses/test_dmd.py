"""DMD loss on Gaussians, where the teacher and critic denoisers are exact in closed form.

For data N(mu, s^2) per element noised as xt = (1 - sigma) x0 + sigma eps,
E[x0 | xt] = mu + k (xt - (1 - sigma) mu) with k = (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2).
"""

import pytest
import torch
from torch import nn

from sfvideo.diffusion.denoiser import Denoiser, cfg
from sfvideo.losses.dmd import dmd_loss

SHAPE = (4, 3, 2, 2, 2)  # (B, F, C, H, W)
S = 0.5  # data std of both distributions


def exact_x0(xt, sigma, mu, s=S):
    sig = sigma.reshape(-1, *([1] * (xt.ndim - 1)))
    k = (1 - sig) * s**2 / ((1 - sig) ** 2 * s**2 + sig**2)
    return mu + k * (xt - (1 - sig) * mu)


class ExactGaussianModel(nn.Module):
    """Flow model whose implied x0 is E[x0 | xt] of N(mu_c, S^2); c = round(context[:, 0, 0]) picks the mean."""

    def __init__(self, *mus):
        super().__init__()
        self.mus = [m.double() for m in mus]
        self.p = nn.Parameter(torch.ones((), dtype=torch.float64))  # must never receive gradient from dmd_loss

    def forward(self, x, timestep, context, **kwargs):
        sigma = timestep.double() / 1000
        idx = context[:, 0, 0].round().long()
        mu = torch.stack([self.mus[i] for i in idx.tolist()])
        x0 = exact_x0(x, sigma, mu)
        return self.p * (x - x0) / sigma.reshape(-1, 1, 1, 1, 1)


def contexts(batch):
    cond = torch.zeros(batch, 2, 3, dtype=torch.float64)
    uncond = torch.ones(1, 2, 3, dtype=torch.float64)
    return cond, uncond


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_real = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(SHAPE[1:], generator=g, dtype=torch.float64))  # generator = its mean
    z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.3, 0.7, 0.98], dtype=torch.float64)
    return mu_real, theta, z, noise, sigma


def test_gradient_wrt_x_is_normalised_dmd_direction_over_numel():
    mu_real, theta, z, noise, sigma = make_case()
    teacher_model = ExactGaussianModel(mu_real, mu_real)
    critic_model = ExactGaussianModel(theta.detach())
    x = (theta.detach() + S * z).requires_grad_(True)
    cond, uncond = contexts(SHAPE[0])
    loss, logs = dmd_loss(
        x,
        teacher=Denoiser(teacher_model),
        critic=Denoiser(critic_model),
        cond=cond,
        uncond=uncond,
        sigma=sigma,
        noise=noise,
        guidance_scale=0.0,
    )
    loss.backward()
    assert loss.dtype == torch.float64
    xt = (1 - sigma.reshape(-1, 1, 1, 1, 1)) * x.detach() + sigma.reshape(-1, 1, 1, 1, 1) * noise
    x0_real = exact_x0(xt, sigma, mu_real)
    x0_fake = exact_x0(xt, sigma, theta.detach())
    normaliser = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # DMD eq. 8
    grad = (x0_fake - x0_real) / normaliser
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(logs["dmd_grad_norm"], grad.abs().mean().float(), rtol=1e-5, atol=1e-8)
    # Only the generator sample receives gradient.
    assert teacher_model.p.grad is None and critic_model.p.grad is None


def test_descent_moves_fake_mean_towards_real_mean():
    mu_real, theta, _, _, _ = make_case(1)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_real))
    g = torch.Generator().manual_seed(7)
    dist0 = (theta.detach() - mu_real).abs().clone()
    opt = torch.optim.SGD([theta], lr=5.0)  # d loss / d theta = sum_b grad_b / numel: small per step
    for step in range(30):
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        sigma = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * 0.96 + 0.02
        x = theta + S * z
        critic = Denoiser(ExactGaussianModel(theta.detach().clone()))  # critic tracks the generator exactly
        cond, uncond = contexts(SHAPE[0])
        loss, _ = dmd_loss(
            x, teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=0.0
        )
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # Sign: the gradient on the mean points from mu_real to mu_fake, element by element.
            assert torch.all(theta.grad * (theta.detach() - mu_real) > 0)
        opt.step()
    dist = (theta.detach() - mu_real).abs()
    assert dist.mean() < 0.2 * dist0.mean()


def test_teacher_guidance_uses_official_cfg_convention():
    mu_real, theta, z, noise, sigma = make_case(2)
    mu_uncond = torch.zeros_like(mu_real)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_uncond))
    critic = Denoiser(ExactGaussianModel(theta.detach()))
    x = (theta.detach() + S * z).requires_grad_(True)
    cond, uncond = contexts(SHAPE[0])
    loss, _ = dmd_loss(
        x, teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=3.0
    )
    loss.backward()
    xt = (1 - sigma.reshape(-1, 1, 1, 1, 1)) * x.detach() + sigma.reshape(-1, 1, 1, 1, 1) * noise
    x0_real = cfg(exact_x0(xt, sigma, mu_real), exact_x0(xt, sigma, mu_uncond), 3.0)
    x0_fake = exact_x0(xt, sigma, theta.detach())
    grad = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_restricts_mse_to_selected_frames(per_sample):
    mu_real, theta, z, noise, sigma = make_case(3)
    teacher = Denoiser(ExactGaussianModel(mu_real, mu_real))
    critic = Denoiser(ExactGaussianModel(theta.detach()))
    cond, uncond = contexts(SHAPE[0])
    mask = torch.tensor([False, True, True])
    if per_sample:
        mask = mask.expand(SHAPE[0], -1).clone()
    x = (theta.detach() + S * z).requires_grad_(True)
    dmd_loss(
        x,
        teacher=teacher,
        critic=critic,
        cond=cond,
        uncond=uncond,
        sigma=sigma,
        noise=noise,
        guidance_scale=0.0,
        mask=mask,
    )[0].backward()
    x_full = x.detach().clone().requires_grad_(True)
    dmd_loss(
        x_full, teacher=teacher, critic=critic, cond=cond, uncond=uncond, sigma=sigma, noise=noise, guidance_scale=0.0
    )[0].backward()
    assert torch.all(x.grad[:, 0] == 0)
    # Same per-element direction, averaged over 2/3 of the elements.
    torch.testing.assert_close(x.grad[:, 1:], x_full.grad[:, 1:] * 3 / 2)


def test_bad_sigma_shape():
    mu_real, theta, z, noise, _ = make_case()
    den = Denoiser(ExactGaussianModel(mu_real, mu_real))
    cond, uncond = contexts(SHAPE[0])
    with pytest.raises(ValueError, match="sigma"):
        dmd_loss(
            theta + z, teacher=den, critic=den, cond=cond, uncond=uncond, sigma=torch.ones(SHAPE[0], 3), noise=noise
        )
