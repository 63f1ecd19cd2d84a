"""The one reader of sfvideo checkpoints, and the format of what they record about themselves.

Every checkpoint sfvideo writes describes itself, so ``sfvideo generate <path>`` (and ``export``, the demo, the
evaluation and the server) need nothing else:

* a **Lightning checkpoint** (``*.ckpt``) of a training module holds, under ``checkpoint[RECORD_KEY]``, the step
  counters, the constructor config of every trained network (``configs``), the network to sample (``network``),
  the run's ``InferenceSettings`` (``inference``: geometry, sampler, step list, shift, warp, chunking, context
  noise, window, cache gradient mode, negative prompt) and how to rebuild its text encoder and codec
  (``text_encoder``, ``codec``: jsonargparse's ``class_path`` + ``init_args``). Per-rank state (the EMA) is under
  ``checkpoint[RANK_LOCAL_KEY]`` (written there by one-device and replicated runs; sharded runs write it next to
  a folder checkpoint, see ``training.strategies.rank_local``);
* an **export folder** (``sfvideo export``) is a diffusers model folder plus :data:`RECORD_FILE` with the same
  record (minus counters and configs: ``config.json`` is the network's);
* anything else ``nn.checkpoint.load_transformer`` reads (a diffusers folder, an original Wan file, a Self Forcing
  ``.pt``) is read as bare weights: the caller supplies the settings.

:func:`make_record` writes the record (training modules, export); :func:`read_checkpoint` reads all three kinds
into a :class:`Checkpoint`. Errors are one-line ``nn.checkpoint.CheckpointError`` / ``FileNotFoundError`` naming the
file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sfvideo import config
from sfvideo.config import InferenceSettings, parse_as
from sfvideo.geometry import VideoGeometry
from sfvideo.nn.checkpoint import CONFIG_NAME, CheckpointError, check_torch_file
from sfvideo.nn.interfaces import TextEncoder, VideoCodec

__all__ = [
    "RANK_LOCAL_KEY",
    "RECORD_FIELDS",
    "RECORD_FILE",
    "RECORD_FORMAT",
    "RECORD_KEY",
    "Checkpoint",
    "make_record",
    "read_checkpoint",
]

RECORD_KEY = "sfvideo"
"""Checkpoint key of sfvideo's own state: step counters, network configs and the run's inference record."""

RANK_LOCAL_KEY = "rank_local"
"""Checkpoint key (and, for folder checkpoints, sub-folder name) of per-rank state, e.g.
``{"generator_ema": ema.state_dict()}``. A value that is a dict with ``"replicated": True`` is identical on every
rank and is written once (by rank 0)."""

RECORD_FILE = "sfvideo.json"
"""The record of an export folder, next to ``config.json``."""

RECORD_FORMAT = "sfvideo-record/1"
"""Value of the record's ``format`` key."""

RECORD_FIELDS = ("format", "module", "network", "inference", "text_encoder", "codec", "training")
"""Keys of a record (:func:`make_record`); a Lightning checkpoint's ``checkpoint[RECORD_KEY]`` adds the counters and
``configs``."""


