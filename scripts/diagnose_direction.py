"""Does a toy teacher move its objects in the prompted direction, and does it read the direction word at all?
Results in docs/toy_teacher.md "The direction word".

    python scripts/diagnose_direction.py artifacts/toy_teacher4 --trajectories 8 --sweep "5,3;3,1.5"

Three readings (``sfvideo probe-teacher``'s text probe is the fourth: the same question on clips at one level):

1. ``mixed``: the first ``--first_frames`` latent frames of real clips (scene seeds 50000+i) nearly clean (σ
   ``--first_sigma``; 0 is the clean prefix of ``clean_prefix_fraction``) and the others at σ
   ``--rest_sigma``: the setting where the position is known and the direction is not, so a teacher
   that uses the word must change its flow when the word is swapped (``probe_teacher.swap_attribute``) and lose
   loss with the wrong one. Prints the relative change of the flow and the flow-matching loss over the noisy
   frames with the true and the swapped word.
2. ``--trajectories N``: the matched object's centroid per frame in N samples of the teacher's own sampler
   (training prompts, seed 1), with the per-step motion verdicts of ``metrics.toy``.
3. ``--sweep "SHIFT,GUIDANCE;..."``: sample metrics of 16 training prompts (seed 1, 30 steps) per sampler setting.

Raw weights for a Lightning checkpoint unless ``--ema``.
"""

from __future__ import annotations

import argparse

import torch


def mixed_reading(engine, prompts: list[str], first_sigma: float, rest_sigma: float,
                  first_frames: int = 1) -> dict[str, float]:
    from sfvideo.diffusion.schedule import add_noise, flow_target
    from sfvideo.probe_teacher import real_latents, swap_attribute

    x0 = real_latents(engine, prompts, 50_000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
    b, f = x0.shape[:2]
    sigma = torch.full((b, f), rest_sigma, device=x0.device)
    sigma[:, :first_frames] = first_sigma
    x = add_noise(x0, noise, sigma.view(b, f, 1, 1, 1))
    target = flow_target(x0, noise)
    with torch.no_grad():
        true = engine.denoiser.flow(x, sigma, engine.encode(prompts))
        swapped = engine.denoiser.flow(x, sigma, engine.encode([swap_attribute(p, "direction") for p in prompts]))

    def loss(flow: torch.Tensor) -> float:
        return float(((flow - target)[:, first_frames:] ** 2).mean())

    return {"change": float((swapped - true).norm() / true.norm()), "loss_true": loss(true),
            "loss_swapped": loss(swapped)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="export folder or Lightning checkpoint of a toy teacher")
    p.add_argument("--num_eval", type=int, default=16, help="training prompts of the mixed reading")
    p.add_argument("--first_sigma", type=float, default=0.05)
    p.add_argument("--rest_sigma", type=float, default=0.9)
    p.add_argument("--first_frames", type=int, default=1, help="latent frames at --first_sigma")
    p.add_argument("--trajectories", type=int, default=0, help="samples whose centroids are printed")
    p.add_argument("--sweep", default="", help='sampler settings "SHIFT,GUIDANCE;..." scored on 16 prompts')
    p.add_argument("--ema", action="store_true", help="a Lightning checkpoint's EMA weights")
    args = p.parse_args()

    from dataclasses import replace

    from sfvideo.checkpoints import read_checkpoint
    from sfvideo.evaluation import evaluate_toy_engine, evaluation_engine, real_toy_features, toy_eval_prompts
    from sfvideo.inference import InferenceEngine
    from sfvideo.metrics.toy import ToyVideoAnalyser
    from sfvideo.probe_teacher import EXACT

    ckpt = read_checkpoint(args.source)
    engine, _ = evaluation_engine(ckpt, use_ema=args.ema)
    r = mixed_reading(engine, toy_eval_prompts(args.num_eval, 0)["train"], args.first_sigma, args.rest_sigma,
                      args.first_frames)
    print(f"mixed (first {args.first_frames} frame(s) σ {args.first_sigma:g}, rest σ {args.rest_sigma:g}): "
          f"flow change when the direction word is swapped {r['change']:.2%}; "
          f"loss true {r['loss_true']:.4f}, swapped {r['loss_swapped']:.4f}")

    if args.trajectories:
        prompts = toy_eval_prompts(args.trajectories, 1)["train"]
        with torch.no_grad():
            video = engine.decode(engine.generate(prompts, seed=1)).clamp(-1, 1)
        analyser = ToyVideoAnalyser()
        for v, prompt in zip(video, prompts, strict=True):
            a = analyser.analyse(v, prompt)
            c = a["centroids"][:, 0]
            print(prompt)
            for axis, name in ((0, "x"), (1, "y")):
                print(f"  {name}: " + " ".join(f"{float(u):5.1f}" for u in c[:, axis]))
            print("  motion ok per step: " + "".join("-" if m != m else str(int(m)) for m in a["motion_acc"].tolist()))

    if args.sweep:
        from sfvideo.toy.features import load_feature_encoder

        prompts = toy_eval_prompts(16, 1)["train"]
        features = load_feature_encoder()
        real = real_toy_features(prompts, features)
        for item in args.sweep.split(";"):
            shift, guidance = (float(v) for v in item.split(","))
            settings = ckpt.settings
            settings = replace(settings, sampling=replace(settings.sampling, shift=shift, guidance_scale=guidance,
                                                          num_steps=30))
            eng = InferenceEngine.from_checkpoint(ckpt, settings=settings, use_ema=args.ema)
            s, _ = evaluate_toy_engine(eng, prompts, seed=1, features=features, real=real)
            print(f"shift {shift:g} guidance {guidance:g}: "
                  + "  ".join(f"{k} {s[k]:.3f}" for k in (*EXACT, "fd_ratio")))


if __name__ == "__main__":
    main()
