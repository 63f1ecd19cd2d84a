"""Interfaces shared by the real (umT5, Wan VAE) and toy (embedded world) encoders.

Every training and inference path talks to these protocols only, so the toy world and Wan2.1 share code.
Layouts: videos are ``(B, T, 3, H, W)`` in [-1, 1]; latents are ``(B, F, C, h, w)`` (see ``sfvideo.geometry``).

Frozen encoders record how they were built (:class:`RecordsInitArgs`, :func:`class_spec`): checkpoints and exports
store that ``class_path`` + ``init_args`` (jsonargparse's format), so ``sfvideo generate <checkpoint>`` rebuilds
the text encoder and codec a run was trained with.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

NEGATIVE_PROMPT = ""
"""Default prompt of the unconditional branch of classifier-free guidance (the empty prompt; Wan's recipe sets its
long negative prompt in the config)."""


def freeze(module: ModuleT) -> ModuleT:
    """Make ``module`` a frozen constant: eval mode (no dropout) and ``requires_grad=False`` on every parameter.

    Returns the same module, so ``teacher = freeze(load_transformer(...))`` reads naturally.
    """
    module.eval()
    module.requires_grad_(False)
    return module


class RecordsInitArgs:
    """Mixin: an instance remembers the arguments of its constructor, so :func:`class_spec` can describe it.

    The most derived class's ``__init__`` records (a subclass calling ``super().__init__`` does not overwrite it).
    Signatures are kept (``functools.wraps``), so jsonargparse and LightningCLI see the real parameters.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                object.__setattr__(self, "_init_args", arguments)
            init(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[method-assign]


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data (tuples to lists, paths and dtypes to strings), or raise TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not recordable")


def class_spec(obj: Any) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": {...}}`` of an object built with recorded arguments, else None.

    None also when an argument is not plain data (e.g. a VAE passed as an instance): such an object cannot be
    rebuilt from a file and a checkpoint records it as unknown.
    """
    arguments = getattr(obj, "_init_args", None)
    if arguments is None:
        return None
    try:
        init_args = _jsonable(arguments)
    except TypeError:
        return None
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


@runtime_checkable
class TextEncoder(Protocol):
    """Frozen prompt encoder. Padding positions of the output are zero (Wan's convention)."""

    text_len: int
    """Tokens per prompt after padding/truncation (512 for umT5 in Wan)."""
    dim: int
    """Embedding width (4096 for umT5-XXL)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Return ``(B, text_len, dim)`` embeddings, padding zeroed."""
        ...


@runtime_checkable
class StreamDecoder(Protocol):
    """Decodes a latent video chunk by chunk, carrying causal state; concatenated output equals a full decode."""

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, f, C, h, w)`` latents -> ``(B, t, 3, H, W)`` pixel frames in [-1, 1]."""
        ...


@runtime_checkable
class VideoDecoder(Protocol):
    """Frozen decoder of a latent space: a codec's decoding half, or a decoder-only model (a tiny preview decoder
    such as TAEHV) chosen in place of the codec's own for inference.

    Implementations also carry ``latent_channels`` (C of the latents) and ``spatial_stride`` (pixel size / latent
    size along H and W: 8 for the Wan VAE). They are instance attributes, so they are not protocol members (which
    LightningCLI checks on the class).
    """

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, F, C, h, w)`` -> ``(B, T, 3, H, W)`` in [-1, 1]."""
        ...

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Pixel frames a full decode of ``num_latent_frames`` yields (Wan: 1 + 4 (F - 1))."""
        ...

    def stream_decoder(self) -> Any:
        """A fresh :class:`StreamDecoder` (its causal cache starts empty).

        Annotated ``Any``: LightningCLI's protocol check compares return annotations by identity.
        """
        ...


@runtime_checkable
class VideoCodec(VideoDecoder, Protocol):
    """Frozen latent space (the Wan VAE, or the toy world's pixel-unshuffle): a :class:`VideoDecoder` that also
    encodes."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, F, C, h, w)``."""
        ...
