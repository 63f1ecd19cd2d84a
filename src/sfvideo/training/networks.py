"""Building the transformers of a run from config strings (flavor, folder, checkpoint, bundled asset)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["asset_path", "build_transformer", "network_configs", "transformer_config"]


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
    from sfvideo.nn.checkpoint import load_transformer

    return load_transformer(str(_source_path(source)), strict=True)


def _source_path(source: str) -> Path:
    """A local path or bundled asset name as a path (a missing one is a one-line error)."""
    from sfvideo.nn.wan import FLAVORS

    path = Path(source)
    if path.exists():
        return path
    bundled = asset_path(source)
    if bundled is None:
        raise FileNotFoundError(
            f"model source {source!r} is neither a flavor ({', '.join(FLAVORS)}), a bundled asset, nor an existing path"
        )
    return bundled


def transformer_config(source: str, overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The constructor config of :func:`build_transformer`'s network without loading weights, or None when only
    the weights tell (a single weight file) or the source does not resolve (:func:`build_transformer` says why)."""
    from sfvideo.nn.checkpoint import CONFIG_NAME, read_folder_config
    from sfvideo.nn.wan import FLAVORS

    if source in FLAVORS:
        return {**FLAVORS[source], **(overrides or {})}
    path = Path(source) if Path(source).exists() else asset_path(source)
    if path is None:
        return None
    for folder in (path / "transformer", path):
        if (folder / CONFIG_NAME).is_file():
            return read_folder_config(folder)
    return None


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
