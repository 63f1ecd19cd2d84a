"""Self Forcing with a GAN loss (SF-GAN of the paper's Table 2; notes §4.4, official ``model/gan.py`` and
``trainer/gan.py``).

The discriminator is the critic transformer plus a ``nn.discriminator.DiscriminatorHead`` (register tokens
cross-attending to the hidden states after ``discriminator.feature_blocks``), held *inside* the critic as its
submodule ``discriminator_head`` (official ``WanDiffusionWrapper.adding_cls_branch``), so the head's parameters are
a group of the critic optimizer (lr x ``discriminator.lr_multiplier``) and every strategy shards and checkpoints
them with the critic. It sees fake (the generator's sample) and real latents (the batch's: toy videos or teacher
samples from an ODE-pairs file) noised at one critic level per sample (``discriminator.min/max_timestep``, the
DMD recipe's shift and clamp):

- generator: ``losses.gan.gan_generator_loss``, non-saturating (or relativistic) on ``D(noised fake)``, gradient
  through the discriminator (held constant: ``Distillation.constant``; official ``fake_score.requires_grad_(False)``)
  into the sample; the real sample is noised with its own draw, as officially;
- critic: ``losses.gan.gan_discriminator_loss``, ``L_D + 0.5 (R1 + R2)`` with the approximate (finite-difference)
  penalties, one noise tensor for fake and real, as officially. The critic is trained by this loss only (no
  flow-matching loss: official ``GAN.critic_loss``), so the teacher is needed only as initial weights.
- discriminator warm-up (``discriminator.warmup_steps``, official ``discriminator_warmup_steps``): the first
  iterations train the head alone (the trunk runs as a constant), with no generator update and critic betas
  (0.9, beta2); then the critic optimizer restarts with its own betas and fresh state.

What the official trainer lacks and this module completes (``trainer/gan.py`` does not run as released):

- ``GAN.critic_loss`` with the default ``r2_weight`` 0 executes ``r2_loss = torch.zeros_like(r2_loss)``:
  ``UnboundLocalError``; here a zero penalty is a zero tensor (``losses.gan``);
- ``critic_loss`` unpacks 5 values from ``_run_generator``, which returns 4: ``ValueError``; here both steps use
  the same ``Distillation.generator_sample``;
- ``Trainer.__init__`` calls ``self.checkpointer_critic`` / ``checkpointer_generator``, never created, and
  ``self.dataloader.next()`` on a generator, and reads ``batch["mini_bs"]``, which the LMDB dataset does not
  provide; here checkpoints, resume and data are the shared Lightning ones (``loss_ratio`` = 1: the update
  averages its micro-batches, ``TrainingModule.update``);
- the logging reads ``generator_log_dict["generator_grad_norm"]`` on iterations without a generator update
  (``KeyError``); here the logs of each update are logged when it happens;
- ``generator_loss`` doubles ``conditional_dict["prompt_embeds"]`` in place; here nothing is mutated;
- the head is "hard coded for WAN2.1-T2V-1.3B" (dim 1536, blocks 13/21/29, FFN 8192); here its sizes come from
  the critic's config and the blocks scale with its depth (``config.DiscriminatorConfig``);
- the long-rollout gradient mask is ignored by the official GAN loss, and here too (the re-encoded first latent
  carries no gradient anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sfvideo.config import DiscriminatorConfig
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.losses.gan import GANLossConfig, TransformerDiscriminator, gan_discriminator_loss, gan_generator_loss
from sfvideo.nn.discriminator import DiscriminatorHead
from sfvideo.seeding import mix_seed
from sfvideo.training.distillation import CRITIC, GENERATOR, Distillation, GeneratorSample, RoleBatch

__all__ = ["HEAD", "SelfForcingGAN"]

HEAD = "discriminator_head"
"""Attribute of the critic holding the discriminator head (its parameters are ``critic.discriminator_head.*``)."""

HEAD_INIT, REAL_NOISE, PENALTY = 4, 5, 6
"""Purposes of the random streams this module adds (``TrainingModule.rng``)."""


class _ConstantNetwork:
    """A network whose calls run under ``no_grad`` (its outputs carry no graph): the critic trunk during warm-up."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.net(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.net, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return attr(*args, **kwargs)

        return call


