"""Prediction writers for ``sfvideo predict``: each generated video as an mp4 plus a PNG contact sheet.

The module's ``predict_step`` returns ``{"prompts": list[str], "latents": (B, F, C, h, w), "video": (B, T, 3, H, W)
in [-1, 1] or None}``. :class:`VideoPredictionWriter` writes, per sample, ``<stem>.mp4`` and ``<stem>.png`` (frames
over time) under ``output_dir`` (default ``<trainer.log_dir>/predictions``), plus ``<stem>.pt`` latents when asked
or when there is no video (no codec), and one ``prompts.jsonl`` line per sample mapping file stems to prompts.
Files are written through a temporary name and renamed (see ``sfvideo.video``), so an interrupted prediction
never leaves a truncated file under a final name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from sfvideo.files import AtomicFile
from sfvideo.video import DEFAULT_FPS, save_contact_sheet, write_mp4


def slug(text: str, max_len: int = 48) -> str:
    """File-name-safe short form of a prompt: lower-case words joined by ``_``."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "video"


class VideoPredictionWriter(BasePredictionWriter):
    """Write each predicted video as ``.mp4`` + contact-sheet ``.png`` (and optionally its latents).

    Args:
        output_dir: Folder of the files; default ``<trainer.log_dir>/predictions`` (the run folder).
        fps: Frame rate of the mp4.
        contact_sheet_columns: Frames (evenly spaced in time) in the contact sheet.
        save_latents: Also save each sample's latents ``(F, C, h, w)`` as ``.pt``.
        write_interval: Lightning's ``"batch"`` (write as predictions come; default) or ``"epoch"``.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        fps: int = DEFAULT_FPS,
        contact_sheet_columns: int = 8,
        save_latents: bool = False,
        write_interval: Literal["batch", "epoch", "batch_and_epoch"] = "batch",
    ) -> None:
        super().__init__(write_interval)
        self.output_dir = output_dir
        self.fps = fps
        self.contact_sheet_columns = contact_sheet_columns
        self.save_latents = save_latents
        self.written: list[Path] = []
        """Paths written by this process (mp4, png, pt)."""

    def folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            root = Path(self.output_dir)
        else:
            root = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def write_prediction(self, trainer: L.Trainer, prediction: dict[str, Any], batch_idx: int) -> list[Path]:
        """Write one ``predict_step`` output; returns the paths written."""
        for key in ("prompts", "latents"):
            if key not in prediction:
                raise KeyError(f"VideoPredictionWriter: predict_step output lacks {key!r} (keys: {sorted(prediction)})")
        prompts: Sequence[str] = prediction["prompts"]
        latents: torch.Tensor = prediction["latents"]
        video: torch.Tensor | None = prediction.get("video")
        if video is not None and (video.ndim != 5 or video.shape[2] != 3):
            raise ValueError(f"VideoPredictionWriter: video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        root = self.folder(trainer)
        paths: list[Path] = []
        records = []
        for i, prompt in enumerate(prompts):
            stem = f"r{trainer.global_rank}_b{batch_idx:05d}_{i:02d}_{slug(prompt)}"
            if video is not None:
                paths.append(write_mp4(root / f"{stem}.mp4", video[i], fps=self.fps))
                paths.append(save_contact_sheet(root / f"{stem}.png", video[i], columns=self.contact_sheet_columns))
            if self.save_latents or video is None:
                with AtomicFile(root / f"{stem}.pt") as tmp:
                    torch.save(latents[i].detach().cpu().clone(), tmp)
                paths.append(root / f"{stem}.pt")
            records.append({"stem": stem, "prompt": prompt, "batch_idx": batch_idx, "rank": trainer.global_rank})
        with (root / f"prompts.r{trainer.global_rank}.jsonl").open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        self.written.extend(paths)
        return paths

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.write_prediction(trainer, prediction, batch_idx)

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        if self.interval.on_batch:  # already written batch by batch
            return
        flat = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        for batch_idx, prediction in enumerate(flat):
            self.write_prediction(trainer, prediction, batch_idx)
