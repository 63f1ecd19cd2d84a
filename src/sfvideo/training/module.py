"""Distribution Matching Distillation of a causal generator (Yin et al. 2024, eq. 7-8): Self Forcing (Huang et al.
2025, Algorithm 1) and the CausVid-style DF+DMD / TF+DMD baselines of the paper's Table 2.

Roles (never mixed): ``generator`` = the causal few-step student, ``teacher`` = frozen real score mu_real,
``critic`` = trainable fake score mu_fake. The loop, the sample sources, the EMA and the randomness are
``training.distillation.Distillation``'s; this file is the DMD loss pair:

- generator: ``losses.dmd.dmd_loss`` on the sample (both score networks under no_grad; the long-rollout mask
  applies), official ``model/dmd.py::DMD.compute_distribution_matching_loss`` and ``model/causvid.py``;
- critic: ``losses.critic.critic_loss``, flow matching on the detached sample (official ``critic_loss``).

``SelfForcingDMD(source=...)`` covers every sample source; ``CausVidDMD`` is the same module preset for the
CausVid sources (official ``model/causvid.py``: "the generator denoises noised data/ODE latents at a per-chunk step
index (DF) or with clean context through the TF mask (TF), no self-rollout; same critic and DMD loss").
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from sfvideo.config import DMDConfig
from sfvideo.losses.critic import critic_loss
from sfvideo.losses.dmd import dmd_loss
from sfvideo.training.distillation import CRITIC, GENERATOR, Distillation, GeneratorSample, RoleBatch

__all__ = ["CausVidDMD", "SelfForcingDMD"]


class SelfForcingDMD(Distillation):
    """Distillation with the DMD loss and its flow-matching critic (notes §4.1-§4.2).

    Args:
        dmd: teacher guidance and the DMD / critic timestep range.
        **kwargs: the shared arguments of ``training.distillation.Distillation`` (teacher, networks, geometry,
            encoders, ``source``, ``rollout``, ``optim``, optimizers, ``ema``, ...).
    """

    def __init__(self, dmd: DMDConfig = DMDConfig(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dmd = dmd

    def generator_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sigma, noise = self.score_sigma_and_noise(sample.x, GENERATOR, micro, min_timestep=self.dmd.min_timestep,
                                                  max_timestep=self.dmd.max_timestep)
        return dmd_loss(
            sample.x,
            teacher=self.denoiser("teacher"),
            critic=self.denoiser("critic"),
            cond=cond,
            uncond=uncond,
            sigma=sigma,
            noise=noise,
            guidance_scale=self.dmd.guidance_scale,
            mask=sample.mask,
        )

    def critic_objective(
        self, sample: GeneratorSample, data: RoleBatch, cond: Tensor, uncond: Tensor, micro: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sigma, noise = self.score_sigma_and_noise(sample.x, CRITIC, micro, min_timestep=self.dmd.min_timestep,
                                                  max_timestep=self.dmd.max_timestep)
        return critic_loss(sample.x, critic=self.denoiser("critic"), context=cond, sigma=sigma, noise=noise)


class CausVidDMD(SelfForcingDMD):
    """CausVid-style DF+DMD (``source: diffusion_forcing``) or TF+DMD (``teacher_forcing``): ``SelfForcingDMD`` on
    the batch's data or ODE-final latents instead of the generator's own rollout (official ``model/causvid.py``).

    Official behaviour kept: one noisy input per chunk at a uniform index of the step list, noise drawn per rank,
    no gradient mask, the same DMD loss and critic; with ``teacher_forcing`` the clean latents are the context.
    Deviations: one noise tensor instead of one per list entry (the same distribution: each frame uses one draw);
    unwarped lists are noised at their exact sigma instead of the nearest grid timestep. The official
    ``trainer/distillation.py`` passes ``clean_latent=None`` for text-only data, so ``distribution_loss: causvid``
    cannot run there without an LMDB; here the latents come from the data module.

    Args:
        source: ``diffusion_forcing`` (DF+DMD) or ``teacher_forcing`` (TF+DMD).
        **kwargs: as ``SelfForcingDMD``.
    """

    def __init__(self, source: Literal["diffusion_forcing", "teacher_forcing"] = "diffusion_forcing",
                 **kwargs: Any) -> None:
        super().__init__(source=source, **kwargs)
