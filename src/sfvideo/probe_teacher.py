"""``sfvideo probe-teacher``: how far a toy-world teacher has learned its world (docs/toy_teacher.md).

Three readings of one checkpoint (a Lightning checkpoint of ``configs/toy/teacher.yaml`` or an exported folder):

1. **samples**: the exact toy metrics and FD/real of videos from the teacher's own sampler (its recorded steps,
   shift and guidance), on training and held-out prompts — the numbers the shipped teacher is held to;
2. **one-step probe**: a real clip noised to ``sigma`` and denoised in one step; the exact metrics of that clean
   estimate per ``sigma``. High noise is where layout and motion are decided, and this reading moves long before
   the sample metrics do;
3. **order probe**: the flow-matching loss on real clips in order and with their frames shuffled (same noise).
   A model that uses the order of frames has a clearly lower in-order loss; one that pools frames does not;
4. **context probe**: how much the estimate of one frame gains from the other frames of its clip: its error
   against the truth with the clip's own (equally noisy) frames around it, with the frames of another scene of the
   same prompt around it, and alone. A model that generates frames independently has equal errors; one whose
   samples keep one object on one path must do clearly better with its own context at high noise;
5. **text probe**: how much the flow prediction on real clips changes when one attribute word of the prompt
   (colour, shape, direction, background) is replaced by another of its kind. A word the model ignores scores ~0:
   every toy teacher up to candidate 4 ignores the direction word (docs/toy_teacher.md "The direction word"),
   which is why their samples move in a direction of their own.

Writes a JSON with all readings (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from sfvideo.diffusion.schedule import add_noise, flow_target
from sfvideo.files import AtomicFile

EXACT = ("colour_acc", "shape_acc", "direction_acc", "motion_acc", "persistence", "background_fidelity")


def real_latents(engine: Any, prompts: list[str], first_seed: int) -> torch.Tensor:
    """Latents of real clips of ``prompts`` (scene seeds ``first_seed + i``) on the engine's device and dtype."""
    from sfvideo.toy.world import render_batch

    real = render_batch(prompts, [first_seed + i for i in range(len(prompts))])
    return engine.decoder.encode(real).to(device=engine.device, dtype=engine.dtype)


def one_step_probe(engine: Any, prompts: list[str], sigmas: list[float], *, seed: int) -> dict[str, dict[str, float]]:
    """Exact metrics of ``x0 = D(x_sigma)`` from real clips (scene seeds 30000+i), one entry per ``sigma``."""
    from sfvideo.evaluation import score_toy_videos

    x0 = real_latents(engine, prompts, 30_000)
    cond = engine.encode(prompts)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=engine.device, dtype=x0.dtype)
    out = {}
    with torch.no_grad():
        for sigma in sigmas:
            est = engine.denoiser(add_noise(x0, noise, sigma), sigma, cond)
            video = engine.decode(est).clamp(-1, 1)
            scores = score_toy_videos(video, prompts)
            out[f"{sigma:g}"] = {k: float(scores[k]) for k in EXACT if k in scores}
    return out


def order_probe(engine: Any, prompts: list[str], sigmas: list[float], *, seed: int) -> dict[str, float]:
    """Flow-matching MSE on real clips in order and with frames shuffled (one permutation, same noise), averaged
    over ``sigmas``; ``gap = shuffled / ordered - 1``."""
    x0 = real_latents(engine, prompts, 40_000)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    perm = torch.randperm(x0.shape[1], generator=g, device=engine.device)
    noise = torch.randn(x0.shape, generator=g, device=engine.device, dtype=x0.dtype)
    cond = engine.encode(prompts)
    losses = {"ordered": 0.0, "shuffled": 0.0}
    with torch.no_grad():
        for sigma in sigmas:
            for name, clip in (("ordered", x0), ("shuffled", x0[:, perm])):
                flow = engine.denoiser.flow(add_noise(clip, noise, sigma), sigma, cond)
                losses[name] += float(((flow - flow_target(clip, noise)) ** 2).mean()) / len(sigmas)
    losses["gap"] = losses["shuffled"] / losses["ordered"] - 1.0
    return losses


