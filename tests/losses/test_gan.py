"""GAN losses: closed-form logistic losses, relativistic vs plain, and the finite-difference R1/R2 against autograd."""

import math

import pytest
import torch
from torch import nn

from sfvideo.losses.gan import (
    GANLossConfig,
    discriminator_logistic_loss,
    finite_difference_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    generator_logistic_loss,
)


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


FAKE = torch.tensor([[-1.0], [0.5], [2.0]])
REAL = torch.tensor([[0.3], [-0.4], [1.5]])


def test_logistic_losses_on_closed_form_logits():
    fake, real = FAKE.flatten().tolist(), REAL.flatten().tolist()
    g = sum(softplus(-f) for f in fake) / 3
    d = sum(softplus(-r) for r in real) / 3 + sum(softplus(f) for f in fake) / 3
    g_rel = sum(softplus(-(f - r)) for f, r in zip(fake, real)) / 3
    d_rel = sum(softplus(-(r - f)) for f, r in zip(fake, real)) / 3
    assert generator_logistic_loss(FAKE, relativistic=False).item() == pytest.approx(g, rel=1e-6)
    assert discriminator_logistic_loss(FAKE, REAL, relativistic=False).item() == pytest.approx(d, rel=1e-6)
    assert generator_logistic_loss(FAKE, REAL, relativistic=True).item() == pytest.approx(g_rel, rel=1e-6)
    assert discriminator_logistic_loss(FAKE, REAL, relativistic=True).item() == pytest.approx(d_rel, rel=1e-6)


def test_signs_generator_wants_high_fake_logits_discriminator_separates():
    fake = FAKE.clone().requires_grad_(True)
    real = REAL.clone().requires_grad_(True)
    generator_logistic_loss(fake, relativistic=False).backward()
    assert torch.all(fake.grad < 0)  # descent raises D(fake)
    fake.grad = None
    discriminator_logistic_loss(fake, real, relativistic=False).backward()
    assert torch.all(fake.grad > 0) and torch.all(real.grad < 0)  # descent lowers D(fake), raises D(real)


def test_relativistic_depends_on_differences_only():
    shift = 3.0
    for rel in (True, False):
        g0 = generator_logistic_loss(FAKE, REAL, relativistic=rel)
        g1 = generator_logistic_loss(FAKE + shift, REAL + shift, relativistic=rel)
        d0 = discriminator_logistic_loss(FAKE, REAL, relativistic=rel)
        d1 = discriminator_logistic_loss(FAKE + shift, REAL + shift, relativistic=rel)
        if rel:
            torch.testing.assert_close(g0, g1)
            torch.testing.assert_close(d0, d1)
        else:  # the plain losses see the absolute logits
            assert (g0 - g1).abs() > 0.1 and (d0 - d1).abs() > 0.1
    # Against a real logit of 0, the relativistic generator loss is the plain one.
    torch.testing.assert_close(
        generator_logistic_loss(FAKE, torch.zeros_like(FAKE), relativistic=True),
        generator_logistic_loss(FAKE, relativistic=False),
    )


class Quadratic(nn.Module):
    """D(x) = 0.5 x^T Q x + b^T x + c per sample (flattened x): finite differences have a closed form,
    (D(x + s e) - D(x)) / s = grad D(x) . e + (s / 2) e^T Q e."""

    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.q = nn.Parameter((a + a.T) / 2)
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x, sigma=None, context=None):
        v = x.flatten(1)
        return (0.5 * ((v @ self.q) * v).sum(1) + v @ self.b).unsqueeze(1)  # (B, 1)

    def grad(self, x):
        return x.flatten(1) @ self.q.detach() + self.b.detach()


def test_finite_difference_penalty_has_its_exact_truncation_error_on_a_quadratic():
    d = Quadratic(6)
    x = torch.randn(5, 6, dtype=torch.float64)
    s = 0.05
    gen = torch.Generator().manual_seed(3)
    got = finite_difference_penalty(d, x, d(x), sigma=s, generator=gen)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # the same draws
    fd = (d.grad(x) * e).sum(1) + 0.5 * s * ((e @ d.q.detach()) * e).sum(1)
    torch.testing.assert_close(got.double(), (fd**2).mean(), rtol=1e-5, atol=1e-7)  # fp32 result: 1e-5 relative


