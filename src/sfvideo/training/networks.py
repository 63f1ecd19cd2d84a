"""Building the three transformers of a run from config strings (flavor, folder, checkpoint, bundled asset)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfvideo.nn.interfaces import freeze

__all__ = ["asset_path", "build_transformer", "freeze"]


def asset_path(name: str) -> Path | None:
    """Path of a bundled asset (``src/sfvideo/assets/<name>``), or None."""
    root = resources.files("sfvideo") / "assets" / name
    path = Path(str(root))
    return path if path.exists() else None


def build_transformer(
    source: str,
    *,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a ``WanTransformer`` from a flavor name, a bundled asset, a folder or a checkpoint file.

    Args:
        source: ``debug``/``toy``/``1.3B``/``14B`` (random weights from ``seed``), a bundled asset name
            (``toy_teacher``), a diffusers folder, an original Wan2.1 file or a Self Forcing checkpoint.
        overrides: config overrides for a flavor.
        seed: seed of random initialisation (flavors only).
    """
    from sfvideo.nn.wan import FLAVORS, WanTransformer

    if source in FLAVORS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return WanTransformer.from_flavor(source, **(overrides or {}))
    if overrides:
        raise ValueError(f"overrides apply to flavors ({', '.join(FLAVORS)}) only, not to {source!r}")
    path = Path(source)
    if not path.exists():
        bundled = asset_path(source)
        if bundled is None:
            raise FileNotFoundError(
                f"model source {source!r} is neither a flavor ({', '.join(FLAVORS)}), a bundled asset, nor an "
                f"existing path"
            )
        path = bundled
    from sfvideo.nn.checkpoint import load_transformer

    return load_transformer(str(path), strict=True)


def network_configs(module: nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Constructor configs of the named networks, stored in checkpoints so exports need no guessing."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        net = getattr(module, name, None)
        config = getattr(net, "config", None)
        if config is not None:
            out[name] = {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")
            }
    return out


def compute_dtype(model: nn.Module) -> torch.dtype:
    """Activation dtype of a network: ``WanTransformer.compute_dtype``, else its first parameter's dtype."""
    dtype = getattr(model, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


class PromptConditioning:
    """Mixin of the training modules: the frozen prompt encoder and cond/uncond embeddings.

    The encoder is held outside the module tree (``object.__setattr__``): it is not trained, not checkpointed, and
    large ones (umT5, 5B) manage their own device/offload. Unset, it is the toy world's encoder. The negative
    prompt's embedding (``hparams.negative_prompt``) is computed once per device (notes §6).
    """

    def set_text_encoder(self, encoder: Any) -> None:
        object.__setattr__(self, "_text_encoder", encoder)
        object.__setattr__(self, "_uncond_cache", None)

    @property
    def text_encoder(self) -> Any:
        if getattr(self, "_text_encoder", None) is None:
            from sfvideo.toy.encoders import ToyTextEncoder

            self.set_text_encoder(ToyTextEncoder())
        return self._text_encoder

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)`` embeddings ``(B, L, D)`` on the module's device."""
        cond = self.text_encoder.encode(list(prompts)).to(self.device)
        uncond = getattr(self, "_uncond_cache", None)
        if uncond is None or uncond.device != cond.device:
            uncond = self.text_encoder.encode([self.hparams.negative_prompt]).to(cond.device)
            object.__setattr__(self, "_uncond_cache", uncond)
        return cond, uncond.expand_as(cond)
