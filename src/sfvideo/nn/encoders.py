"""The real (Wan2.1) frozen encoders: umT5 text encoder and Wan VAE, behind ``sfvideo.nn.interfaces``.

* :class:`UMT5TextEncoder` implements ``TextEncoder``: Wan's conventions (512 tokens, padding to max length,
  output rows beyond each prompt's true length set to zero instead of passing a mask downstream).
* :class:`WanVAECodec` implements ``VideoCodec`` over diffusers' ``AutoencoderKLWan``: per-channel latent
  normalisation ``(z - mean) / std`` from the VAE config, our ``(B, F, C, h, w)`` layout, and
  :class:`WanVAEStreamDecoder`, a chunk-by-chunk decoder whose concatenated output equals a full decode to fp32
  rounding.
* :func:`precompute_prompt_embeddings` / :func:`load_prompt_embeddings`: prompt files encoded once to disk.

Both encoders are plain objects, not ``nn.Module`` attributes of a LightningModule, on purpose: Lightning would
otherwise move them with the module, count them as trainable and write them into every checkpoint.

Memory notes (Wan2.1 sizes):

* umT5-XXL encoder: about 5.7B parameters, 11.4 GB in bf16 (22.7 GB in fp32). It is frozen, so hold it in bf16
  (``dtype``) with no fp32 master copy; with ``offload=True`` the weights live in CPU memory and visit the compute
  device only during :meth:`UMT5TextEncoder.encode` (training needs it once per step, the negative prompt never
  again after the first call since its embedding is cached). Precomputing embeddings
  (:func:`precompute_prompt_embeddings`) removes it from training altogether.
* Wan VAE: about 127M parameters (0.25 GB in bf16); its causal caches during decode keep 2 frames of every
  causal conv's input, which at 480×832 dominate its memory, not the weights.

Not here: the transformer (``nn/wan.py``), checkpoint formats (``nn/checkpoint.py``), the toy world's encoders
(``toy/encoders.py``).
"""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sfvideo.nn.interfaces import StreamDecoder

