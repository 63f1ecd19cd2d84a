"""``sfvideo export``: a trained network of a Lightning checkpoint as a diffusers-format folder that describes itself.

    sfvideo export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out exported/generator --ema

Works for every training module (``SelfForcingDMD``: generator or critic; ``ODEInit``: generator;
``FlowMatchingDiffusion``: model). The folder loads with ``WanTransformer.from_pretrained`` and diffusers'
``WanTransformer3DModel.from_pretrained``; its ``sfvideo.json`` (``checkpoints.RECORD_FILE``) is the run's record
(inference settings, text encoder, codec), so ``sfvideo generate <folder>`` needs nothing else. Written to a
temporary folder and renamed, so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sfvideo.errors import ArgParser, fail

PROG = "sfvideo export"


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
        # Which state this is: a run's last.ckpt is not always its final step (and an EMA export is not the
        # trained weights), so the folder says where it came from.
        contents = checkpoint.contents or {}
        record["source"] = {"checkpoint": Path(ckpt).name, "epoch": contents.get("epoch"),
                            "global_step": contents.get("global_step"), "ema": ema}
        extra[RECORD_FILE] = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    return export_diffusers(model, out, overwrite=overwrite, extra_files=extra)


def check_out(out: Path, overwrite: bool) -> None:
    """The output folder can be made: its parent is a writable folder, and it is new (or ``--overwrite``)."""
    parent = out.parent if str(out.parent) else Path(".")
    up = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not up.is_dir():
        fail(PROG, f"--out {out}: {up} is a file, not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        fail(PROG, f"--out {out}: folder {up} is not writable")
    if out.exists() and not overwrite:
        fail(PROG, f"--out {out} already exists (pass --overwrite to replace it)")


def main(argv: list[str] | None = None) -> None:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of an sfvideo training module")
    p.add_argument("--out", required=True, help="output folder (diffusers format)")
    p.add_argument("--network", default=None, help="generator | critic | model (default: the trained student)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    from sfvideo.checkpoints import RECORD_FILE

    check_out(Path(args.out), args.overwrite)
    try:
        out = export_checkpoint(args.ckpt, args.out, network=args.network, ema=args.ema, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        fail(PROG, e)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing is left under --out
        fail(PROG, f"--out {args.out}: {e.strerror or e}")
    record_file = Path(out) / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    what = f"{record.get('module', 'the module')}'s {record.get('network', 'network')}"
    print(f"exported {what}{' (EMA)' if args.ema else ''} to {out}")


if __name__ == "__main__":
    main()
