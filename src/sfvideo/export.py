"""``sfvideo export``: a trained network of a Lightning checkpoint as a diffusers-format folder that describes itself.

    sfvideo export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out exported/generator --ema

Works for every training module (``SelfForcingDMD``: generator or critic; ``ODEInit``: generator;
``FlowMatchingDiffusion``: model). The folder loads with ``WanTransformer.from_pretrained`` and diffusers'
``WanTransformer3DModel.from_pretrained``; its ``sfvideo.json`` (``checkpoints.RECORD_FILE``) is the run's record
(inference settings, text encoder, codec), so ``sfvideo generate <folder>`` needs nothing else. Written to a
temporary folder and renamed, so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(msg: str) -> None:
    print(f"sfvideo export: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def export_checkpoint(
    ckpt: str | Path, out: str | Path, *, network: str | None = None, ema: bool = False, overwrite: bool = False
) -> Path:
    """Export one network of a Lightning checkpoint (default: the one it samples); returns the folder written."""
    from sfvideo.checkpoints import RECORD_FIELDS, RECORD_FILE, read_checkpoint
    from sfvideo.nn.checkpoint import CheckpointError, export_diffusers

    checkpoint = read_checkpoint(ckpt)
    if checkpoint.kind != "lightning":
        raise ValueError(f"{ckpt} is not a Lightning checkpoint of an sfvideo training module")
    name = network or checkpoint.network
    if name not in checkpoint.network_names():
        raise ValueError(f"{ckpt}: pass --network, one of {checkpoint.network_names()} (got {name!r})")
    try:
        model = checkpoint.load_network(name, ema=ema)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    extra = {}
    if checkpoint.record is not None:
        record = {**{k: checkpoint.record.get(k) for k in RECORD_FIELDS}, "network": name}
        extra[RECORD_FILE] = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    return export_diffusers(model, out, overwrite=overwrite, extra_files=extra)


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
    from sfvideo.checkpoints import read_checkpoint

    print(f"exported {read_checkpoint(out).network or 'the network'}{' (EMA)' if args.ema else ''} to {out}")


if __name__ == "__main__":
    main()
