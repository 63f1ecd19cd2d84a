"""``sfvideo export``: a trained network of a Lightning checkpoint as a diffusers-format folder.

    sfvideo export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out exported/generator --ema

Works for every training module (``SelfForcingDMD``: generator or critic; ``ODEInit``: generator;
``FlowMatchingDiffusion``: model). The folder loads with ``WanTransformer.from_pretrained`` and diffusers'
``WanTransformer3DModel.from_pretrained``. Written to a temporary folder and renamed, so an interrupted export never
leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

DEFAULT_NETWORK = {"SelfForcingDMD": "generator", "ODEInit": "generator", "FlowMatchingDiffusion": "model"}


def _fail(msg: str) -> None:
    print(f"sfvideo export: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _configs_from_flavor(hp: dict[str, Any], network: str) -> dict[str, dict]:
    """Older checkpoints without stored configs: rebuild a flavor's config from the hyper-parameters."""
    from sfvideo.nn.wan import FLAVORS

    source = hp.get("teacher") if network in ("generator", "critic") else hp.get("model")
    overrides = hp.get("teacher_overrides") if network in ("generator", "critic") else hp.get("model_overrides")
    if isinstance(source, str) and source in FLAVORS:
        return {network: {**FLAVORS[source], **(overrides or {})}}
    return {}


def export_checkpoint(
    ckpt: str | Path, out: str | Path, *, network: str | None = None, ema: bool = False, overwrite: bool = False
) -> Path:
    """Export one network of a Lightning checkpoint; returns the folder written."""
    from sfvideo.nn.checkpoint import export_diffusers
    from sfvideo.nn.wan import WanTransformer

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{ckpt} is not a Lightning checkpoint (no 'state_dict')")
    extra: dict[str, Any] = state.get("sfvideo") or {}
    configs: dict[str, dict] = extra.get("configs") or {}
    if network is None:
        prefixes = sorted({k.split(".", 1)[0] for k in state["state_dict"]})
        network = next((n for n in ("generator", "model") if n in prefixes), None)
        if network is None:
            raise ValueError(f"{ckpt}: pass --network, one of {prefixes}")
    if network not in configs:
        configs = {**configs, **_configs_from_flavor(state.get("hyper_parameters") or {}, network)}
    if network not in configs:
        raise ValueError(f"{ckpt}: no stored config for network {network!r} (have: {sorted(configs)})")
    weights = {k[len(network) + 1 :]: v for k, v in state["state_dict"].items() if k.startswith(network + ".")}
    if ema:
        # Per-rank EMA state (``rank_local``); one-device and ZeRO-1/2 runs store it whole in the .ckpt file.
        ema_entry = (state.get("rank_local") or {}).get(f"{network}_ema") or {}
        ema_state = ema_entry.get("shadow") or extra.get("ema")
        if not ema_state:
            raise ValueError(f"{ckpt}: --ema asked for, but the checkpoint holds no EMA (did the EMA start yet?)")
        weights.update(ema_state)
    model = WanTransformer(**configs[network])
    model.load_state_dict(weights, strict=True)
    return export_diffusers(model, out, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sfvideo export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of an sfvideo training module")
    p.add_argument("--out", required=True, help="output folder (diffusers format)")
    p.add_argument("--network", default=None, help="generator | critic | model (default: the trained student)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, network=args.network, ema=args.ema, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        _fail(str(e).splitlines()[0])
    print(f"exported {args.network or 'generator'}{' (EMA)' if args.ema else ''} to {out}")


if __name__ == "__main__":
    main()
