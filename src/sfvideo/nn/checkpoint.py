"""Loading Wan2.1 transformer weights from every format they ship in, and writing diffusers folders.

Formats understood by :func:`load_transformer` (detected, not declared):

* a **diffusers folder**: ``<root>/transformer/`` or the folder itself, with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or shards plus ``*.safetensors.index.json``, or ``.bin``);
* a **hub id** such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: the only case that downloads anything;
* a single **original-Wan-layout file** (``.safetensors`` / ``.pt`` / ``.pth``, keys like
  ``blocks.0.self_attn.q.weight``, ``head.head.weight``), or the original Wan folder (its ``config.json`` holds
  ``dim``/``num_heads``);
* a **Self Forcing / CausVid checkpoint**: a ``.pt`` dict ``{"generator": sd, "critic": sd, "generator_ema": sd}``
  (CausVid: ``{"generator": sd}`` or ``{"model": sd}``) whose keys carry the ``model.`` prefix of the wrapper, and
  sometimes FSDP / compile / DDP wrapper segments (``_fsdp_wrapped_module.``, ``_orig_mod.``,
  ``_checkpoint_wrapped_module.``, a leading ``module.``).

There is one conversion path: read tensors → pick the sub-dict → strip wrapper prefixes → if the keys are in the
original Wan layout convert them with diffusers' own
``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`` → build the model with its parameters
on the meta device (``accelerate.init_empty_weights``) → ``load_state_dict(assign=True)``. The model class is
generic (``model_cls``); it must take diffusers' ``WanTransformer3DModel`` constructor arguments and use its
state-dict key names (``sfvideo.nn.wan``'s ``WanTransformer`` does).

Config inference (when no ``config.json`` and no ``config`` are given) reads every size from weight shapes, except:

* the **head count**: ``inner_dim = num_attention_heads * attention_head_dim`` is all the weights show. Wan uses
  ``attention_head_dim = 128`` (1.3B: 12 heads, 14B: 40 heads), which is the default assumption; pass
  ``config={"num_attention_heads": ...}`` or ``config={"attention_head_dim": ...}`` for anything else;
* ``eps`` and ``rope_max_seq_len``: left at the constructor defaults (Wan: 1e-6 and 1024).

Memory: parameters are never materialised twice. The model is built with its parameters on the meta device and the
loaded tensors are assigned in place (``assign=True``); ``.pt`` files are memory-mapped. Frozen copies (the
teacher) should be loaded straight in bf16 (``dtype=torch.bfloat16``): there is no fp32 master for them. Modules
listed in the class's ``_keep_in_fp32_modules`` (diffusers' fp32 islands: time embedder, modulation tables, norms)
stay fp32, as diffusers' ``from_pretrained`` does.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfvideo.nn.precision import keeps_fp32

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "convert_to_diffusers_layout",
    "export_diffusers",
    "infer_wan_config",
    "load_transformer",
    "read_folder_config",
    "read_self_forcing_checkpoint",
    "read_state_dict",
    "strip_wrapper_prefixes",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
"""diffusers' weight file name inside a model folder."""
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
"""diffusers' shard index name (``{"metadata": {...}, "weight_map": {key: shard_file}}``)."""
CONFIG_NAME = "config.json"

DEFAULT_HEAD_DIM = 128
"""Wan2.1's attention head width (all sizes); used to infer the head count from ``inner_dim``."""

SUBDICT_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")
"""Keys tried, in this order, when a checkpoint file holds several state dicts and ``key`` is None."""

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
"""Path segments inserted by FSDP(1), ``torch.compile`` and activation-checkpoint wrappers, anywhere in a key."""
_LEADING_PREFIXES = ("module.", "model.")
"""Prefixes stripped when *every* key has them: DDP's ``module.`` and the Self Forcing/CausVid wrapper's ``model.``."""


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Reading tensors from disk
# ----------------------------------------------------------------------------------------------------------------


TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
"""First bytes of a ``torch.save`` file: a zip archive (the default) or a legacy pickle."""


def check_torch_file(path: Path) -> None:
    """Raise a one-line ``CheckpointError`` when ``path`` is not a ``torch.save`` file (a random or text file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if not head.startswith(TORCH_FILE_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save file nor safetensors")


def _load_file(path: Path) -> dict[str, Any]:
    """Read one ``.safetensors`` or torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``) file onto the CPU."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix != ".safetensors":
        check_torch_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights_only: checkpoints are data, never code. mmap: a Self Forcing file holds generator, critic and EMA;
        # mapping it lets us touch only the sub-dict we keep.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one line naming the file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {reason}") from e


