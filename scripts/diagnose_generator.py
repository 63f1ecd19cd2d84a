"""Toy-world metrics of one few-step generator (or teacher) per chunk, with the sampling knobs a diagnosis varies;
results in docs/demo.md "Why the distilled generators fall short".

    python scripts/diagnose_generator.py src/sfvideo/assets/toy_generator --num_eval 16 --context_noise 500

Scores ``--num_eval`` prompts of a split (``sfvideo.evaluation.toy_eval_prompts``, seed 0, the demo's draw) with
the same engine and metrics as ``sfvideo demo`` (``evaluation.evaluate_toy_engine``), then prints the per-video
metrics and, for background fidelity, shape and colour, their mean over each chunk of frames: the error
accumulation over the rollout that the clip-level figures average away. Knobs: ``--context_noise`` (timestep of
the KV-cache refresh, instead of the recorded one), ``--steps`` (a many-step sampler's step count), ``--ema``.
"""

from __future__ import annotations

import argparse
import json

import torch

CHUNK_METRICS = ("background_fidelity", "shape_acc", "colour_acc")
CLIP_METRICS = ("colour_acc", "shape_acc", "direction_acc", "motion_acc", "persistence", "background_fidelity",
                "flicker", "fd_ratio")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="export folder or Lightning checkpoint")
    p.add_argument("--num_eval", type=int, default=16, help="prompts scored")
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    p.add_argument("--context_noise", type=float, default=None, help="cache-refresh timestep (default: recorded)")
    p.add_argument("--steps", type=int, default=None, help="steps of a many-step sampler (default: recorded)")
    p.add_argument("--ema", choices=("auto", "yes", "no"), default="auto", help="EMA weights of a checkpoint")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    from sfvideo.evaluation import evaluate_toy_engine, evaluation_engine, real_toy_features, toy_eval_prompts
    from sfvideo.metrics.toy import per_video_metrics
    from sfvideo.toy.features import load_feature_encoder

    use_ema = None if args.ema == "auto" else args.ema == "yes"
    engine, used_ema = evaluation_engine(args.source, sampling_steps=args.steps, use_ema=use_ema,
                                         context_noise=args.context_noise)
    prompts = toy_eval_prompts(args.num_eval, 0)[args.split]
    features = load_feature_encoder()
    scores, video = evaluate_toy_engine(engine, prompts, seed=0, features=features,
                                        real=real_toy_features(prompts, features))
    curves = per_video_metrics(video, prompts)
    fpc = engine.settings.geometry.frames_per_chunk
    chunks = {name: [float(torch.nanmean(curves[f"{name}_curve"][:, i:i + fpc]))
                     for i in range(0, video.shape[1], fpc)] for name in CHUNK_METRICS}
    print(f"{args.source} ({args.split}, {len(prompts)} prompts, context_noise {engine.settings.context_noise:g}, "
          f"ema {used_ema})")
    print("  " + "  ".join(f"{k} {scores[k]:.3f}" for k in CLIP_METRICS if k in scores))
    for name, values in chunks.items():
        print(f"  {name} per chunk: " + " ".join(f"{v:.2f}" for v in values))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.source, "split": args.split, "prompts": prompts, "ema": used_ema,
                       "context_noise": engine.settings.context_noise, "scores": scores, "per_chunk": chunks}, f,
                      indent=2)


if __name__ == "__main__":
    main()