def context_probe(engine: Any, prompts: list[str], sigmas: list[float], *, seed: int) -> dict[str, dict[str, float]]:
    """Relative L2 error of the one-step estimate of the middle frame of real clips (scene seeds 30000+i) against
    the clean frame, per ``sigma``: ``own`` (the clip's other frames as context), ``other`` (the other frames of a
    second scene of the same prompt, seeds 50000+i, noised alike) and ``alone`` (a one-frame clip); ``gain =
    other / own - 1`` (0: the context is ignored)."""
    own, other = real_latents(engine, prompts, 30_000), real_latents(engine, prompts, 50_000)
    k = own.shape[1] // 2
    cond = engine.encode(prompts)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    noise = torch.randn(own.shape, generator=g, device=engine.device, dtype=own.dtype)
    noise_other = torch.randn(own.shape, generator=g, device=engine.device, dtype=own.dtype)
    truth = own[:, k]

    def error(est: torch.Tensor) -> float:
        return float((est - truth).norm() / truth.norm())

    out = {}
    with torch.no_grad():
        for sigma in sigmas:
            x = add_noise(own, noise, sigma)
            y = add_noise(other, noise_other, sigma)
            y[:, k] = x[:, k]  # same noisy frame k, foreign context
            r = {"own": error(engine.denoiser(x, sigma, cond)[:, k]),
                 "other": error(engine.denoiser(y, sigma, cond)[:, k]),
                 "alone": error(engine.denoiser(x[:, k : k + 1], sigma, cond)[:, 0])}
            r["gain"] = r["other"] / r["own"] - 1.0
            out[f"{sigma:g}"] = r
    return out


def check_scores(engine: Any, *, num_eval: int, seed: int, features: Any = None) -> dict[str, float]:
    """The sample scores of a small, cheap evaluation on training prompts (recorded in the report as ``check``
    so that a test can re-run it on the shipped checkpoint and compare)."""
    from sfvideo.evaluation import evaluate_toy_engine, real_toy_features, toy_eval_prompts
    from sfvideo.toy.features import load_feature_encoder

    features = features if features is not None else load_feature_encoder()
    prompts = toy_eval_prompts(num_eval, seed)["train"]
    scores, _ = evaluate_toy_engine(engine, prompts, seed=seed, features=features,
                                    real=real_toy_features(prompts, features))
    scores.pop("seconds_per_video")
    return scores


ATTRIBUTES = ("colour", "shape", "direction", "background")


def swap_attribute(prompt: str, kind: str) -> str:
    """``prompt`` with attribute ``kind`` of every object replaced by the next value of its kind (vocabulary order,
    cyclic); two objects' colours move together, so they stay distinct."""
    from dataclasses import replace

    from sfvideo.toy.world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, parse_prompt, prompt_for

    values = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS),
              "background": list(BACKGROUNDS)}[kind]

    def nxt(v: str) -> str:
        return values[(values.index(v) + 1) % len(values)]

    attrs = parse_prompt(prompt)
    if kind == "background":
        return prompt_for(replace(attrs, background=nxt(attrs.background)))
    return prompt_for(replace(attrs, objects=tuple(replace(o, **{kind: nxt(getattr(o, kind))}) for o in attrs.objects)))


def text_probe(engine: Any, prompts: list[str], sigmas: list[float], *, seed: int) -> dict[str, dict[str, float]]:
    """Relative L2 change of the flow prediction on real clips (scene seeds 50000+i) noised to each ``sigma`` when
    one attribute word of every prompt is swapped (:func:`swap_attribute`): ``{sigma: {attribute: change}}``.
    0 = the word is ignored."""
    x0 = real_latents(engine, prompts, 50_000)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=engine.device, dtype=x0.dtype)
    cond = engine.encode(prompts)
    out = {}
    with torch.no_grad():
        for sigma in sigmas:
            x = add_noise(x0, noise, sigma)
            base = engine.denoiser.flow(x, sigma, cond)
            out[f"{sigma:g}"] = {
                kind: float((engine.denoiser.flow(x, sigma, engine.encode([swap_attribute(p, kind) for p in prompts]))
                             - base).norm() / base.norm())
                for kind in ATTRIBUTES
            }
    return out