def make_record(
    *,
    module: str,
    network: str,
    settings: Any,
    text_encoder: Mapping[str, Any] | None,
    codec: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The self-description of a run (JSON data): written into checkpoints and exports, read by :class:`Checkpoint`.

    Args:
        module: Class name of the training module (``SelfForcingDMD``, ``ODEInit``, ``FlowMatchingDiffusion``...).
        network: The network to sample (``generator``, ``model``).
        settings: The run's ``config.InferenceSettings``.
        text_encoder: ``class_path`` + ``init_args`` of the text encoder (``nn.interfaces.class_spec``), or None.
        codec: The same for the codec, or None.
        training: How the run trained, as JSON data (``TrainingModule.training_record``: e.g. the sample source,
            the cache gradient mode, the effective batch, the EMA start and the iteration reached), or None.
    """
    return {
        "format": RECORD_FORMAT,
        "module": module,
        "network": network,
        "inference": settings.to_dict(),
        "text_encoder": None if text_encoder is None else dict(text_encoder),
        "codec": None if codec is None else dict(codec),
        "training": None if training is None else dict(training),
    }


Kind = Literal["lightning", "export", "weights"]


@dataclass
class Checkpoint:
    """What a checkpoint holds and says about itself (:func:`read_checkpoint`)."""

    path: Path
    kind: Kind
    """``lightning`` (a training module's ``.ckpt``), ``export`` (a folder with :data:`RECORD_FILE`) or
    ``weights`` (anything else ``load_transformer`` reads)."""
    record: dict[str, Any] | None = None
    """The run's record (:func:`make_record`), None for bare weights."""
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Constructor config of each trained network."""
    contents: dict[str, Any] | None = None
    """The raw Lightning checkpoint (``lightning`` only)."""

    # ------------------------------------------------------------------ what it says
    @property
    def module(self) -> str | None:
        return (self.record or {}).get("module")

    @property
    def network(self) -> str | None:
        """The network to sample: the record's, else (a Lightning checkpoint) the student it trained."""
        name = (self.record or {}).get("network")
        if name or self.kind != "lightning":
            return name
        return next((n for n in ("generator", "model") if n in self.network_names()), None)

    @property
    def settings(self) -> InferenceSettings | None:
        """The recorded ``config.InferenceSettings``, or None (bare weights, or written before records)."""
        data = (self.record or {}).get("inference")
        if data is None:
            return None
        try:
            return parse_as(InferenceSettings, data)
        except Exception as e:  # noqa: BLE001 - a bad record is one line naming the file
            raise CheckpointError(f"{self.path}: unreadable inference record: {str(e).splitlines()[0]}") from None

    @property
    def training(self) -> dict[str, Any]:
        """How the run trained (:func:`make_record`'s ``training``); empty when not recorded."""
        return dict((self.record or {}).get("training") or {})

    @property
    def text_encoder_spec(self) -> dict[str, Any] | None:
        return (self.record or {}).get("text_encoder")

    @property
    def codec_spec(self) -> dict[str, Any] | None:
        return (self.record or {}).get("codec")

    def counter(self, name: str) -> int:
        """A step counter of the run (``generator_steps``...), 0 when absent."""
        return int(((self.contents or {}).get(RECORD_KEY) or {}).get(name, 0))

    def network_names(self) -> list[str]:
        """Networks with weights in the checkpoint."""
        if self.kind != "lightning":
            return [self.network] if self.network else []
        return sorted({k.split(".", 1)[0] for k in (self.contents or {}).get("state_dict", {})})

    # ------------------------------------------------------------------ building
    def ema_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """The full EMA weights of network ``name`` (one-device and replicated runs keep them in the file)."""
        entry = (((self.contents or {}).get(RANK_LOCAL_KEY) or {}).get(f"{name}_ema")) or {}
        return entry.get("shadow") or None

    def weights(self, name: str | None = None, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The state dict of a network of a Lightning checkpoint (its EMA weights over the trained ones)."""
        name = name or self.network
        if self.kind != "lightning":
            raise CheckpointError(f"{self.path}: weights() reads Lightning checkpoints; use load_network()")
        prefix = f"{name}."
        weights = {k[len(prefix) :]: v for k, v in self.contents["state_dict"].items() if k.startswith(prefix)}
        if not weights:
            raise CheckpointError(f"{self.path}: no weights of network {name!r} (networks: {self.network_names()})")
        if ema:
            shadow = self.ema_state(name)
            if not shadow:
                raise CheckpointError(f"{self.path} holds no EMA weights of {name!r} ({self._ema_absence()})")
            weights = {**weights, **shadow}
        return weights

    def _ema_absence(self) -> str:
        """Why a Lightning checkpoint has no EMA, from its training record."""
        ema, iteration = self.training.get("ema"), self.training.get("iteration")
        if not self.training:
            return "training stopped before the EMA started?"
        if ema is None:
            return "the run had no EMA: ema.decay 0"
        start = ema.get("start_iteration")
        if iteration is not None and start is not None and iteration <= start:
            return (f"the EMA starts at trainer iteration {start} (ema.start_step), the run stopped after "
                    f"{iteration} iterations")
        return "sharded runs keep the EMA in per-rank files: export it with the strategy that wrote it"

    def load_network(
        self, name: str | None = None, *, ema: bool = False, model_cls: type[nn.Module] | None = None
    ) -> nn.Module:
        """The network ``name`` (default: :attr:`network`) in fp32 on the CPU, in eval mode."""
        from sfvideo.nn.checkpoint import load_transformer

        if self.kind != "lightning":
            key = "generator_ema" if ema and self.kind == "weights" else None
            if ema and self.kind == "export":
                raise CheckpointError(f"{self.path}: an export holds one set of weights (export it with --ema)")
            try:
                return load_transformer(self.path, key=key, model_cls=model_cls)
            except KeyError as e:
                raise CheckpointError(f"cannot load a network from {self.path}: {e}") from None
        name = name or self.network
        if name not in self.configs:
            raise CheckpointError(f"{self.path}: no stored config for network {name!r} (have: {sorted(self.configs)})")
        return _build(model_cls, self.configs[name], self.weights(name, ema=ema), self.path)

    def build_text_encoder(self) -> Any:
        """The recorded text encoder, rebuilt (None when the checkpoint does not record one)."""
        return self._build_spec("text_encoder", self.text_encoder_spec)

    def build_codec(self) -> Any:
        """The recorded codec, rebuilt (None when the checkpoint does not record one)."""
        return self._build_spec("codec", self.codec_spec)

    def _build_spec(self, role: str, spec: Mapping[str, Any] | None) -> Any:
        if spec is None:
            return None
        try:
            return parse_as(TextEncoder if role == "text_encoder" else VideoCodec, dict(spec))
        except Exception as e:  # noqa: BLE001 - one line naming the file and the class
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.path}: cannot rebuild its {role} {spec.get('class_path')}: {reason.strip()}"
            ) from None


def _build(
    model_cls: type[nn.Module] | None, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: Path
) -> nn.Module:
    """A network of ``config`` holding ``weights`` (shapes and keys checked first, one-line errors)."""
    from accelerate import init_empty_weights

    if model_cls is None:
        from sfvideo.nn.wan import WanTransformer as model_cls
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights(include_buffers=False):
            model = model_cls(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored network config does not build: {e}") from None
    expected = model.state_dict()
    for k in sorted(expected.keys() & weights.keys()):
        if tuple(expected[k].shape) != tuple(weights[k].shape):
            raise CheckpointError(
                f"{path}: weights do not match the architecture: '{k}' is {tuple(weights[k].shape)} in the "
                f"checkpoint, {tuple(expected[k].shape)} in the model"
            )
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the architecture ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, assign=True)
    return model.eval()


def _torch_load(path: Path) -> Any:
    """A Lightning checkpoint: tensors and plain data first (``weights_only``), then as Lightning's resume does
    (hyper-parameters may hold dataclasses or callables)."""
    check_torch_file(path)
    safe = [VideoGeometry, *(getattr(config, n) for n in config.__all__ if isinstance(getattr(config, n), type))]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - retried without weights_only below
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {reason}") from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any checkpoint sfvideo writes, or bare transformer weights (see the module docstring).

    Raises:
        FileNotFoundError: no such file or folder.
        CheckpointError: unreadable, or a ``.ckpt`` that is not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        record_file = path / RECORD_FILE
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text())
                config = json.loads((path / CONFIG_NAME).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read export {path}: {e}") from None
            name = record.get("network") or "generator"
            configs = {name: {k: v for k, v in config.items() if not k.startswith("_")}}
            return Checkpoint(path=path, kind="export", record=record, configs=configs)
        return Checkpoint(path=path, kind="weights")
    if path.suffix != ".ckpt":
        return Checkpoint(path=path, kind="weights")
    contents = _torch_load(path)
    if not isinstance(contents, Mapping) or "state_dict" not in contents:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' / 'hyper_parameters')")
    extra = contents.get(RECORD_KEY) or {}
    record = extra if "inference" in extra else None
    return Checkpoint(path=path, kind="lightning", record=record, configs=dict(extra.get("configs") or {}),
                      contents=dict(contents))
