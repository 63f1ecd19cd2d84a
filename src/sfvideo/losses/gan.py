"""GAN losses of Self Forcing's SF-GAN variant (notes §4.4): non-saturating (optionally relativistic) logistic
losses on noised samples, and the approximate R1/R2 penalties by finite differences.

Official code: ``model/gan.py`` (``GAN.generator_loss``, ``GAN.critic_loss``) and ``trainer/gan.py`` (the total
discriminator objective ``gan_D + 0.5 (R1 + R2)``). With ``D`` the discriminator logits at the noised input,
``softplus(z) = log(1 + e^z)``:

    non-saturating:  L_G = w_G mean softplus(-D(fake))
                     L_D = w_D [mean softplus(-D(real)) + mean softplus(D(fake))]
    relativistic:    L_G = w_G mean softplus(-(D(fake) - D(real)))
                     L_D = w_D mean softplus(-(D(real) - D(fake)))

Approximate R1 (on real) and R2 (on fake) penalties, official "approximate" form: with ``delta ~ N(0, s^2 I)``,

    R = w mean ((D(x + delta) - D(x)) / s)^2,

a finite-difference estimate of ``w ||grad_x D(x)||^2``: ``(D(x + s e) - D(x)) / s = grad D . e + O(s ||e||^2)``
and ``E_e[(grad D . e)^2] = ||grad D||^2`` for ``e ~ N(0, I)``; it needs no double backward. Both ``D(x + delta)``
and ``D(x)`` carry gradient to the discriminator, as officially.

Samples are noised at one critic level per sample (``FlowMatchSchedule.sample_dmd_sigma``, the official
``critic_timestep`` with ``critic_timestep_shift``) before the discriminator sees them. The official discriminator
step reuses one noise tensor for fake and real; the generator step draws fresh noise for real (pass it that way to
be faithful). Losses are computed in fp32 (official ``.float()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.schedule import add_noise
from sfvideo.nn.discriminator import DiscriminatorHead

Discriminator = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``discriminator(xt (B, F, C, H, W), sigma (B,), context (B, L, D)) -> logits (B, num_classes)``, e.g.
:class:`TransformerDiscriminator`."""