def test_penalty_estimates_the_squared_gradient_norm_of_a_smooth_function():
    """E_e ((D(x + s e) - D(x)) / s)^2 = ||grad D||^2 + O(s); Monte Carlo over many replicas of one point."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)

    def d(x):  # smooth, non-quadratic
        return torch.sin(x.flatten(1) @ w.T).sum(1, keepdim=True)

    x0 = torch.randn(1, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x0).sum(), x0)
    target = grad.pow(2).sum().item()
    m = 40000
    x = x0.detach().expand(m, 8)
    est = finite_difference_penalty(d, x, d(x), sigma=1e-3, generator=torch.Generator().manual_seed(1)).item()
    # (grad . e)^2 has mean ||g||^2 and std sqrt(2) ||g||^2: 5 Monte Carlo standard errors, plus O(s) truncation.
    assert abs(est - target) < 5 * math.sqrt(2) * target / math.sqrt(m) + 1e-2 * target


def linear_discriminator(w):
    def d(xt, sigma, context):
        return (xt.flatten(1) * w).sum(1, keepdim=True)

    return d


def gan_inputs(seed=0, batch=3, shape=(2, 2, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    fake = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    real = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise_f = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    noise_r = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:batch]
    w = torch.randn(math.prod(shape), generator=g, dtype=torch.float64)
    return fake, real, noise_f, noise_r, sigma, w


def noised(x, n, sigma):
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * x + s * n


@pytest.mark.parametrize("relativistic", [False, True])
def test_generator_loss_value_and_gradient_on_a_linear_discriminator(relativistic):
    fake, real, noise_f, noise_r, sigma, w = gan_inputs()
    fake.requires_grad_(True)
    cfg = GANLossConfig(relativistic=relativistic)
    ctx = torch.zeros(3, 1, 1)
    loss, _ = gan_generator_loss(fake, real, discriminator=linear_discriminator(w), context=ctx, sigma=sigma,
                                 fake_noise=noise_f, real_noise=noise_r, config=cfg)  # fmt: skip
    loss.backward()
    df = noised(fake.detach(), noise_f, sigma).flatten(1) @ w
    dr = noised(real, noise_r, sigma).flatten(1) @ w
    z = df - dr if relativistic else df
    torch.testing.assert_close(loss.double(), 1e-2 * torch.nn.functional.softplus(-z).mean(), rtol=1e-6, atol=1e-9)
    # d/dfake w_G mean softplus(-z) = -w_G sigmoid(-z) (1 - sigma) w / B
    expected = -1e-2 * torch.sigmoid(-z).view(-1, 1) * (1 - sigma).view(-1, 1) * w / 3
    torch.testing.assert_close(fake.grad.flatten(1), expected, rtol=1e-5, atol=1e-9)


def test_discriminator_objective_adds_half_the_weighted_penalties_on_the_right_inputs():
    fake, real, noise_f, noise_r, sigma, _ = gan_inputs(1)
    d = Quadratic(16, seed=4)
    cfg = GANLossConfig(r1_weight=2.0, r2_weight=3.0, r1_sigma=0.01, r2_sigma=0.02)
    ctx = torch.zeros(3, 1, 1)
    loss, logs = gan_discriminator_loss(
        fake, real, discriminator=d, context=ctx, sigma=sigma, fake_noise=noise_f, real_noise=noise_r, config=cfg,
        penalty_generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    fx, rx = noised(fake, noise_f, sigma), noised(real, noise_r, sigma)
    gen = torch.Generator().manual_seed(5)  # R1 then R2 draw from the same stream
    r1 = 2.0 * finite_difference_penalty(d, rx, d(rx), sigma=0.01, generator=gen)
    r2 = 3.0 * finite_difference_penalty(d, fx, d(fx), sigma=0.02, generator=gen)
    d_loss = 1e-2 * discriminator_logistic_loss(d(fx), d(rx), relativistic=False)
    torch.testing.assert_close(logs["gan_r1"], r1.detach())
    torch.testing.assert_close(logs["gan_r2"], r2.detach())
    torch.testing.assert_close(loss, d_loss + 0.5 * (r1 + r2))
    # (R1 on the fake input or R2 on the real one would change both values: the quadratic's gradient differs.)
    assert (d.grad(rx) - d.grad(fx)).abs().max() > 0.1
    loss.backward()  # both the perturbed and the unperturbed logits carry gradient to D
    assert d.q.grad is not None and d.q.grad.abs().sum() > 0


def test_discriminator_loss_detaches_samples_and_batched_equals_separate():
    fake, real, noise_f, noise_r, sigma, _ = gan_inputs(2)
    fake.requires_grad_(True)
    d = Quadratic(16, seed=1)
    ctx = torch.zeros(3, 1, 1)
    kw = dict(discriminator=d, context=ctx, sigma=sigma, fake_noise=noise_f, real_noise=noise_r,
              config=GANLossConfig(relativistic=True))  # fmt: skip
    a, _ = gan_discriminator_loss(fake, real, batched=True, **kw)
    b, _ = gan_discriminator_loss(fake, real, batched=False, **kw)
    torch.testing.assert_close(a, b)
    a.backward()
    assert fake.grad is None


def test_official_defaults_and_validation():
    cfg = GANLossConfig()
    # model/gan.py getattr defaults and trainer/gan.py's 0.5 (R1 + R2).
    assert (cfg.generator_weight, cfg.discriminator_weight, cfg.r1_weight, cfg.r2_weight) == (1e-2, 1e-2, 0.0, 0.0)
    assert (cfg.r1_sigma, cfg.r2_sigma, cfg.penalty_scale, cfg.relativistic) == (0.01, 0.01, 0.5, False)
    with pytest.raises(ValueError, match="r1_sigma"):
        GANLossConfig(r1_sigma=0.0)
    with pytest.raises(ValueError, match="r2_weight"):
        GANLossConfig(r2_weight=-1.0)
    with pytest.raises(ValueError, match="real_logits"):
        generator_logistic_loss(FAKE, relativistic=True)


def test_transformer_discriminator_learns_to_separate_and_feeds_the_generator():
    """End to end on a tiny Wan critic + head: a few discriminator steps separate two latent distributions, and
    the generator loss sends gradient into the fake sample through the critic."""
    from sfvideo.diffusion.denoiser import Denoiser
    from sfvideo.losses.gan import TransformerDiscriminator
    from sfvideo.nn.discriminator import DiscriminatorHead
    from sfvideo.nn.wan import FLAVORS, WanTransformer

    torch.manual_seed(0)
    critic = WanTransformer(**FLAVORS["debug"])
    head = DiscriminatorHead.from_transformer(critic, (0, 1), ffn_dim=32, concat_time_embedding=True)
    disc = TransformerDiscriminator(Denoiser(critic, model_kwargs={"attention": "bidirectional"}), head)
    opt = torch.optim.Adam([*critic.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 4, 4, 4)
    ctx = torch.zeros(4, 3, 32)
    cfg = GANLossConfig(discriminator_weight=1.0, r1_weight=0.1)
    sigma = torch.full((4,), 0.1)
    losses = []
    for _ in range(25):
        fake = torch.randn(shape, generator=g) - 1.0
        real = torch.randn(shape, generator=g) + 1.0
        noise = torch.randn(shape, generator=g)
        loss, logs = gan_discriminator_loss(fake, real, discriminator=disc, context=ctx, sigma=sigma, fake_noise=noise,
                                            real_noise=noise, config=cfg, penalty_generator=g)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["gan_d_loss"].item())
    assert losses[0] == pytest.approx(2 * math.log(2), abs=0.3)  # untrained: logits near 0
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert logs["gan_real_logit"] > logs["gan_fake_logit"]
    fake = (torch.randn(shape, generator=g) - 1.0).requires_grad_(True)
    g_loss, _ = gan_generator_loss(fake, torch.randn(shape, generator=g) + 1.0, discriminator=disc, context=ctx,
                                   sigma=sigma, fake_noise=torch.randn(shape, generator=g),
                                   real_noise=torch.randn(shape, generator=g), config=GANLossConfig())  # fmt: skip
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
