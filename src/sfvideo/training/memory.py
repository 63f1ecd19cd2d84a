"""Per-GPU memory plan for Self Forcing DMD training: generator + critic (trainable) + frozen teacher.

``python -m sfvideo.training.memory`` prints, for ZeRO-2, ZeRO-3 and FSDP2, at 8 and 64 GPUs, with a 1.3B or 14B
teacher, the per-GPU bytes of every component, and the smallest setup that fits an 80 GB card.

Model (all sizes derived from the transformer config and the video geometry; 1 GB = 1e9 bytes; batch 1 per GPU
as in the official recipe). ``P`` is a parameter count, ``N`` the number of GPUs:

* Trainable networks (generator, critic): bf16 compute weights, fp32 master weights and fp32 Adam ``m``, ``v``.
  - ZeRO-2 (DeepSpeed): bf16 params ``2P`` replicated; gradients ``2P/N`` (reduce-scattered, bf16); fp32 master +
    Adam ``12P/N``.
  - ZeRO-3 (DeepSpeed): the same three terms all partitioned: ``(2 + 2 + 12)P/N``.
  - FSDP2 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``): the sharded fp32 parameter *is* the
    master: params ``4P/N``, fp32 gradients ``4P/N``, Adam ``8P/N``.
  Gradient buffers are counted for both networks (each engine keeps its own), a slight over-estimate since DMD
  never holds both gradients at once.
* EMA of the generator (fp32, :class:`~sfvideo.training.strategies.ShardedEMA`): ``4P_g`` under ZeRO-2
  (parameters are replicated), ``4P_g/N`` under ZeRO-3 / FSDP2.
* Teacher: bf16 only, ``2P_t`` replicated under ZeRO-2, ``2P_t/N`` partitioned under ZeRO-3 (optimizer-less engine)
  and FSDP2 (``shard_frozen``).
* Gathered parameters (ZeRO-3 / FSDP2): the unsharded bf16 weights of the block being computed plus one
  prefetched block of the largest network, ``2 · 2 · P_block``.
* KV cache of the rollout: K and V for every layer and every cached token in bf16,
  ``2 · L · T_cache · d · 2`` bytes, ``T_cache`` = the whole clip (21 frames × 1560 tokens) — ≈ 6 GB for 1.3B,
  matching the official code. The cross-attention cache (``2 · L · 512 · d · 2``) is added.
* Activations kept for backward, per token and per block, in bf16 elements (flash attention: no ``T²`` term):
  self-attention ``6d`` (block input, modulated norm output, q, k, v, attention output), cross-attention ``4d``
  (norm output, q, attention output, residual), FFN ``d + 2f`` (input, pre- and post-GELU), gates ``2d``:
  ``a = 12d + 2f`` elements (an estimate, ±30 %; the fp32 islands add a little). The generator trains on one
  grad-enabled forward per chunk over the whole clip (the exit step), so ``T = 21 × 1560`` tokens; the critic's
  update is one forward on the same clip. Generator and critic updates alternate, so the peak is the larger one:
  - no checkpointing: ``2 · a · T · L`` bytes;
  - per-block (non-reentrant) checkpointing: block inputs ``2 · d · T · L`` plus one block recomputed at a
    time, ``2 · a · T_chunk`` for the generator (one chunk per forward) or ``2 · a · T`` for the critic.
* No-grad forwards of the teacher and critic (DMD loss, CFG doubles the batch): transient, one block at a time,
  ``2 · 2 · (4d + f) · T`` bytes for the largest frozen/critic network; counted in the activation column peak.
* Fixed overhead: CUDA context, NCCL and ZeRO buckets, allocator fragmentation: 4 GB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sfvideo.geometry import VideoGeometry
from sfvideo.nn.wan import FLAVORS

Strategy = Literal["zero2", "zero3", "fsdp2"]
STRATEGIES: tuple[Strategy, ...] = ("zero2", "zero3", "fsdp2")
GB = 1e9
BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class TransformerSize:
    """The numbers of a Wan2.1 transformer that decide its memory (diffusers ``WanTransformer3DModel`` names).

    Built from a transformer config with :meth:`from_config` (``SIZES`` from ``sfvideo.nn.wan.FLAVORS``).
    """

    name: str
    dim: int
    """Hidden size ``d`` (num_attention_heads × attention_head_dim)."""
    num_layers: int
    """Transformer blocks ``L``."""
    ffn_dim: int
    """FFN hidden size ``f``."""
    text_dim: int
    """Text embedding size (umT5: 4096)."""
    freq_dim: int
    """Sinusoidal timestep embedding size."""
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    """Text tokens in the cross-attention cache (umT5's padded length in Wan)."""

    @classmethod
    def from_config(cls, name: str, config: dict) -> TransformerSize:
        """The sizes of a ``WanTransformer`` config (constructor arguments)."""
        return cls(
            name=name,
            dim=config["num_attention_heads"] * config["attention_head_dim"],
            num_layers=config["num_layers"],
            ffn_dim=config["ffn_dim"],
            text_dim=config["text_dim"],
            freq_dim=config["freq_dim"],
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        )

    @property
    def block_params(self) -> int:
        """Parameters of one block: self- and cross-attention (q, k, v, o with biases; q/k RMSNorms), the affine
        cross-attention LayerNorm, the FFN and the 6·d modulation table: ``8d² + 2df + 21d + f``."""
        d, f = self.dim, self.ffn_dim
        attention = 2 * (4 * (d * d + d) + 2 * d)
        return attention + 2 * d + (d * f + f + f * d + d) + 6 * d

    @property
    def num_params(self) -> int:
        """All parameters: blocks, patch embedding, text and time embeddings, time projection and head."""
        d, p = self.dim, self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        patch = self.in_channels * p * d + d
        text = self.text_dim * d + d + d * d + d
        time = self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
        head = d * self.out_channels * p + self.out_channels * p + 2 * d
        return self.num_layers * self.block_params + patch + text + time + head

    @property
    def activation_elements_per_token(self) -> int:
        """bf16 elements kept for backward per token per block: ``12d + 2f`` (see the module docstring)."""
        return 12 * self.dim + 2 * self.ffn_dim


SIZES: dict[str, TransformerSize] = {name: TransformerSize.from_config(name, FLAVORS[name]) for name in ("1.3B", "14B")}


@dataclass(frozen=True)
class Setup:
    """One training configuration to size."""

    strategy: Strategy
    num_gpus: int
    generator: TransformerSize
    critic: TransformerSize
    teacher: TransformerSize
    geometry: VideoGeometry = VideoGeometry()
    checkpointing: bool = True
    """Per-block activation checkpointing of the trainable networks."""
    overhead_gb: float = 4.0


def kv_cache_bytes(model: TransformerSize, geometry: VideoGeometry) -> int:
    """Self-attention K/V for the whole clip plus the cross-attention K/V of the prompt, bf16."""
    self_attn = 2 * model.num_layers * geometry.seq_len * model.dim * BF16
    cross_attn = 2 * model.num_layers * model.text_len * model.dim * BF16
    return self_attn + cross_attn


def activation_bytes(model: TransformerSize, tokens: int, *, checkpointing: bool, tokens_per_forward: int) -> int:
    """Activations kept for one backward over ``tokens`` tokens, produced by forwards of ``tokens_per_forward``."""
    per_token_block = model.activation_elements_per_token * BF16
    if not checkpointing:
        return per_token_block * tokens * model.num_layers
    block_inputs = model.dim * BF16 * tokens * model.num_layers
    return block_inputs + per_token_block * tokens_per_forward


def plan(setup: Setup) -> dict[str, float]:
    """Per-GPU bytes by component, and ``total``."""
    n, s = setup.num_gpus, setup.strategy
    g, c, t, geo = setup.generator, setup.critic, setup.teacher, setup.geometry
    trainable = g.num_params + c.num_params
    if s == "zero2":
        params, grads, optim = BF16 * trainable, BF16 * trainable / n, (FP32 + 2 * FP32) * trainable / n
        ema, teacher, gathered = FP32 * g.num_params, BF16 * t.num_params, 0.0
    elif s == "zero3":
        params, grads, optim = BF16 * trainable / n, BF16 * trainable / n, (FP32 + 2 * FP32) * trainable / n
        ema, teacher = FP32 * g.num_params / n, BF16 * t.num_params / n
        gathered = 2 * BF16 * max(m.block_params for m in (g, c, t))
    elif s == "fsdp2":
        params, grads, optim = FP32 * trainable / n, FP32 * trainable / n, 2 * FP32 * trainable / n
        ema, teacher = FP32 * g.num_params / n, BF16 * t.num_params / n
        gathered = 2 * BF16 * max(m.block_params for m in (g, c, t))
    else:
        raise ValueError(f"plan: strategy must be one of {STRATEGIES}, got {s!r}")
    tokens = geo.seq_len
    chunk_tokens = geo.frames_per_chunk * geo.tokens_per_frame
    generator_act = activation_bytes(g, tokens, checkpointing=setup.checkpointing, tokens_per_forward=chunk_tokens)
    critic_act = activation_bytes(c, tokens, checkpointing=setup.checkpointing, tokens_per_forward=tokens)
    # No-grad teacher/critic forwards for the DMD loss (cond + uncond): one block's working set at a time.
    no_grad_transient = max(2 * BF16 * (4 * m.dim + m.ffn_dim) * tokens for m in (t, c))
    activations = max(generator_act, critic_act, no_grad_transient)
    parts = {
        "params": params,
        "grads": grads,
        "optimizer": optim,
        "ema": ema,
        "teacher": teacher,
        "gathered": gathered,
        "kv_cache": float(kv_cache_bytes(g, geo)),
        "activations": float(activations),
        "overhead": setup.overhead_gb * GB,
    }
    parts["total"] = sum(parts.values())
    return parts


def fits(setup: Setup, capacity_gb: float = 80.0) -> bool:
    return plan(setup).get("total", 0.0) <= capacity_gb * GB


def smallest_fitting(
    teacher: TransformerSize,
    *,
    capacity_gb: float = 80.0,
    gpu_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    geometry: VideoGeometry = VideoGeometry(),
) -> Setup | None:
    """Fewest GPUs first; at equal count prefer ZeRO-2 (fewest collectives), then FSDP2, then ZeRO-3, and no
    checkpointing over checkpointing (no recompute)."""
    generator = critic = SIZES["1.3B"]
    for n in gpu_counts:
        for checkpointing in (False, True):
            for strategy in ("zero2", "fsdp2", "zero3"):
                setup = Setup(strategy, n, generator, critic, teacher, geometry, checkpointing)
                if fits(setup, capacity_gb):
                    return setup
    return None


def format_table(setups: Iterable[Setup], capacity_gb: float = 80.0) -> str:
    cols = ["params", "grads", "optimizer", "ema", "teacher", "gathered", "kv_cache", "activations", "total"]
    header = f"{'teacher':>7} {'strategy':>8} {'gpus':>4} {'ckpt':>4} " + " ".join(f"{c:>11}" for c in cols)
    lines = [header, "-" * len(header)]
    for setup in setups:
        p = plan(setup)
        cells = " ".join(f"{p[c] / GB:11.1f}" for c in cols)
        mark = "fits" if p["total"] <= capacity_gb * GB else "OOM"
        ckpt = "yes" if setup.checkpointing else "no"
        lines.append(f"{setup.teacher.name:>7} {setup.strategy:>8} {setup.num_gpus:>4} {ckpt:>4} {cells}  {mark}")
    return "\n".join(lines)


PROG = "sfvideo memory"


def network_size(source: str, key: str, config_file: str, fallback: TransformerSize | None = None) -> TransformerSize:
    """The size of a network named in a training config: a flavor (``1.3B``, ``14B``, ``debug``, ...), a model
    folder with ``config.json``, or a path naming a Wan size (``.../Wan2.1-T2V-14B-Diffusers/transformer``)."""
    import json
    from pathlib import Path

    from sfvideo.errors import fail
    from sfvideo.training.networks import asset_path

    if source in FLAVORS:
        return TransformerSize.from_config(source, FLAVORS[source])
    folder = asset_path(source) or Path(source)
    if (folder / "config.json").is_file():
        try:
            return TransformerSize.from_config(folder.name, json.loads((folder / "config.json").read_text()))
        except (ValueError, KeyError) as e:
            fail(PROG, f"--config {config_file}: {key} {source}: config.json is not a Wan transformer config ({e})")
    for name in sorted(SIZES, key=len, reverse=True):
        if f"-{name}" in source or source.endswith(name):
            return SIZES[name]
    if fallback is not None:  # a weights file (an ODE-initialised .pt) keeps the architecture it starts from
        return fallback
    fail(PROG, f"--config {config_file}: {key} {source!r} is neither a flavor ({', '.join(FLAVORS)}), a model "
               "folder with config.json, nor a path naming a Wan size (1.3B, 14B)")


def setups_of_config(path: str, gpu_counts: Sequence[int]) -> tuple[list[Setup], TransformerSize, VideoGeometry]:
    """The setups to size for a training config: its teacher, generator and critic, its geometry and
    activation checkpointing, under every strategy and GPU count."""
    import yaml

    from sfvideo.errors import fail

    try:
        data = yaml.safe_load(open(path, encoding="utf-8"))
    except FileNotFoundError:
        fail(PROG, f"--config {path}: no such file")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        fail(PROG, f"--config {path}: not a YAML config ({type(e).__name__})")
    init = ((data or {}).get("model") or {}).get("init_args") if isinstance(data, dict) else None
    if not isinstance(init, dict) or "teacher" not in init:
        fail(PROG, f"--config {path}: no model.init_args.teacher (a distillation config, e.g. configs/dmd.yaml)")
    teacher = network_size(str(init["teacher"]), "model.init_args.teacher", path)
    critic = network_size(str(init["critic_init"]), "model.init_args.critic_init", path) \
        if init.get("critic_init") else teacher
    # The generator is trained against the critic: a file it starts from has the critic's size (the official
    # recipes: an ODE-initialised 1.3B generator, a 1.3B critic).
    generator = network_size(str(init["generator_init"]), "model.init_args.generator_init", path, fallback=critic) \
        if init.get("generator_init") else teacher
    try:
        geometry = VideoGeometry(**(init.get("geometry") or {}))
    except (TypeError, ValueError) as e:
        fail(PROG, f"--config {path}: model.init_args.geometry: {e}")
    checkpointing = bool(init.get("gradient_checkpointing", False))
    setups = [Setup(strategy, n, generator, critic, teacher, geometry, checkpointing)
              for strategy in STRATEGIES for n in gpu_counts]
    return setups, teacher, geometry


def main(argv: Sequence[str] | None = None) -> None:
    from sfvideo.errors import ArgParser, fail

    parser = ArgParser(prog=PROG, description="Per-GPU memory plan (GB = 1e9 bytes) for Self Forcing DMD.")
    parser.add_argument("--config", default=None,
                        help="a distillation config (configs/dmd.yaml): size its teacher, generator, critic, geometry "
                             "and activation checkpointing instead of the Wan2.1 1.3B/14B table")
    parser.add_argument("--capacity_gb", type=float, default=80.0, help="usable memory per GPU (GB, positive)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="GPU counts for the table (positive)")
    parser.add_argument("--teachers", nargs="+", default=["1.3B", "14B"], choices=sorted(SIZES))
    args = parser.parse_args(argv)
    if args.capacity_gb <= 0:
        fail(PROG, f"--capacity_gb must be positive, got {args.capacity_gb:g}")
    bad = [n for n in args.gpus if n < 1]
    if bad:
        fail(PROG, f"--gpus must be positive GPU counts, got {' '.join(map(str, args.gpus))}")
    if args.config is not None:
        setups, teacher, geometry = setups_of_config(args.config, args.gpus)
        print(f"{args.config}: teacher {teacher.name}, generator {setups[0].generator.name}, critic "
              f"{setups[0].critic.name}; clip {geometry.num_frames} latent frames x {geometry.tokens_per_frame} "
              f"tokens, chunks of {geometry.frames_per_chunk}; batch 1 per GPU; GB per GPU")
        print(format_table(setups, args.capacity_gb))
        return
    generator = critic = SIZES["1.3B"]
    geometry = VideoGeometry()
    print(
        f"generator {generator.name} ({generator.num_params / 1e9:.2f}B params) + critic {critic.name}; "
        f"clip {geometry.num_frames} latent frames x {geometry.tokens_per_frame} tokens = {geometry.seq_len} tokens, "
        f"chunks of {geometry.frames_per_chunk} frames; batch 1 per GPU; GB per GPU"
    )
    setups = [
        Setup(strategy, n, generator, critic, SIZES[name], geometry, checkpointing)
        for name in args.teachers
        for strategy in STRATEGIES
        for n in args.gpus
        for checkpointing in (False, True)
    ]
    print(format_table(setups, args.capacity_gb))
    print()
    for name in args.teachers:
        best = smallest_fitting(SIZES[name], capacity_gb=args.capacity_gb, geometry=geometry)
        if best is None:
            print(f"teacher {name}: nothing up to 64 GPUs fits {args.capacity_gb:.0f} GB")
            continue
        total = plan(best)["total"] / GB
        gpus = f"{best.num_gpus} GPU{'s' if best.num_gpus > 1 else ''}"
        print(
            f"teacher {name}: smallest fit on {args.capacity_gb:.0f} GB cards: {best.strategy} on {gpus}, "
            f"checkpointing {'on' if best.checkpointing else 'off'} ({total:.1f} GB per GPU)"
        )


if __name__ == "__main__":
    main()