def _torch_optimizer(optimizer: Any) -> Any:
    """The optimizer holding the state: inside Lightning's wrapper and, under DeepSpeed, ZeRO's."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else getattr(optimizer, "optimizer", optimizer)


class SelfForcingGAN(Distillation):
    """Distillation with a GAN loss on the critic + discriminator head (see the module docstring).

    Batches must carry real latents (``{"prompts", "latents"}``): toy videos (``data.latents.ToyLatentDataModule``)
    or teacher samples (``data.latents.ODELatentDataModule``, the official ``ode_latent[:, -1]``).

    Args:
        gan: loss weights, relativistic or not, R1/R2 weights and perturbation scales (official defaults).
        discriminator: the head's blocks and width, its lr multiplier, the warm-up and the critic noise levels.
        **kwargs: the shared arguments of ``training.distillation.Distillation``.
    """

    uses_teacher = False

    def __init__(self, gan: GANLossConfig = GANLossConfig(), discriminator: DiscriminatorConfig = DiscriminatorConfig(),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gan, self.discriminator = gan, discriminator
        self.critic_betas: tuple[float, float] | None = None
        """The critic optimizer's own betas (restored when the warm-up ends)."""

    # ------------------------------------------------------------------ set-up
    def configure_critic(self) -> None:
        d = self.discriminator
        blocks = d.blocks_for(self.critic.config.num_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, HEAD_INIT))
            head = DiscriminatorHead.from_transformer(self.critic, blocks, ffn_dim=d.ffn_dim, num_classes=d.num_classes,
                                                      concat_time_embedding=d.concat_time_embedding)
        self.critic.add_module(HEAD, head.to(next(self.critic.parameters()).device).train())

    @property
    def head(self) -> DiscriminatorHead:
        return getattr(self.critic, HEAD)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        trunk = [p for p in self.critic.parameters() if id(p) not in ids]
        # Official trainer/gan.py: groups {fake score: critic_lr}, {head: critic_lr * discriminator_lr_multiplier}.
        critic = self.critic_optimizer([{"params": trunk}, {"params": head}])
        critic.param_groups[1]["lr"] = critic.param_groups[0]["lr"] * self.discriminator.lr_multiplier
        self.critic_betas = tuple(critic.param_groups[0]["betas"])
        if self.in_warmup():
            for group in critic.param_groups:
                group["betas"] = (0.9, self.critic_betas[1])  # official warm-up optimizer
        return [self.generator_optimizer(self.generator.parameters()), critic]

    def training_record(self) -> dict[str, Any]:
        return {**super().training_record(), "discriminator_blocks": list(self.head.feature_blocks)}

    # ------------------------------------------------------------------ warm-up (official trainer/gan.py)
    def in_warmup(self) -> bool:
        return self.critic_steps < self.discriminator.warmup_steps

    def generator_update_due(self) -> bool:
        return not self.in_warmup() and super().generator_update_due()

    def end_discriminator_warmup(self) -> None:
        """Restart the critic optimizer with its own betas and no state (official: a new AdamW at this step)."""
        optimizer = _torch_optimizer(self.optimizers()[1])
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["betas"] = self.critic_betas

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        warmup = self.discriminator.warmup_steps
        if warmup and self.critic_steps == warmup:
            self.end_discriminator_warmup()
        super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------ the loss
    def real_latents(self, data: RoleBatch, like: Tensor) -> Tensor:
        if data.latents is None:
            raise ValueError(
                "SelfForcingGAN needs real latents in the batch: use a latent data module "
                "(sfvideo.data.latents.ToyLatentDataModule, sfvideo.data.latents.ODELatentDataModule)"
            )
        if tuple(data.latents.shape) != tuple(like.shape):
            raise ValueError(f"real latents {tuple(data.latents.shape)} do not match the generator's samples "
                             f"{tuple(like.shape)} (model.init_args.geometry)")  # fmt: skip
        return data.latents.to(like.device, like.dtype)

    def discriminator_fn(self, critic: Denoiser) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        return TransformerDiscriminator(critic, self.head)

    def generator_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.discriminator
        real = self.real_latents(data, sample.x)
        sigma, fake_noise = self.score_sigma_and_noise(sample.x, GENERATOR, micro, min_timestep=d.min_timestep,
                                                       max_timestep=d.max_timestep)
        g = self.rng(REAL_NOISE, GENERATOR, self.critic_steps, self.global_rank, micro)
        real_noise = torch.randn(real.shape, generator=g, device=real.device, dtype=real.dtype)
        return gan_generator_loss(sample.x, real, discriminator=self.discriminator_fn(self.constant_denoiser("critic")),
                                  context=cond, sigma=sigma, fake_noise=fake_noise, real_noise=real_noise,
                                  config=self.gan)  # fmt: skip

    def critic_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.discriminator
        real = self.real_latents(data, sample.x)
        sigma, noise = self.score_sigma_and_noise(sample.x, CRITIC, micro, min_timestep=d.min_timestep,
                                                  max_timestep=d.max_timestep)
        critic = self.denoiser("critic")
        if self.in_warmup():
            critic = Denoiser(_ConstantNetwork(critic.model), num_train_timesteps=critic.num_train_timesteps)
        return gan_discriminator_loss(
            sample.x, real, discriminator=self.discriminator_fn(critic), context=cond, sigma=sigma,
            fake_noise=noise, real_noise=noise, config=self.gan,
            penalty_generator=self.rng(PENALTY, CRITIC, self.critic_steps, self.global_rank, micro),
        )  # fmt: skip
