"""The ``causal_cfg`` sampler: many-step chunk-by-chunk sampling of a causal TF/DF model with classifier-free
guidance on two KV caches (official ``pipeline/causal_diffusion_inference.py``,
``CausalDiffusionInferencePipeline.inference``), as a ``stream.ChunkSampler`` of the inference engine.

Per chunk (``denoise``): :func:`~sfvideo.diffusion.causal_sampling.causal_cfg_sample` on that chunk's noise at its
absolute ``start_frame``: a fresh solver (Euler or UniPC, ``ManyStepSampling.solver``) over ``num_steps`` steps;
each step the conditional flow on the **conditional cache** and the unconditional flow (negative prompt) on the
**unconditional cache**, guided in the ``ManyStepSampling.guidance`` convention (the official pipeline applies
its ``guidance_scale`` in the standard one, ``uncond + g (cond - uncond)``). The clean-context refresh of both caches
(official step 3.3: the model rerun at timestep 0 on the chunk's output, with the prompt into the conditional cache
and the negative prompt into the unconditional one) is ``refresh``, which ``ChunkStream`` defers to the next chunk,
so a chunk is returned one refresh earlier; the order of model calls is that of one ``causal_cfg_sample`` over the
whole clip, so the stream equals it exactly.

Without guidance (official scale 0 / standard scale 1) there is no unconditional branch and one cache.

Prompt switch (``switch``): the conditional cache is reset (``reset_cross``) and, with ``full``, its held frames are
re-cached under the new prompt (``stream.recache``, LongLive), exactly as the few-step sampler does. The
unconditional cache is left as it is: its keys and values depend only on the negative prompt and the clean latents
of the held frames, and a prompt switch changes neither, so resetting and re-caching it would recompute the
values it already holds (bit for bit while nothing was evicted) at the cost of one forward per held chunk.

The refresh is clean (timestep 0), as in the official pipeline; the engine refuses a non-zero ``context_noise``
for this sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from sfvideo.config import InferenceSettings, ManyStepSampling
from sfvideo.diffusion.causal_sampling import causal_cfg_sample, make_flow_solver
from sfvideo.diffusion.denoiser import Denoiser
from sfvideo.diffusion.rollout import refresh_chunk
from sfvideo.diffusion.schedule import FlowMatchSchedule
from sfvideo.inference.stream import recache

__all__ = ["CausalCFGChunks", "check_many_step_settings", "official_scale"]


def official_scale(sampling: ManyStepSampling) -> float:
    """The guidance scale in the official convention ``cond + s (cond - uncond)`` (0 = no guidance)."""
    g = float(sampling.guidance_scale)
    return g if sampling.guidance == "official" else g - 1.0


def check_many_step_settings(settings: InferenceSettings) -> None:
    """Raise a one-line ``ValueError`` for settings the many-step samplers cannot honour."""
    if settings.sampler == "euler" and settings.sampling.solver != "euler":
        raise ValueError(
            f"sampling.solver={settings.sampling.solver!r}: the bidirectional sampler ('euler') is Euler only; "
            "UniPC is for the causal_cfg sampler"
        )
    if settings.sampler == "causal_cfg" and settings.context_noise != 0:
        raise ValueError(
            f"context_noise={settings.context_noise}: the causal_cfg sampler refreshes its caches with clean context "
            "(timestep 0, official pipeline/causal_diffusion_inference.py); set context_noise to 0"
        )


class CausalCFGChunks:
    """Many-step causal sampling with CFG on two caches, one chunk per ``denoise`` (a ``ChunkSampler``).

    Args:
        denoiser: The causal TF/DF model (``kv_cache`` and ``start_frame`` aware).
        kv_cache: Cache of the conditional branch (fresh, ``model.new_kv_cache``), written in place.
        uncond_kv_cache: Cache of the unconditional branch (a second fresh cache of the same batch and size);
            None only when ``sampling`` has no guidance.
        uncond: Negative-prompt embeddings ``(B, L, D)``; None only without guidance.
        sampling: Steps, shift, guidance and solver (``config.ManyStepSampling``).
        frames_per_chunk: Latent frames per chunk.
        num_train_timesteps: N of the schedule the model was trained on (``timestep = N sigma``).
        model_kwargs: Extra keyword arguments of every model call.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        kv_cache: Any,
        uncond_kv_cache: Any,
        uncond: Tensor | None,
        *,
        sampling: ManyStepSampling,
        frames_per_chunk: int,
        num_train_timesteps: int = 1000,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.guided = official_scale(sampling) != 0.0
        if self.guided and (uncond is None or uncond_kv_cache is None):
            raise ValueError(
                f"sampling.guidance_scale={sampling.guidance_scale} ({sampling.guidance}) needs the negative prompt "
                "and a second KV cache"
            )
        self.denoiser, self.kv_cache, self.uncond_kv_cache, self.uncond = denoiser, kv_cache, uncond_kv_cache, uncond
        self.sampling, self.frames_per_chunk = sampling, frames_per_chunk
        self.schedule = FlowMatchSchedule(num_train_timesteps=num_train_timesteps, shift=sampling.shift)
        self.model_kwargs = dict(model_kwargs or {})
        make_flow_solver(sampling.solver, self.schedule, sampling.num_steps)  # bad options fail before any chunk

    @classmethod
    def for_engine(
        cls, engine: Any, batch_size: int, *, frames_per_chunk: int, new_cache: Callable[[], Any]
    ) -> CausalCFGChunks:
        """The sampler of one ``GenerationSession`` of ``engine`` (an ``InferenceEngine``): its denoiser, settings
        and negative prompt; ``new_cache()`` makes each fresh cache (two with guidance)."""
        sampling = engine.settings.sampling
        guided = official_scale(sampling) != 0.0
        return cls(engine.denoiser, new_cache(), new_cache() if guided else None,
                   engine.negative(batch_size) if guided else None, sampling=sampling,
                   frames_per_chunk=frames_per_chunk,
                   num_train_timesteps=engine.settings.schedule.num_train_timesteps)

    def denoise(self, noise: Tensor, context: Tensor, start_frame: int) -> Tensor:
        s = self.sampling
        return causal_cfg_sample(
            self.denoiser, noise, context, schedule=self.schedule, frames_per_chunk=self.frames_per_chunk,
            kv_cache=self.kv_cache, uncond=self.uncond if self.guided else None,
            uncond_kv_cache=self.uncond_kv_cache if self.guided else None, guidance_scale=s.guidance_scale,
            guidance=s.guidance, solver=s.solver, num_steps=s.num_steps, start_frame=start_frame, refresh_last=False,
            model_kwargs=self.model_kwargs,
        )  # fmt: skip

    def refresh(self, latents: Tensor, context: Tensor, start_frame: int) -> None:
        # Official step 3.3: cond cache first, then uncond, both at timestep 0 (as causal_cfg_sample does).
        refresh_chunk(self.denoiser, latents, context, kv_cache=self.kv_cache, start_frame=start_frame,
                      model_kwargs=self.model_kwargs)
        if self.guided:
            refresh_chunk(self.denoiser, latents, self.uncond, kv_cache=self.uncond_kv_cache, start_frame=start_frame,
                          model_kwargs=self.model_kwargs)

    def switch(self, history: Mapping[int, Tensor], context: Tensor, *, full: bool) -> None:
        # Only the conditional cache carries the prompt (see the module docstring for the unconditional one).
        if not full:
            self.kv_cache.reset_cross()
            return
        recache(self.denoiser, self.kv_cache, history, context, frames_per_chunk=self.frames_per_chunk,
                model_kwargs=self.model_kwargs)

    def held_frames(self) -> list[int]:
        return list(self.kv_cache.frame_ids)
