"""Self Forcing with Score identity Distillation (SF-SiD of the paper's Table 2; notes §4.3, official ``model/sid.py``).

The generator loss is ``losses.sid.sid_loss``: with ``x`` the generator's sample, ``r`` the teacher's guided and
``f`` the critic's clean estimate at ``xt = (1 - sigma) x + sigma eps``,

    L = mean[(r - f) ((r - x) - alpha (r - f)) / n],   n = stopgrad(mean |x - r|) per sample,

and, unlike DMD, the gradient reaches ``x`` through *both* score networks (the official code has no ``no_grad``
around them). The critic and its loss are DMD's (``SelfForcingDMD``: flow matching on the detached sample), with
the same guidance and timestep recipe (``dmd`` group).

What the module does about the two networks the gradient passes through:

- the **critic** is a constant of the generator update (``Distillation.constant``): its parameters get no gradient
  from this loss, and it runs as the plain module (one trainable DeepSpeed engine per backward). Officially the
  critic *does* accumulate this loss's gradient and ``trainer/distillation.py`` discards it with
  ``critic_optimizer.zero_grad(set_to_none=True)`` before the critic step: the same critic update, without computing
  a gradient that is thrown away;
- the **teacher** runs with gradient, so its activations are kept: ``sid.teacher_gradient_checkpointing``
  (default: with ``gradient_checkpointing``, as the official ``SiD.__init__`` enables it on ``real_score``). The
  official SiD config pairs it with the 1.3B teacher (``configs/sid.yaml``).

Official bugs fixed here (stated in ``docs/training.md``):

- ``configs/self_forcing_sid.yaml`` says ``distribution_loss: dmd``, so the released SiD config trains DMD (what it
  trains is ``configs/dmd_1.3b.yaml``); ``configs/sid.yaml`` trains SiD;
- ``SiD`` never sets ``min_score_timestep`` (``AttributeError`` as soon as ``distribution_loss: sid``): the timestep
  range is DMD's (uniform from 0, shifted, clamped to ``[dmd.min_timestep, dmd.max_timestep]``);
- the official loss ignores its ``gradient_mask``; here the long-rollout mask applies as for DMD;
- its log reports ``dmdtrain_gradient_norm`` as zeros; here ``sid_grad_norm`` is the normalised score difference.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sfvideo.config import SiDConfig
from sfvideo.losses.sid import sid_loss
from sfvideo.training.distillation import GENERATOR, GeneratorSample, RoleBatch
from sfvideo.training.module import SelfForcingDMD

__all__ = ["SelfForcingSiD"]


class SelfForcingSiD(SelfForcingDMD):
    """Distillation with the SiD generator loss and DMD's critic (any ``source``; the paper trains Self Forcing).

    Args:
        sid: SiD's ``alpha`` and the teacher's activation checkpointing.
        **kwargs: as ``SelfForcingDMD`` (``dmd`` gives the teacher guidance and the timestep range).
    """

    def __init__(self, sid: SiDConfig = SiDConfig(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sid = sid

    def configure_model(self) -> None:
        if hasattr(self, "generator"):
            return
        super().configure_model()
        checkpointing = self.sid.teacher_gradient_checkpointing
        if checkpointing if checkpointing is not None else self.hparams.gradient_checkpointing:
            self.teacher.enable_gradient_checkpointing()

    def generator_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sigma, noise = self.score_sigma_and_noise(sample.x, GENERATOR, micro, min_timestep=self.dmd.min_timestep,
                                                  max_timestep=self.dmd.max_timestep)
        return sid_loss(
            sample.x,
            teacher=self.denoiser("teacher"),
            critic=self.constant_denoiser("critic"),  # frozen for this update (Distillation.training_step)
            cond=cond,
            uncond=uncond,
            sigma=sigma,
            noise=noise,
            alpha=self.sid.alpha,
            guidance_scale=self.dmd.guidance_scale,
            mask=sample.mask,
        )