class TransformerDiscriminator:
    """The SF-GAN discriminator as a :data:`Discriminator`: the critic transformer's block features at noise level
    ``sigma`` fed to a :class:`~sfvideo.nn.discriminator.DiscriminatorHead` (official ``WanDiffusionWrapper.forward``
    with ``classify_mode=True``). The sigma -> timestep conversion is the critic :class:`Denoiser`'s (its
    ``model_kwargs``, e.g. ``attention="bidirectional"``, apply); the flow output of that forward is discarded.

    Args:
        critic: The critic as a :class:`Denoiser` over a ``WanTransformer`` (or a distributed engine of one).
        head: The discriminator head; its ``feature_blocks`` are requested from the critic.
    """

    def __init__(self, critic: Denoiser, head: DiscriminatorHead) -> None:
        self.critic = critic
        self.head = head

    def __call__(self, xt: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        timestep = self.critic.timestep(sigma, xt)
        kwargs = {**self.critic.model_kwargs, "return_block_features": self.head.feature_blocks}
        _, features = self.critic.model(xt, timestep, context, **kwargs)
        temb = None
        if self.head.concat_time_embedding:
            # Official: the time embedding e (B, D) of a bidirectional critic; frame 0 of the per-frame one.
            temb = self.critic.model.time_embedding(timestep, xt.shape[0], xt.shape[1])[:, 0]
        return self.head(features, temb)


@dataclass(frozen=True)
class GANLossConfig:
    """Weights of the GAN objective; defaults are the official ``model/gan.py`` ones (``getattr`` defaults)."""

    generator_weight: float = 1e-2
    """``gan_g_weight``: scale of the generator's GAN loss."""
    discriminator_weight: float = 1e-2
    """``gan_d_weight``: scale of the discriminator's GAN loss (not of the penalties)."""
    relativistic: bool = False
    """``relativistic_discriminator``: losses on logit differences ``D(fake) - D(real)``."""
    r1_weight: float = 0.0
    """``r1_weight``: approximate R1 penalty on noised real samples (0 = off, the official default)."""
    r2_weight: float = 0.0
    """``r2_weight``: approximate R2 penalty on noised generated samples (0 = off)."""
    r1_sigma: float = 0.01
    """``r1_sigma``: std of the finite-difference perturbation of R1."""
    r2_sigma: float = 0.01
    """``r2_sigma``: std of the finite-difference perturbation of R2."""
    penalty_scale: float = 0.5
    """Total discriminator objective ``L_D + penalty_scale (R1 + R2)`` (``trainer/gan.py``: 0.5)."""

    def __post_init__(self) -> None:
        for name in ("generator_weight", "discriminator_weight", "r1_weight", "r2_weight", "penalty_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"GANLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("r1_sigma", "r2_sigma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GANLossConfig.{name} must be positive, got {getattr(self, name)}")


def generator_logistic_loss(fake_logits: Tensor, real_logits: Tensor | None = None, *, relativistic: bool) -> Tensor:
    """Unweighted non-saturating generator loss: ``mean softplus(-z)`` with ``z = D(fake)`` or, relativistic,
    ``z = D(fake) - D(real)`` (official ``GAN.generator_loss``), fp32 scalar."""
    if relativistic:
        if real_logits is None:
            raise ValueError("relativistic generator loss needs real_logits")
        return F.softplus(-(fake_logits.float() - real_logits.float())).mean()
    return F.softplus(-fake_logits.float()).mean()


def discriminator_logistic_loss(fake_logits: Tensor, real_logits: Tensor, *, relativistic: bool) -> Tensor:
    """Unweighted discriminator loss: ``mean softplus(-D(real)) + mean softplus(D(fake))`` or, relativistic,
    ``mean softplus(-(D(real) - D(fake)))`` (official ``GAN.critic_loss``), fp32 scalar."""
    if relativistic:
        return F.softplus(-(real_logits.float() - fake_logits.float())).mean()
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def finite_difference_penalty(
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    logits: Tensor,
    *,
    sigma: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unweighted approximate gradient penalty ``mean ((D(x + delta) - D(x)) / sigma)^2``, ``delta ~ N(0, sigma^2)``
    (official ``GAN.critic_loss`` R1/R2 blocks).

    Args:
        logits_fn: ``x -> D(x)`` for one perturbed batch (same conditioning as ``logits``).
        x: The discriminator input ``(B, ...)`` (the noised real sample for R1, the noised fake for R2).
        logits: ``D(x)`` already computed (with its graph; officially from the batched fake/real forward).
        sigma: Perturbation std.
        generator: Source of ``delta`` (per-rank); ``randn_like`` if None.

    Returns:
        fp32 scalar; ``E_delta`` of it is ``||grad_x D||^2`` up to ``O(sigma)`` (mean over the logits' elements).
    """
    if generator is None:
        eps = torch.randn_like(x)
    else:
        eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    perturbed = logits_fn(x + sigma * eps)
    return ((perturbed.float() - logits.float()) / sigma).pow(2).mean()


def _both_logits(
    discriminator: Discriminator, fake_xt: Tensor, real_xt: Tensor, sigma: Tensor, context: Tensor, batched: bool
) -> tuple[Tensor, Tensor]:
    """``(D(fake_xt), D(real_xt))``; one forward on the ``2B`` batch ``[fake; real]`` when ``batched`` (official)."""
    if not batched:
        return discriminator(fake_xt, sigma, context), discriminator(real_xt, sigma, context)
    logits = discriminator(torch.cat([fake_xt, real_xt]), torch.cat([sigma, sigma]), torch.cat([context, context]))
    fake_logits, real_logits = logits.chunk(2)
    return fake_logits, real_logits


def _check(fake: Tensor, real: Tensor, sigma: Tensor) -> None:
    if fake.shape != real.shape:
        raise ValueError(f"fake {tuple(fake.shape)} and real {tuple(real.shape)} samples must have the same shape")
    if sigma.ndim != 1 or sigma.shape[0] != fake.shape[0]:
        raise ValueError(f"sigma must be (B,) = ({fake.shape[0]},), one level per sample; got {tuple(sigma.shape)}")


def gan_generator_loss(
    fake: Tensor,
    real: Tensor,
    *,
    discriminator: Discriminator,
    context: Tensor,
    sigma: Tensor,
    fake_noise: Tensor,
    real_noise: Tensor,
    config: GANLossConfig,
    batched: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Generator step of SF-GAN: ``w_G`` times the non-saturating (relativistic) loss on noised samples.

    Gradient reaches the generator through ``fake`` and the discriminator's graph (the caller must discard the
    discriminator parameters' gradients, as the official trainer does by stepping only the generator).

    Args:
        fake: Generator samples ``(B, F, C, H, W)`` with gradient.
        real: Real latents (teacher samples or data) of the same shape; detached here.
        discriminator: See :data:`Discriminator`.
        context: Prompt embeddings ``(B, L, D)``.
        sigma: Critic noise level per sample ``(B,)``, shared by fake and real.
        fake_noise: Noise of the fake sample; real_noise: of the real one (official: independent draws here).
        config: :class:`GANLossConfig`.
        batched: One discriminator forward on ``[fake; real]`` (official); the real half is skipped for the
            non-relativistic loss when False (it does not enter that loss).

    Returns:
        ``(loss, logs)``: fp32 scalar and detached diagnostics.
    """
    _check(fake, real, sigma)
    fake_xt = add_noise(fake, fake_noise, sigma)
    real_xt = add_noise(real.detach(), real_noise, sigma)
    if config.relativistic or batched:
        fake_logits, real_logits = _both_logits(discriminator, fake_xt, real_xt, sigma, context, batched)
    else:
        fake_logits, real_logits = discriminator(fake_xt, sigma, context), None
    loss = config.generator_weight * generator_logistic_loss(fake_logits, real_logits, relativistic=config.relativistic)
    logs = {"gan_g_loss": loss.detach(), "gan_fake_logit": fake_logits.float().mean().detach()}
    return loss, logs


def gan_discriminator_loss(
    fake: Tensor,
    real: Tensor,
    *,
    discriminator: Discriminator,
    context: Tensor,
    sigma: Tensor,
    fake_noise: Tensor,
    real_noise: Tensor,
    config: GANLossConfig,
    penalty_generator: torch.Generator | None = None,
    batched: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Discriminator step of SF-GAN: ``L_D + penalty_scale (R1 + R2)`` (``model/gan.py`` + ``trainer/gan.py``).

    Both samples are detached. R1 perturbs the noised real input, R2 the noised fake input, each with one extra
    discriminator forward when its weight is > 0.

    Args:
        fake: Generator samples ``(B, F, C, H, W)`` (a no-grad rollout).
        real: Real latents of the same shape.
        discriminator: See :data:`Discriminator`.
        context: Prompt embeddings ``(B, L, D)``.
        sigma: Critic noise level per sample ``(B,)``.
        fake_noise: Noise of the fake sample; real_noise: of the real one (official: the same tensor for both).
        config: :class:`GANLossConfig`.
        penalty_generator: Source of the R1/R2 perturbations (per-rank).
        batched: One discriminator forward on ``[fake; real]`` (official).

    Returns:
        ``(loss, logs)``: fp32 total objective and detached parts (``gan_d_loss``, ``r1``, ``r2`` weighted).
    """
    _check(fake, real, sigma)
    fake_xt = add_noise(fake.detach(), fake_noise, sigma)
    real_xt = add_noise(real.detach(), real_noise, sigma)
    fake_logits, real_logits = _both_logits(discriminator, fake_xt, real_xt, sigma, context, batched)
    d_loss = config.discriminator_weight * discriminator_logistic_loss(
        fake_logits, real_logits, relativistic=config.relativistic
    )
    zero = torch.zeros((), device=d_loss.device, dtype=d_loss.dtype)
    r1 = r2 = zero
    if config.r1_weight > 0:
        r1 = config.r1_weight * finite_difference_penalty(
            lambda x: discriminator(x, sigma, context), real_xt, real_logits, sigma=config.r1_sigma,
            generator=penalty_generator,
        )  # fmt: skip
    if config.r2_weight > 0:
        r2 = config.r2_weight * finite_difference_penalty(
            lambda x: discriminator(x, sigma, context), fake_xt, fake_logits, sigma=config.r2_sigma,
            generator=penalty_generator,
        )  # fmt: skip
    loss = d_loss + config.penalty_scale * (r1 + r2)
    logs = {
        "gan_d_loss": d_loss.detach(),
        "gan_r1": r1.detach(),
        "gan_r2": r2.detach(),
        "gan_real_logit": real_logits.float().mean().detach(),
        "gan_fake_logit": fake_logits.float().mean().detach(),
    }
    return loss, logs