def _weight_files_in(folder: Path) -> list[Path]:
    """The weight files of a diffusers (or original Wan) model folder, shards resolved through their index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index_path = folder / WEIGHTS_INDEX_NAME if (folder / WEIGHTS_INDEX_NAME).exists() else indexes[0]
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"cannot read shard index {index_path}: {e}") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).exists():
        return [folder / WEIGHTS_NAME]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt, *.pth) in model folder {folder}")


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file, or every weight file of a model folder, into one CPU dict.

    Args:
        path: a file, or a folder with (possibly sharded) weights.

    Returns:
        The raw contents: a flat ``{key: Tensor}`` for weight files, possibly a nested dict for training checkpoints.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return _load_file(path)
    merged: dict[str, Any] = {}
    for file in _weight_files_in(path):
        part = _load_file(file)
        duplicated = merged.keys() & part.keys()
        if duplicated:
            raise CheckpointError(f"key '{sorted(duplicated)[0]}' appears in several weight files of {path}")
        merged.update(part)
    return merged


def _select_subdict(contents: Mapping[str, Any], key: str | None, source: str) -> dict[str, torch.Tensor]:
    """Pick the state dict out of a training checkpoint (``generator_ema`` / ``generator`` / ``model``...)."""
    nested = {k for k, v in contents.items() if isinstance(v, Mapping)}
    if key is not None:
        if key not in contents:
            raise CheckpointError(f"{source}: no key '{key}' in checkpoint (top-level keys: {sorted(contents)[:10]})")
        chosen = contents[key]
        if not isinstance(chosen, Mapping):
            raise CheckpointError(f"{source}: checkpoint['{key}'] is a {type(chosen).__name__}, not a state dict")
    elif nested:
        found = next((k for k in SUBDICT_KEYS if k in nested), None)
        if found is None:
            raise CheckpointError(
                f"{source}: checkpoint holds several dicts {sorted(nested)[:10]}; pass key= to pick one"
            )
        logger.info("%s: using checkpoint['%s']", source, found)
        chosen = contents[found]
    else:
        chosen = contents
    tensors = {k: v for k, v in chosen.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: the selected state dict holds no tensors")
    return tensors


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove FSDP/compile/checkpoint wrapper segments anywhere in a key and shared ``module.``/``model.`` prefixes.

    ``model._fsdp_wrapped_module.blocks.0._orig_mod.self_attn.q.weight`` → ``blocks.0.self_attn.q.weight``.
    A leading prefix is removed only when every key has it, so a real submodule called ``model`` survives.
    """
    out = {}
    for k, v in state_dict.items():
        parts = [p for p in k.split(".") if p not in _WRAPPER_SEGMENTS]
        out[".".join(parts)] = v
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING_PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def read_self_forcing_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read one network's weights from a Self Forcing / CausVid ``.pt`` checkpoint.

    Args:
        path: ``checkpoint_model_XXXXXX/model.pt`` (Self Forcing) or a CausVid checkpoint.
        key: ``"generator_ema"``, ``"generator"``, ``"critic"``, ``"model"``...; None picks the first present of
            :data:`SUBDICT_KEYS` (so the EMA weights when they exist).

    Returns:
        The state dict with wrapper prefixes stripped, in whatever key layout it was saved in (the original Wan
        layout for Self Forcing); :func:`convert_to_diffusers_layout` maps it to diffusers names.
    """
    path = Path(path)
    return strip_wrapper_prefixes(_select_subdict(read_state_dict(path), key, str(path)))


# ----------------------------------------------------------------------------------------------------------------
# 2. Layout detection and conversion
# ----------------------------------------------------------------------------------------------------------------


def _layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"diffusers"`` or ``"original"`` (Wan's own names), from marker keys."""
    keys = list(state_dict)
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k.startswith("proj_out.") for k in keys):
        return "diffusers"
    if any(k.startswith(("head.head.", "time_embedding.", "text_embedding.")) or ".self_attn." in k for k in keys):
        return "original"
    raise CheckpointError(f"unrecognised Wan transformer key layout (first keys: {keys[:5]})")


