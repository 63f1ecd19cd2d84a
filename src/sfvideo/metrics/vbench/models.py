"""The networks VBench's quality dimensions use, each loaded from a path the user gives (nothing is downloaded
unless a hub id ``hf:owner/name`` is passed for a transformers model), and the reason when one cannot be loaded.

- subject_consistency: VBench's DINO ViT-B/16 (``torch.hub`` ``dino_vitb16``) -> transformers ``ViTModel`` from a
  ``facebook/dino-vitb16`` folder, the layer-normed CLS token, DINO's own position-embedding interpolation.
- background_consistency: OpenAI CLIP ViT-B/32 ``encode_image`` -> transformers ``CLIPVisionModelWithProjection``
  (``openai/clip-vit-base-patch32``), ``image_embeds``.
- aesthetic_quality: CLIP ViT-L/14 + LAION ``sa_0_4_vit_l_14_linear.pth`` -> ``CLIPVisionModelWithProjection``
  (``openai/clip-vit-large-patch14``) + ``nn.Linear(768, 1)`` with that file's state dict.
- imaging_quality: pyiqa ``MUSIQ(pretrained_model_path=musiq_spaq_ckpt-358bb6af.pth)`` -> the same pyiqa class
  (optional dependency).
- dynamic_degree: RAFT (``raft-things.pth``, VBench's vendored RAFT), 20 iterations -> torchvision ``raft_large``
  with the ``C_T_V1`` weights file (optional dependency), 20 flow updates.
- motion_smoothness: AMT-S (``amt-s.pth``, VBench's vendored AMT) -> no maintained package ships AMT: a TorchScript
  interpolator ``forward(img0, img1, embt) -> imgt``.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from sfvideo.metrics.vbench import preprocess as P

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelUnavailable(Exception):
    """A model could not be loaded; ``str(e)`` is a one-line reason naming the flag and path."""


@dataclass
class VBenchModelPaths:
    """Where each VBench model is. ``None`` = not given: the dimensions that need it are reported missing."""

    dino: str | None = None
    """Subject consistency: a transformers folder of DINO ViT-B/16, or ``hf:facebook/dino-vitb16``."""
    clip_b32: str | None = None
    """Background consistency: a transformers CLIP ViT-B/32 folder, or ``hf:openai/clip-vit-base-patch32``."""
    clip_l14: str | None = None
    """Aesthetic quality: a transformers CLIP ViT-L/14 folder, or ``hf:openai/clip-vit-large-patch14``."""
    aesthetic_head: str | None = None
    """Aesthetic quality: LAION's ``sa_0_4_vit_l_14_linear.pth`` (a state dict of ``nn.Linear(768, 1)``)."""
    musiq: str | None = None
    """Imaging quality: pyiqa's MUSIQ-SPAQ checkpoint ``musiq_spaq_ckpt-358bb6af.pth`` (needs pyiqa)."""
    raft: str | None = None
    """Dynamic degree: torchvision's ``raft_large_C_T_V1-22a6c225.pth`` state dict (needs torchvision)."""
    interpolator: str | None = None
    """Motion smoothness: a TorchScript file whose ``forward(img0, img1, embt)`` returns the frame at time
    ``embt`` between two frames (``(N, 3, H, W)`` in [0, 1], H and W multiples of 16), e.g. a traced wrapper of
    VBench's AMT-S."""


DIMENSION_MODELS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino",),
    "background_consistency": ("clip_b32",),
    "temporal_flickering": (),
    "motion_smoothness": ("interpolator",),
    "dynamic_degree": ("raft",),
    "aesthetic_quality": ("clip_l14", "aesthetic_head"),
    "imaging_quality": ("musiq",),
}
"""The model fields each computable quality dimension needs (``VBenchModelPaths``)."""
SUPPORTED_DIMENSIONS: tuple[str, ...] = tuple(DIMENSION_MODELS)


HUB_PREFIX = "hf:"
"""A transformers model given as ``hf:owner/name`` is a hub id (downloaded, or read from the HF cache); anything
else is a local path, so a mistyped path is an error, never a download."""


def _hf_source(value: str, flag: str) -> tuple[str, bool]:
    """``(name_or_path, local_files_only)``."""
    if value.startswith(HUB_PREFIX):
        hub_id = value[len(HUB_PREFIX):]
        if not _HUB_ID.match(hub_id):
            raise ModelUnavailable(f"--{flag} {value}: expected hf:owner/name")
        return hub_id, False
    if Path(value).exists():
        return str(value), True
    raise ModelUnavailable(f"--{flag} {value}: no such file or folder (a hub id is written hf:owner/name)")