__all__ = [
    "PromptEmbeddings",
    "UMT5TextEncoder",
    "WanVAECodec",
    "WanVAEStreamDecoder",
    "freeze",
    "load_prompt_embeddings",
    "precompute_prompt_embeddings",
    "read_prompts",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[key]


def freeze(module: ModuleT) -> ModuleT:
    """Make ``module`` a frozen constant: eval mode (no dropout) and ``requires_grad=False`` on every parameter.

    Returns the same module, so ``teacher = freeze(load_transformer(...))`` reads naturally.
    """
    module.eval()
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------------------------
# 1. umT5 text encoder
# ----------------------------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """Wan's ``clean="whitespace"`` prompt cleaning: unescape HTML (twice, as Wan does), collapse whitespace.

    Wan also runs ``ftfy.fix_text`` first; it is applied here when ftfy is installed.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """Frozen umT5 encoder with Wan's prompt conventions; implements ``sfvideo.nn.interfaces.TextEncoder``.

    Output of :meth:`encode` is ``(B, text_len, dim)``: each prompt is tokenized with EOS, padded to ``text_len``
    and encoded with the attention mask; rows at and beyond the prompt's token count are zero (Wan zeroes padding
    rather than handing a mask to the transformer's cross-attention).

    Args:
        path: a diffusers Wan folder (or hub id) holding ``text_encoder/`` and ``tokenizer/`` subfolders.
        text_encoder: overrides ``path`` for the model: a folder/hub id of a ``UMT5EncoderModel``, or an instance.
        tokenizer: overrides ``path`` for the tokenizer: a folder/hub id, or an instance.
        text_len: tokens per prompt after padding/truncation (Wan: 512).
        dtype: weight dtype; a frozen encoder is held in bf16 without fp32 masters (``"bf16"`` default).
        device: compute device for :meth:`encode` (outputs land here).
        offload: keep the weights on the CPU and move them to ``device`` only for the duration of each encode.
        negative_prompt: default string for :meth:`encode_negative`.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        text_encoder: str | os.PathLike | nn.Module | None = None,
        tokenizer: str | os.PathLike | Any | None = None,
        text_len: int = 512,
        dtype: torch.dtype | str = "bf16",
        device: str | torch.device = "cpu",
        offload: bool = False,
        negative_prompt: str = "",
    ) -> None:
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.text_len = text_len
        """Tokens per prompt after padding/truncation."""
        self.device = torch.device(device)
        """Compute device; embeddings are returned here."""
        self.offload = offload
        """Weights stay on the CPU between encodes."""
        self.negative_prompt = negative_prompt
        """Default string for :meth:`encode_negative`."""
        self.dtype = _as_dtype(dtype)
        self.model = freeze(self._load_model(path, text_encoder, self.dtype).to(self.dtype))
        self.model.to("cpu" if offload else self.device)
        self.tokenizer = self._load_tokenizer(path, tokenizer)
        self.dim = int(self.model.config.d_model)
        """Embedding width (4096 for umT5-XXL)."""
        self._negative_cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _load_model(path: str | os.PathLike | None, text_encoder: Any, dtype: torch.dtype) -> nn.Module:
        if isinstance(text_encoder, nn.Module):
            return text_encoder
        from transformers import UMT5EncoderModel

        if text_encoder is not None:
            return UMT5EncoderModel.from_pretrained(str(text_encoder), dtype=dtype)  # no fp32 detour
        if path is None:
            raise ValueError("UMT5TextEncoder: give path (a Wan diffusers folder) or text_encoder")
        return UMT5EncoderModel.from_pretrained(str(path), subfolder="text_encoder", dtype=dtype)

    @staticmethod
    def _load_tokenizer(path: str | os.PathLike | None, tokenizer: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        from transformers import AutoTokenizer

        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        if path is None:
            raise ValueError("UMT5TextEncoder: give path (a Wan diffusers folder) or tokenizer")
        return AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer")

    @contextmanager
    def _on_compute_device(self) -> Iterator[nn.Module]:
        """The model on the compute device; with offload it goes back to the CPU afterwards."""
        if not self.offload or self.device.type == "cpu":
            yield self.model
            return
        self.model.to(self.device)
        try:
            yield self.model
        finally:
            self.model.to("cpu")

    def to(self, device: str | torch.device) -> UMT5TextEncoder:
        """Change the compute device (weights follow unless offloaded); cached embeddings are moved too."""
        self.device = torch.device(device)
        if not self.offload:
            self.model.to(self.device)
        self._negative_cache = {k: v.to(self.device) for k, v in self._negative_cache.items()}
        return self

    @torch.no_grad()
    def encode_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, text_len, dim)`` with padding zeroed, and token counts ``(B,)`` (EOS included)."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string")
        texts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, text_len)
        mask = tokens["attention_mask"].to(self.device)  # (B, text_len), 1 for real tokens
        if ids.shape[1] != self.text_len:
            raise ValueError(f"tokenizer returned {ids.shape[1]} tokens, expected text_len={self.text_len}")
        with self._on_compute_device() as model:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, text_len, dim)
        # Wan zeroes every position past the prompt (masked_fill, not a product: padded rows may be non-finite).
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return hidden, mask.sum(dim=1)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, text_len, dim)`` embeddings of ``prompts``, padding zeroed (under ``no_grad``)."""
        return self.encode_with_lengths(prompts)[0]

    def encode_negative(self, prompt: str | None = None, batch_size: int = 1) -> torch.Tensor:
        """Embedding of the negative prompt, computed once per string and cached: ``(batch_size, text_len, dim)``."""
        prompt = self.negative_prompt if prompt is None else prompt
        if prompt not in self._negative_cache:
            self._negative_cache[prompt] = self.encode([prompt])
        return self._negative_cache[prompt].expand(batch_size, -1, -1)

    def clear_cache(self) -> None:
        """Drop cached negative-prompt embeddings."""
        self._negative_cache.clear()


# ----------------------------------------------------------------------------------------------------------------
# 2. Prompt embeddings on disk
# ----------------------------------------------------------------------------------------------------------------

_EMBEDDINGS_FORMAT = "sfvideo.prompt_embeddings.v1"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line, blank lines skipped.

    Raises:
        FileNotFoundError: no such file (message names it).
        ValueError: a line is not UTF-8 (message names the file and line number), or there is no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
        line = line.strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def _true_lengths(embeddings: torch.Tensor) -> torch.Tensor:
    """Per-row length of zero-padded embeddings ``(B, L, D)``: one past the last non-zero position."""
    nonzero = embeddings.ne(0).any(dim=-1)  # (B, L)
    positions = torch.arange(1, embeddings.shape[1] + 1, device=embeddings.device)
    return (nonzero * positions).amax(dim=1)


def precompute_prompt_embeddings(
    encoder: Any,
    prompts_file: str | os.PathLike,
    out_path: str | os.PathLike,
    batch_size: int = 16,
    *,
    progress: bool = True,
) -> Path:
    """Encode every prompt of a file once and store the embeddings, trimmed to each prompt's true length.

    File layout (safetensors): ``embeddings`` ``(sum of lengths, dim)`` rows of all prompts back to back and
    ``offsets`` ``(N + 1,)``; metadata holds the prompts (JSON), ``text_len`` and ``dim``. Written to a temporary
    file in the same folder and renamed, so an interrupted run never leaves a readable half file.

    Args:
        encoder: a ``TextEncoder``; ``encode_with_lengths`` is used when it has one, otherwise lengths are read
            off the zeroed padding.
        prompts_file: text file, one prompt per line (blank lines skipped).
        out_path: destination ``.safetensors`` file.
        batch_size: prompts per encoder call.
        progress: show a progress bar.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompts = read_prompts(prompts_file)
    rows: list[torch.Tensor] = []
    lengths: list[int] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=f"encoding {Path(prompts_file).name}", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        if hasattr(encoder, "encode_with_lengths"):
            emb, lens = encoder.encode_with_lengths(batch)
        else:
            with torch.no_grad():
                emb = encoder.encode(batch)
            lens = _true_lengths(emb)
        for row, n in zip(emb.detach().cpu(), lens.tolist(), strict=True):
            rows.append(row[:n])
            lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    metadata = {
        "format": _EMBEDDINGS_FORMAT,
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "text_len": str(int(encoder.text_len)),
        "dim": str(int(encoder.dim)),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent)
    os.close(fd)
    try:
        save_file({"embeddings": torch.cat(rows).contiguous(), "offsets": offsets}, tmp, metadata=metadata)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


@dataclass
class PromptEmbeddings:
    """Prompt embeddings read by :func:`load_prompt_embeddings` (trimmed rows, zero-padded on request)."""

    prompts: list[str]
    embeddings: torch.Tensor
    """``(sum of lengths, dim)``: every prompt's rows back to back."""
    offsets: torch.Tensor
    """``(N + 1,)``: prompt i owns rows ``offsets[i]:offsets[i + 1]``."""
    text_len: int
    dim: int

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Trimmed embedding of one prompt, ``(length_i, dim)``."""
        start, stop = self.offsets[index].item(), self.offsets[index + 1].item()
        return self.embeddings[start:stop]

    def padded(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, text_len, dim)`` embeddings zero-padded as the encoder returned them (all prompts by default)."""
        indices = range(len(self)) if indices is None else indices
        out = self.embeddings.new_zeros(len(indices), self.text_len, self.dim)
        for row, i in enumerate(indices):
            emb = self[i]
            out[row, : emb.shape[0]] = emb
        return out


def load_prompt_embeddings(path: str | os.PathLike) -> PromptEmbeddings:
    """Read a file written by :func:`precompute_prompt_embeddings`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _EMBEDDINGS_FORMAT:
                raise ValueError(f"{path}: not a prompt-embeddings file (format {metadata.get('format')!r})")
            embeddings, offsets = f.get_tensor("embeddings"), f.get_tensor("offsets")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - reader errors become one line naming the file
        raise ValueError(f"cannot read prompt embeddings {path}: {type(e).__name__}: {e}") from e
    return PromptEmbeddings(
        prompts=json.loads(metadata["prompts"]),
        embeddings=embeddings,
        offsets=offsets,
        text_len=int(metadata["text_len"]),
        dim=int(metadata["dim"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. Wan VAE
# ----------------------------------------------------------------------------------------------------------------


def _count_causal_convs(module: nn.Module) -> int:
    """Feature-cache slots a Wan encoder/decoder needs: one per causal 3-D conv (diffusers' own count)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanVAEStreamDecoder(StreamDecoder):
    """Decodes Wan latents chunk by chunk, carrying the causal-conv caches between calls.

    Drives ``vae.post_quant_conv`` and ``vae.decoder(x, feat_cache=..., feat_idx=..., first_chunk=...)`` as
    diffusers' ``AutoencoderKLWan._decode`` does over a whole video, but with the cache held here instead of on the
    VAE, so several streams can decode with one VAE. Concatenating the outputs of successive :meth:`decode_chunk`
    calls equals ``WanVAECodec.decode`` of the concatenated latents to fp32 rounding: the same convolutions run on
    inputs of other lengths (``frames_per_call``) or layouts (channels-last), and oneDNN picks kernels by shape,
    thread count and CPU, so not bit for bit in general. The first latent frame yields 1 pixel frame, every later
    one ``temporal_stride`` frames.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Start a new stream (empty caches)."""
        # Slots hold the last frames of each causal conv's input (or diffusers' "Rep" marker), filled in call order.
        self._feat_cache: list[Any] = [None] * self.codec._num_decoder_convs
        self._frames_decoded = 0
        self._batch_size: int | None = None

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, f, C, h, w)`` → pixel frames ``(B, t, 3, H, W)`` in [-1, 1].

        ``t = 1 + s (f - 1)`` for the stream's first chunk and ``s f`` afterwards (``s`` = temporal stride).
        """
        codec, vae = self.codec, self.codec.vae
        if self._batch_size is not None and latents.shape[0] != self._batch_size:
            raise ValueError(f"decode_chunk: batch size changed from {self._batch_size} to {latents.shape[0]}")
        self._batch_size = latents.shape[0]
        z = codec._denormalise(latents)  # (B, C, f, h, w) in the VAE's dtype
        # post_quant_conv is a 1x1x1 causal conv (no temporal context), so applying it per chunk is exact.
        x = vae.post_quant_conv(z)
        if codec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        frames, i, f = [], 0, x.shape[2]
        while i < f:
            # The stream's first latent frame goes alone: with empty caches the decoder skips its temporal
            # upsampling convs (1 pixel frame, diffusers' "Rep" slots). Later frames may go several per call: every
            # causal conv pads from its cache and keeps the last 2 input frames, whatever the call's length.
            first = self._frames_decoded == 0
            n = 1 if first else min(codec.frames_per_call, f - i)
            frames.append(
                vae.decoder(
                    x[:, :, i : i + n],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],  # slot cursor, restarted for every call as in diffusers' _decode
                    first_chunk=first,
                )
            )
            self._frames_decoded += n
            i += n
        return codec._finish_decode(frames[0] if len(frames) == 1 else torch.cat(frames, dim=2))


class WanVAECodec:
    """Wan2.1 VAE as a ``sfvideo.nn.interfaces.VideoCodec`` (frozen; latents normalised per channel).

    Args:
        vae: a diffusers ``AutoencoderKLWan``, a folder holding one (``vae/`` subfolder of a diffusers Wan folder
            or the VAE folder itself), or a hub id (downloads; ``subfolder="vae"``).
        dtype: weight dtype (frozen, no fp32 master). ``"auto"``: bf16 on CUDA (what Self Forcing uses), fp32
            elsewhere. None keeps an instance's dtype and loads files in fp32.
        device: where the VAE runs; inputs are moved there.
        channels_last: decoder convolutions and their input in channels-last layout (NDHWC). None: on for CUDA
            (cuDNN's bf16 convolutions prefer it; not measured on a GPU yet), off elsewhere (no gain in fp32 on
            CPU; with bf16 on a CPU with AMX it pays, see docs/benchmarks.md).
        frames_per_call: latent frames per decoder call in streaming decode (after a stream's first frame, which
            always goes alone); None = 1, the whole chunk = a large number. Several per call means fewer, larger
            kernel launches but more activation memory; on CPU it measured 10-30% slower (docs/benchmarks.md),
            on a GPU it is not measured yet.

    Normalisation (Wan's): ``encode`` returns ``(mu - latents_mean) / latents_std`` with the VAE posterior mean
    ``mu``; ``decode`` inverts it. Both statistics are per-channel lists in the VAE config.
    """

    def __init__(
        self,
        vae: str | os.PathLike | nn.Module,
        *,
        dtype: torch.dtype | str | None = "auto",
        device: str | torch.device = "cpu",
        channels_last: bool | None = None,
        frames_per_call: int | None = None,
    ) -> None:
        on_cuda = torch.device(device).type == "cuda"
        if dtype == "auto":
            dtype = torch.bfloat16 if on_cuda else torch.float32
        dtype = _as_dtype(dtype)
        if frames_per_call is not None and frames_per_call <= 0:
            raise ValueError(f"WanVAECodec: frames_per_call must be positive, got {frames_per_call}")
        load_kwargs = {} if dtype is None else {"torch_dtype": dtype}
        if isinstance(vae, nn.Module):
            model = vae
        else:
            from diffusers import AutoencoderKLWan

            path = Path(vae)
            if path.is_dir():
                folder = path / "vae" if (path / "vae" / "config.json").exists() else path
                model = AutoencoderKLWan.from_pretrained(str(folder), **load_kwargs)
            elif path.exists():
                raise ValueError(f"WanVAECodec: {path} is a file; expected a diffusers VAE folder")
            else:
                model = AutoencoderKLWan.from_pretrained(str(vae), subfolder="vae", **load_kwargs)
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model.to(dtype)
        self.vae = freeze(model).to(device)
        self.channels_last = on_cuda if channels_last is None else channels_last
        """Decode in channels-last layout (decoder conv weights converted once, here)."""
        if self.channels_last:
            for m in [self.vae.post_quant_conv, *self.vae.decoder.modules()]:
                if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                    m.to(memory_format=torch.channels_last_3d if isinstance(m, nn.Conv3d) else torch.channels_last)
        self.frames_per_call = frames_per_call or 1
        """Latent frames per decoder call after a stream's first frame (at most)."""
        self._num_decoder_convs = _count_causal_convs(self.vae.decoder)
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        """Latent channels (16 for Wan2.1)."""
        # One spatial /2 per encoder stage after the first, times the optional pixel-unshuffle patch (Wan2.2).
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1) * int(cfg.get("patch_size") or 1)
        """Pixel size / latent size along H and W (8 for Wan2.1)."""
        self.temporal_stride = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"WanVAECodec: latents_mean/latents_std have {mean.numel()}/{std.numel()} entries, "
                f"z_dim is {self.latent_channels}"
            )
        # (1, C, 1, 1, 1): broadcast over diffusers' (B, C, T, H, W). Kept per device: a blocking host-to-device
        # copy per call makes the host wait for the GPU's queued work (a stall per chunk).
        self._stats_cpu = (mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1))
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents_mean, latents_std)`` as fp32 ``(1, C, 1, 1, 1)`` on ``device`` (moved once per device)."""
        if device not in self._stats_on:
            self._stats_on[device] = tuple(t.to(device) for t in self._stats_cpu)
        return self._stats_on[device]

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Pixel frames a full decode of ``num_latent_frames`` yields: ``1 + s (F - 1)`` (Wan: s = 4, 21 → 81)."""
        if num_latent_frames <= 0:
            raise ValueError(f"num_latent_frames must be positive, got {num_latent_frames}")
        return 1 + self.temporal_stride * (num_latent_frames - 1)

    def num_latent_frames(self, num_pixel_frames: int) -> int:
        """Inverse of :meth:`num_pixel_frames`; raises unless ``T = 1 + s k``."""
        if num_pixel_frames <= 0 or (num_pixel_frames - 1) % self.temporal_stride:
            raise ValueError(f"a Wan VAE video needs 1 + {self.temporal_stride}k frames, got {num_pixel_frames}")
        return 1 + (num_pixel_frames - 1) // self.temporal_stride

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] → normalised latents ``(B, F, C, h, w)`` in fp32, ``F = 1 + (T-1)/s``."""
        if video.ndim != 5:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got shape {tuple(video.shape)}")
        _, t, _, h, w = video.shape
        self.num_latent_frames(t)  # validates T
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video size {h}x{w} is not divisible by the VAE stride {self.spatial_stride}")
        x = video.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        mu = self.vae.encode(x).latent_dist.mode()  # (B, C, F, h, w): posterior mean, as Wan encodes
        mean, std = self._stats(mu.device)
        z = (mu.float() - mean) / std
        return z.permute(0, 2, 1, 3, 4).contiguous()  # (B, F, C, h, w)

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Our ``(B, F, C, h, w)`` normalised latents → the VAE's ``(B, C, F, h, w)`` raw latents, VAE dtype."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents (B, F, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(device=self.device, dtype=torch.float32).permute(0, 2, 1, 3, 4)
        mean, std = self._stats(z.device)
        return (z * std + mean).to(self.dtype)

    def _finish_decode(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, 3', T, H', W')`` → ``(B, T, 3, H, W)`` clamped to [-1, 1] (diffusers' order)."""
        patch = self.vae.config.get("patch_size")
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch)
        # in place: ``out`` is the decoder's fresh output (or a fresh concatenation of several)
        return out.clamp_(-1.0, 1.0).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, F, C, h, w)`` → ``(B, T, 3, H, W)`` in [-1, 1], ``T = num_pixel_frames(F)``."""
        out = self.vae.decode(self._denormalise(latents)).sample  # (B, 3, T, H, W), already clamped
        return out.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> WanVAEStreamDecoder:
        """A fresh streaming decoder (empty causal cache)."""
        return WanVAEStreamDecoder(self)


class PrecomputedTextEncoder:
    """A :class:`~sfvideo.nn.interfaces.TextEncoder` over embeddings written by :func:`precompute_prompt_embeddings`,
    so training need not hold the 5B umT5 encoder. Unknown prompts fail with the file named; the negative prompt
    must be in the file too (``sfvideo encode-prompts --negative_prompt ...`` adds it).

    Args:
        path: the ``.safetensors`` file written by ``sfvideo encode-prompts``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.table = load_prompt_embeddings(path)
        self.text_len = self.table.text_len
        self.dim = self.table.dim
        self._index = {p: i for i, p in enumerate(self.table.prompts)}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"{self.path}: no precomputed embedding for prompt {missing[0]!r}")
        return self.table.padded([self._index[p] for p in prompts])


def encode_prompts_main(argv: Sequence[str] | None = None) -> None:
    """``sfvideo encode-prompts``: precompute umT5 embeddings of a prompt file (plus the negative prompt)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="sfvideo encode-prompts", description=encode_prompts_main.__doc__)
    p.add_argument("--model", required=True, help="diffusers Wan folder (text_encoder/ + tokenizer/) or hub id")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--negative_prompt", default="", help="also encode this prompt (the CFG branch)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        encoder = UMT5TextEncoder(args.model, dtype=args.dtype, device=args.device)
        prompts = read_prompts(args.prompts)
        if args.negative_prompt and args.negative_prompt not in prompts:
            prompts = prompts + [args.negative_prompt]  # the CFG branch is looked up like any prompt
        with tempfile.TemporaryDirectory() as tmp:
            listing = Path(tmp) / "prompts.txt"
            listing.write_text("\n".join(prompts) + "\n", encoding="utf-8")
            precompute_prompt_embeddings(encoder, listing, args.out, args.batch_size)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"sfvideo encode-prompts: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.out}")