def convert_to_diffusers_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` with diffusers' ``WanTransformer3DModel`` key names (no-op when already so).

    Uses diffusers' ``convert_wan_transformer_to_diffusers`` (renames ``self_attn.q`` → ``attn1.to_q``, swaps
    ``norm3`` → ``norm2``, ``head.head`` → ``proj_out``, ``modulation`` → ``scale_shift_table``, and strips
    ``model.diffusion_model.``). It pops from its input, so it gets a shallow copy; tensors are not copied.
    """
    if _layout(state_dict) == "diffusers":
        return dict(state_dict)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state_dict))


def _original_config_to_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an original Wan ``config.json`` (``dim``, ``num_heads``, ``in_dim``...) to constructor names."""
    out: dict[str, Any] = {}
    if "dim" in cfg and "num_heads" in cfg:
        out["num_attention_heads"] = cfg["num_heads"]
        out["attention_head_dim"] = cfg["dim"] // cfg["num_heads"]
    renames = {"in_dim": "in_channels", "out_dim": "out_channels"}
    for src in ("in_dim", "out_dim", "ffn_dim", "freq_dim", "text_dim", "num_layers", "eps", "cross_attn_norm"):
        if src in cfg:
            out[renames.get(src, src)] = cfg[src]
    if "patch_size" in cfg:
        out["patch_size"] = tuple(cfg["patch_size"])
    if "qk_norm" in cfg:
        out["qk_norm"] = "rms_norm_across_heads" if cfg["qk_norm"] else None
    return out


def infer_wan_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    attention_head_dim: int | None = None,
) -> dict[str, Any]:
    """Constructor arguments of ``WanTransformer3DModel`` read from a diffusers-layout state dict's shapes.

    Args:
        state_dict: diffusers key names (see :func:`convert_to_diffusers_layout`).
        num_attention_heads: head count, if known (the weights only show ``heads * head_dim``).
        attention_head_dim: head width, if known; default :data:`DEFAULT_HEAD_DIM` (Wan's 128) when neither is given.

    Returns:
        A dict with patch_size, heads, head_dim, in/out channels, text_dim, freq_dim, ffn_dim, num_layers,
        cross_attn_norm, qk_norm and the I2V fields (image_dim, added_kv_proj_dim, pos_embed_seq_len).
        ``eps`` and ``rope_max_seq_len`` cannot be inferred and are left to the constructor defaults.
    """

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the Wan config: key '{key}' missing from the state dict")
        return state_dict[key]

    patch = need("patch_embedding.weight")  # (inner_dim, in_channels, p_t, p_h, p_w)
    inner_dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])
    if num_attention_heads is None:
        head_dim = attention_head_dim or DEFAULT_HEAD_DIM
        if inner_dim % head_dim:
            raise CheckpointError(
                f"cannot infer the head count: inner dim {inner_dim} is not a multiple of attention_head_dim "
                f"{head_dim}; pass config={{'num_attention_heads': ...}}"
            )
        num_attention_heads = inner_dim // head_dim
    elif attention_head_dim is None:
        if inner_dim % num_attention_heads:
            raise CheckpointError(
                f"inner dim {inner_dim} is not divisible by num_attention_heads {num_attention_heads}"
            )
        head_dim = inner_dim // num_attention_heads
    else:
        head_dim = attention_head_dim
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise CheckpointError("cannot infer the Wan config: no 'blocks.N.' keys in the state dict")
    proj_out = need("proj_out.weight")  # (out_channels * prod(patch), inner_dim)
    cfg: dict[str, Any] = {
        "patch_size": patch_size,
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": int(proj_out.shape[0]) // math.prod(patch_size),
        "text_dim": int(need("condition_embedder.text_embedder.linear_1.weight").shape[1]),
        "freq_dim": int(need("condition_embedder.time_embedder.linear_1.weight").shape[1]),
        "ffn_dim": int(need("blocks.0.ffn.net.0.proj.weight").shape[0]),
        "num_layers": max(block_ids) + 1,
        "cross_attn_norm": "blocks.0.norm2.weight" in state_dict,  # affine LayerNorm only when enabled
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state_dict else None,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "pos_embed_seq_len": None,
    }
    # I2V / FLF2V variants: CLIP image tokens go through an extra embedder and extra K/V projections.
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:
        cfg["image_dim"] = int(state_dict["condition_embedder.image_embedder.norm1.weight"].shape[0])
    if "blocks.0.attn2.add_k_proj.weight" in state_dict:
        cfg["added_kv_proj_dim"] = int(state_dict["blocks.0.attn2.add_k_proj.weight"].shape[1])
    if "condition_embedder.image_embedder.pos_embed" in state_dict:
        cfg["pos_embed_seq_len"] = int(state_dict["condition_embedder.image_embedder.pos_embed"].shape[1])
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# 3. Building and loading
# ----------------------------------------------------------------------------------------------------------------


def _default_model_cls() -> type[nn.Module]:
    from sfvideo.nn.wan import WanTransformer  # lazy: nn/wan.py is optional for checkpoint reading

    return WanTransformer


def _constructor_args(model_cls: type) -> set[str] | None:
    """Names ``model_cls.__init__`` accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(model_cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "self"}


def _resolve_source(source: str | os.PathLike) -> tuple[Path, str]:
    """Map ``source`` to a local path; download only for a hub id. Returns ``(path, kind)`` with kind file/folder."""
    path = Path(source)
    if path.is_file():
        return path, "file"
    if path.is_dir():
        sub = path / "transformer"
        if (sub / CONFIG_NAME).exists() or (sub.is_dir() and not (path / CONFIG_NAME).exists()):
            return sub, "folder"
        return path, "folder"
    text = str(source)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and path.suffix not in {
        ".pt",
        ".pth",
        ".safetensors",
        ".bin",
        ".ckpt",
    }
    if not looks_like_hub_id:
        raise FileNotFoundError(f"load_transformer: no such file or folder: {source}")
    from huggingface_hub import snapshot_download  # the only network access in this module

    local = Path(snapshot_download(text, allow_patterns=["transformer/*", CONFIG_NAME, "diffusion_pytorch_model*"]))
    return _resolve_source(local)


def read_folder_config(folder: Path) -> dict[str, Any]:
    """Constructor arguments from ``folder/config.json`` (diffusers or original Wan names), ``{}`` without one."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        return {}
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot parse {cfg_path}: {e}") from e
    if "dim" in raw and "num_heads" in raw:  # original Wan config.json
        return _original_config_to_diffusers(raw)
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _short_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_transformer(
    source: str | os.PathLike,
    *,
    model_cls: type[nn.Module] | None = None,
    key: str | None = None,
    prefix: str | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a Wan transformer from a diffusers folder, hub id, original-Wan file or Self Forcing checkpoint.

    Args:
        source: path or hub id (see the module docstring for the formats).
        model_cls: class to build; default ``sfvideo.nn.wan.WanTransformer``. Must accept ``WanTransformer3DModel``
            constructor arguments and use its key names.
        key: which network of a multi-network checkpoint (``"generator_ema"``, ``"generator"``, ``"critic"``...);
            None picks the first of :data:`SUBDICT_KEYS` present.
        prefix: keep only keys starting with this and strip it, e.g. ``"generator."`` for a state dict holding
            several networks (a Lightning ``state_dict``); applied after wrapper segments are removed.
        config: constructor arguments overriding those from ``config.json`` or inferred from shapes (e.g.
            ``{"num_attention_heads": 12}``; see :func:`infer_wan_config` for what cannot be inferred).
        dtype: parameter dtype (default: torch's default dtype, fp32); fp32 islands of the class stay fp32.
        device: where the parameters end up.
        strict: raise on missing or unexpected keys (otherwise they are warned about; missing parameters then keep
            the class's random initialisation).

    Returns:
        The model, in eval mode (call ``.train()`` for a trainable copy).

    Raises:
        FileNotFoundError: ``source`` does not exist (and is not a hub id).
        CheckpointError: unreadable file, unknown layout, shape mismatch (names key, both shapes and the file),
            or missing/unexpected keys with ``strict``.
    """
    model_cls = model_cls or _default_model_cls()
    path, kind = _resolve_source(source)
    contents = read_state_dict(path)
    state_dict = strip_wrapper_prefixes(_select_subdict(contents, key, str(path)))
    del contents
    if prefix:
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise CheckpointError(f"{path}: no keys start with prefix '{prefix}'")
        state_dict = strip_wrapper_prefixes(state_dict)
    state_dict = convert_to_diffusers_layout(state_dict)

    # Config: inferred from shapes < config.json next to the weights < explicit overrides.
    file_cfg = read_folder_config(path) if kind == "folder" else {}
    overrides = {**file_cfg, **(config or {})}
    try:
        inferred = infer_wan_config(
            state_dict,
            num_attention_heads=overrides.get("num_attention_heads"),
            attention_head_dim=overrides.get("attention_head_dim"),
        )
    except CheckpointError:
        if not overrides:  # nothing else to go on
            raise
        inferred = {}  # a partial checkpoint (strict=False) described by config.json / config
    cfg = {**inferred, **overrides}
    if "patch_embedding.weight" in state_dict and {"num_attention_heads", "attention_head_dim"} <= cfg.keys():
        inner_dim = int(state_dict["patch_embedding.weight"].shape[0])
        if cfg["num_attention_heads"] * cfg["attention_head_dim"] != inner_dim:
            raise CheckpointError(
                f"{path}: num_attention_heads {cfg['num_attention_heads']} x attention_head_dim "
                f"{cfg['attention_head_dim']} != weight width {inner_dim}"
            )
    accepted = _constructor_args(model_cls)
    if accepted is not None:
        unknown = sorted(k for k in cfg if k not in accepted)
        if unknown:
            if config and any(k in config for k in unknown):
                raise CheckpointError(f"config keys not accepted by {model_cls.__name__}: {unknown}")
            logger.info("%s: ignoring config keys %s not accepted by %s", path, unknown, model_cls.__name__)
        cfg = {k: v for k, v in cfg.items() if k in accepted}
    if isinstance(cfg.get("patch_size"), list):
        cfg["patch_size"] = tuple(cfg["patch_size"])

    from accelerate import init_empty_weights

    # Parameters on the meta device, buffers real: non-persistent buffers (RoPE tables) are computed in __init__.
    with init_empty_weights(include_buffers=False):
        model = model_cls(**cfg)
    expected = model.state_dict()  # meta tensors: shapes only

    # Keys: report before touching memory.
    ignore = [re.compile(p) for p in (getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or [])]
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not any(p.search(k) for p in ignore))
    for k in sorted(expected.keys() & state_dict.keys()):
        if tuple(expected[k].shape) != tuple(state_dict[k].shape):
            raise CheckpointError(
                f"shape mismatch for key '{k}': checkpoint {tuple(state_dict[k].shape)} vs model "
                f"{tuple(expected[k].shape)} (file {path})"
            )
    if missing or unexpected:
        msg = f"{path}: missing keys [{_short_list(missing)}]; unexpected keys [{_short_list(unexpected)}]"
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    if missing:
        # Non-strict with gaps: meta parameters cannot stay meta, so the gaps get the class's own initialisation.
        fresh = model_cls(**cfg).state_dict()
        state_dict.update({k: fresh[k] for k in missing})
        del fresh

    target_dtype = dtype or torch.get_default_dtype()
    keep_fp32 = list(getattr(model_cls, "_keep_in_fp32_modules", None) or [])
    loadable = {}
    for k in expected:
        v = state_dict[k]
        if not v.is_floating_point():
            want = v.dtype
        elif target_dtype in (torch.float16, torch.bfloat16) and keeps_fp32(k, keep_fp32):
            want = torch.float32  # diffusers' fp32 islands
        else:
            want = target_dtype
        loadable[k] = v.to(device=device, dtype=want)
    del state_dict
    model.load_state_dict(loadable, strict=True, assign=True)
    model.to(device)  # non-persistent buffers (RoPE tables) were created on the CPU
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# 4. Writing diffusers folders
# ----------------------------------------------------------------------------------------------------------------


def export_diffusers(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    class_name: str = "WanTransformer3DModel",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers model folder (``config.json`` + safetensors) atomically (``sfvideo.files.atomic_folder``).

    The weights are written by diffusers' own ``save_pretrained`` (shards and index included), so the folder is
    what diffusers writes; ``_class_name`` is then set to ``class_name`` so stock diffusers picks its class.

    Args:
        model_or_state_dict: a model (its ``config`` is used when ``config`` is None) or a diffusers-layout state dict
            (original-layout and wrapped keys are converted first).
        out_dir: folder to create, e.g. ``export/transformer``.
        config: constructor arguments; required for a bare state dict.
        class_name: ``_class_name`` recorded in ``config.json``.
        max_shard_bytes: split the weights into shards of at most this size with a diffusers index (None: one file).
        overwrite: replace an existing ``out_dir`` (otherwise it is an error).
        extra_files: more files written into the folder before it appears, ``{name: text}``.

    Returns:
        ``out_dir`` as a Path.
    """
    from accelerate import init_empty_weights

    from sfvideo.files import atomic_folder

    out_dir = Path(out_dir)
    if isinstance(model_or_state_dict, nn.Module) and config is None:
        model = model_or_state_dict
    else:
        if config is None:
            raise ValueError("export_diffusers: config is required when exporting a bare state dict")
        state_dict = model_or_state_dict
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        state_dict = convert_to_diffusers_layout(strip_wrapper_prefixes(state_dict))
        cfg = {k: tuple(v) if k == "patch_size" else v for k, v in dict(config).items() if not k.startswith("_")}
        with init_empty_weights(include_buffers=False):
            model = _default_model_cls()(**cfg)
        model.load_state_dict(state_dict, strict=True, assign=True)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"export_diffusers: {type(model).__name__} has no save_pretrained (not a diffusers model)")
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_bytes or "1000GB")
        cfg_path = tmp / CONFIG_NAME
        cfg = json.loads(cfg_path.read_text())
        cfg["_class_name"] = class_name
        cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