def _local_file(value: str, flag: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ModelUnavailable(f"--{flag} {value}: no such file")
    return path


def _state_dict(path: Path, flag: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one reason line
        raise ModelUnavailable(f"--{flag} {path}: cannot read: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelUnavailable(f"--{flag} {path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ------------------------------------------------------------------ feature extractors
def _dino_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino ``vision_transformer.py``):
    bicubic with ``scale_factor = (n + 0.1) / sqrt(N)``. transformers' ViT resizes to an exact size instead, which
    samples the grid at slightly different points; VBench's non-square frames (no crop) go through this path."""
    npatch = embeddings.shape[1] - 1
    pos = self.position_embeddings
    n = pos.shape[1] - 1
    if npatch == n and height == width:
        return pos
    dim = embeddings.shape[-1]
    h0 = height // self.patch_size + 0.1
    w0 = width // self.patch_size + 0.1
    side = int(math.sqrt(n))
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    if (int(h0), int(w0)) != tuple(grid.shape[-2:]):
        raise RuntimeError(f"DINO position interpolation gave {tuple(grid.shape[-2:])}, expected {(int(h0), int(w0))}")
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


class FeatureExtractor:
    """Frames ``(T, 3, H, W)`` uint8 -> features ``(T, D)`` float32 with VBench's transform for that model."""

    def __init__(self, model: torch.nn.Module, kind: str, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 32) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.kind = kind
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(cfg.hidden_size if self.kind == "dino" else cfg.projection_dim)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            chunk = frames[i : i + self.batch_size]
            if self.kind == "dino":
                x = P.dino_transform(chunk.to(self.device)).to(self.dtype)
                # DINO's hub model returns norm(x)[:, 0]: transformers' last_hidden_state is after that LayerNorm.
                h = self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
            else:
                x = P.clip_transform(chunk.to(self.device)).to(self.dtype)
                h = self.model(pixel_values=x).image_embeds  # = OpenAI CLIP encode_image
            out.append(h.float().cpu())
        return torch.cat(out)


def _from_pretrained(cls, src: str, local: bool, flag: str, value: str, **kwargs) -> torch.nn.Module:
    """``cls.from_pretrained`` that fails (instead of initialising at random) when a weight is missing."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the text tower's keys a vision model does not use
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(src, local_files_only=local, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure is one reason line
        raise ModelUnavailable(f"--{flag} {value}: cannot load {cls.__name__}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if bad:
        raise ModelUnavailable(f"--{flag} {value}: {len(bad)} weight(s) missing or mismatched in the checkpoint, "
                               f"e.g. {bad[0]}")
    return model


def load_dino(value: str, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    from transformers import ViTModel

    src, local = _hf_source(value, "dino")
    # The DINO checkpoint has no pooler: without add_pooling_layer=False transformers would add a random one.
    model = _from_pretrained(ViTModel, src, local, "dino", value, add_pooling_layer=False)
    model.embeddings.interpolate_pos_encoding = types.MethodType(_dino_interpolate_pos_encoding, model.embeddings)
    return FeatureExtractor(model, "dino", device, dtype)


def load_clip(value: str, flag: str, device: torch.device, dtype: torch.dtype) -> FeatureExtractor:
    """The image tower of a transformers CLIP folder (a whole ``CLIPModel`` or a vision-only one)."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    src, local = _hf_source(value, flag)
    try:
        cfg = AutoConfig.from_pretrained(src, local_files_only=local)
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"--{flag} {value}: cannot read a config: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]}")
    if isinstance(cfg, CLIPConfig):
        vision = cfg.vision_config
        vision.projection_dim = cfg.projection_dim  # the projection size is stated at the top level of CLIPConfig
    elif isinstance(cfg, CLIPVisionConfig):
        vision = cfg
    else:
        raise ModelUnavailable(f"--{flag} {value}: a {type(cfg).__name__}, not a CLIP model")
    model = _from_pretrained(CLIPVisionModelWithProjection, src, local, flag, value, config=vision)
    return FeatureExtractor(model, "clip", device, dtype)


def load_aesthetic_head(value: str, in_features: int) -> torch.nn.Linear:
    """LAION aesthetic predictor v1 (``vbench/aesthetic_quality.py::get_aesthetic_model``): ``nn.Linear(768, 1)``
    with the state dict of ``sa_0_4_vit_l_14_linear.pth`` (``in_features`` = the CLIP projection dim)."""
    sd = _state_dict(_local_file(value, "aesthetic_head"), "aesthetic_head")
    w = sd.get("weight")
    if w is None or w.ndim != 2 or w.shape[0] != 1 or "bias" not in sd:
        raise ModelUnavailable(f"--aesthetic_head {value}: expected a Linear(*, 1) state dict (weight, bias)")
    if w.shape[1] != in_features:
        raise ModelUnavailable(f"--aesthetic_head {value}: weight is {tuple(w.shape)} but the CLIP of --clip_l14 "
                               f"gives {in_features}-dim embeddings")
    head = torch.nn.Linear(in_features, 1)
    head.load_state_dict({"weight": w, "bias": sd["bias"]})
    return head.eval()


def load_musiq(value: str, device: torch.device) -> torch.nn.Module:
    """pyiqa's ``MUSIQ(pretrained_model_path=...)`` as ``vbench/imaging_quality.py`` builds it."""
    path = _local_file(value, "musiq")
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except ImportError as e:
        raise ModelUnavailable(f"--musiq {value}: needs the pyiqa package (and torchvision), not importable: {e}")
    model = MUSIQ(pretrained_model_path=str(path))
    model.training = False  # as VBench does (MUSIQ switches its multi-scale cropping on `training`)
    return model.to(device).eval()


def load_raft(value: str, device: torch.device) -> torch.nn.Module:
    """torchvision ``raft_large`` (the original RAFT architecture; ``C_T_V1`` = the Chairs+Things weights ported from
    the RAFT paper, i.e. ``raft-things.pth``) from a local state-dict file."""
    path = _local_file(value, "raft")
    try:
        from torchvision.models.optical_flow import raft_large
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision built for another torch
        raise ModelUnavailable(f"--raft {value}: needs torchvision (optical_flow.raft_large), not importable: {e}")
    model = raft_large(weights=None, progress=False)
    try:
        model.load_state_dict(_state_dict(path, "raft"))
    except RuntimeError as e:
        raise ModelUnavailable(f"--raft {value}: not a torchvision raft_large state dict "
                               f"(the original raft-things.pth uses other key names): {str(e).splitlines()[0][:160]}")
    return model.to(device).eval()


def load_interpolator(value: str, device: torch.device) -> torch.nn.Module:
    path = _local_file(value, "interpolator")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"--interpolator {value}: not a TorchScript file: {type(e).__name__}")


# ------------------------------------------------------------------ the set
@dataclass
class VBenchModels:
    """The loaded models, plus ``missing``: dimension -> one-line reason for each requested dimension that cannot
    be computed. Build with :meth:`load`."""

    dino: FeatureExtractor | None = None
    clip_b32: FeatureExtractor | None = None
    clip_l14: FeatureExtractor | None = None
    aesthetic_head: torch.nn.Linear | None = None
    musiq: torch.nn.Module | None = None
    raft: torch.nn.Module | None = None
    interpolator: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")
    dimensions: tuple[str, ...] = SUPPORTED_DIMENSIONS
    missing: dict[str, str] | None = None

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(d for d in self.dimensions if d not in (self.missing or {}))

    @classmethod
    def load(cls, paths: VBenchModelPaths | None = None, *, dimensions: tuple[str, ...] | None = None,
             device: str | torch.device = "cpu", clip_dtype: torch.dtype | None = None) -> VBenchModels:
        """Load every model the requested ``dimensions`` need (default: all supported ones). A model that is not
        given or cannot be loaded makes its dimensions missing (with the reason), never silently absent.

        ``clip_dtype`` (default: float16 on CUDA, float32 elsewhere) is what VBench gets from OpenAI's
        ``clip.load``, which keeps the float16 weights on CUDA and converts to float32 on the CPU; DINO, MUSIQ and
        RAFT run in float32 as in VBench."""
        paths = paths or VBenchModelPaths()
        dims = tuple(dimensions or SUPPORTED_DIMENSIONS)
        unknown = [d for d in dims if d not in DIMENSION_MODELS]
        if unknown:
            raise ValueError(f"unknown or unsupported VBench dimension(s) {unknown}; supported: "
                             f"{', '.join(SUPPORTED_DIMENSIONS)}")
        dev = torch.device(device)
        if clip_dtype is None:
            clip_dtype = torch.float16 if dev.type == "cuda" else torch.float32
        out = cls(device=dev, dimensions=dims, missing={})
        errors: dict[str, str] = {}
        loaders: dict[str, Callable[[str], object]] = {
            "dino": lambda v: load_dino(v, dev, torch.float32),
            "clip_b32": lambda v: load_clip(v, "clip_b32", dev, clip_dtype),
            "clip_l14": lambda v: load_clip(v, "clip_l14", dev, clip_dtype),
            "musiq": lambda v: load_musiq(v, dev),
            "raft": lambda v: load_raft(v, dev),
            "interpolator": lambda v: load_interpolator(v, dev),
        }
        needed = {f for d in dims for f in DIMENSION_MODELS[d]}
        for f in fields(VBenchModelPaths):
            name = f.name
            if name not in needed or name == "aesthetic_head":
                continue
            value = getattr(paths, name)
            if value is None:
                errors[name] = f"no --{name} given"
                continue
            try:
                setattr(out, name, loaders[name](value))
            except ModelUnavailable as e:
                errors[name] = str(e)
        if "aesthetic_head" in needed:
            if paths.aesthetic_head is None:
                errors["aesthetic_head"] = "no --aesthetic_head given"
            elif out.clip_l14 is not None:
                try:
                    out.aesthetic_head = load_aesthetic_head(paths.aesthetic_head, out.clip_l14.dim).to(dev)
                except ModelUnavailable as e:
                    errors["aesthetic_head"] = str(e)
        for d in dims:
            reasons = [errors[f] for f in DIMENSION_MODELS[d] if f in errors]
            if reasons:
                out.missing[d] = "; ".join(reasons)
        return out