def probe(ckpt: Any, *, num_eval: int, steps: int | None, use_ema: bool | None, seed: int,
          sigmas: list[float], check: tuple[int, int] | None = None, samples: bool = True,
          guidance_scale: float | None = None) -> dict[str, Any]:
    """Every reading of one teacher (a ``checkpoints.Checkpoint``); ``check = (N, STEPS)`` adds the small
    evaluation the shipped teacher's test re-runs; ``samples=False`` skips the sampled videos (the slow part:
    the probes alone are the early signals to read during training); ``guidance_scale`` replaces the recorded
    one in the sampled videos (in the recorded convention)."""
    from sfvideo.evaluation import evaluate_toy_engine, evaluation_engine, real_toy_features, toy_eval_prompts
    from sfvideo.toy.features import load_feature_encoder

    engine, use_ema = evaluation_engine(ckpt, sampling_steps=steps, use_ema=use_ema, guidance_scale=guidance_scale)
    settings = engine.settings
    features = load_feature_encoder()
    report: dict[str, Any] = {"checkpoint": str(ckpt.path), "ema": use_ema, "num_steps": settings.sampling.num_steps,
                              "guidance_scale": settings.sampling.guidance_scale, "samples": {}}
    splits = toy_eval_prompts(num_eval, seed)
    for split, prompts in splits.items() if samples else ():
        scores, _ = evaluate_toy_engine(engine, prompts, seed=seed, features=features,
                                        real=real_toy_features(prompts, features))
        report["samples"][split] = scores
    report["one_step"] = one_step_probe(engine, splits["train"], sigmas, seed=seed)
    report["order"] = order_probe(engine, splits["train"], sigmas, seed=seed)
    report["context"] = context_probe(engine, splits["train"], sigmas, seed=seed)
    report["text"] = text_probe(engine, splits["train"], sigmas, seed=seed)
    if check is not None:
        n, k = check
        small, _ = evaluation_engine(ckpt, sampling_steps=k, use_ema=use_ema)  # a second engine, same weights
        report["check"] = {"num_eval": n, "num_steps": k, "seed": seed,
                           "train": check_scores(small, num_eval=n, seed=seed, features=features)}
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from sfvideo.evaluation import METRIC_LABELS

    table = Table(title=f"{report['checkpoint']} ({report['num_steps']} steps, guidance {report['guidance_scale']:g}"
                        f"{', EMA' if report['ema'] else ''})")
    table.add_column("reading")
    for k in (*EXACT, "fd_ratio"):
        table.add_column(METRIC_LABELS[k], justify="right")
    for split, s in report["samples"].items():
        table.add_row(f"samples, {split}", *[f"{s[k]:.3f}" for k in (*EXACT, "fd_ratio")])
    for sigma, s in report["one_step"].items():
        table.add_row(f"one step from σ {sigma}", *[f"{s.get(k, float('nan')):.3f}" for k in EXACT], "–")
    Console(width=160).print(table)
    o = report["order"]
    print(f"order probe: ordered {o['ordered']:.4f}  shuffled {o['shuffled']:.4f}  gap {o['gap']:+.1%}")
    for sigma, c in report["context"].items():
        print(f"context probe at σ {sigma}: error of the middle frame with its own context {c['own']:.3f}, "
              f"another scene's {c['other']:.3f}, alone {c['alone']:.3f}  (gain {c['gain']:+.1%})")
    for sigma, t in report.get("text", {}).items():
        print(f"text probe at σ {sigma}: change of the flow when a word is swapped: "
              + ", ".join(f"{k} {v:.2%}" for k, v in t.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sfvideo probe-teacher", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="a Lightning checkpoint of a teacher run or an exported teacher folder")
    p.add_argument("--num_eval", type=int, default=16, help="prompts per split (train / held-out)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recorded ones)")
    p.add_argument("--no_ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance of the sampled videos (default: the recorded one, in its convention)")
    p.add_argument("--sigmas", default="0.5,0.7,0.85", help="noise levels of the probes, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_samples", action="store_true",
                   help="only the one-step, order, context and text probes (seconds instead of minutes)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--check", default=None, metavar="N,STEPS",
                   help="also record a small evaluation (N training prompts, STEPS sampler steps) that a test "
                        "re-runs on the shipped checkpoint (tests/toy/test_toy_teacher.py)")
    args = p.parse_args(argv)
    if args.num_eval <= 0:
        raise SystemExit(f"sfvideo probe-teacher: --num_eval must be positive, got {args.num_eval}")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise SystemExit(f"sfvideo probe-teacher: --sigmas must be numbers separated by commas, got {args.sigmas!r}")
    if not all(0 < s <= 1 for s in sigmas):
        raise SystemExit(f"sfvideo probe-teacher: --sigmas must lie in (0, 1], got {args.sigmas}")
    check = None
    if args.check:
        try:
            n, k = (int(v) for v in args.check.split(","))
        except ValueError:
            raise SystemExit(f"sfvideo probe-teacher: --check must be N,STEPS (two integers), got {args.check!r}")
        if n <= 0 or k <= 0:
            raise SystemExit(f"sfvideo probe-teacher: --check needs positive N and STEPS, got {args.check}")
        check = (n, k)
    from sfvideo.checkpoints import read_checkpoint

    report = probe(read_checkpoint(args.checkpoint), use_ema=False if args.no_ema else None,
                   num_eval=args.num_eval, steps=args.steps, seed=args.seed, sigmas=sigmas, check=check,
                   samples=not args.no_samples, guidance_scale=args.guidance_scale)
    print_report(report)
    if args.json:
        with AtomicFile(args.json, make_parents=True) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
