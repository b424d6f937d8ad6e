"""Choose ShapesWorld's fixed training prompts the way DDPO chose its 45 animals: a small shipped set
on which the base model is neither always right nor always wrong, so that a policy has something to
learn and per-prompt statistics fill within minutes.

    python benchmarks/select_prompts.py [--candidates 192] [--images 16] [--keep 16]
        [--out t2i_rl/assets/prompts/shapes-16.txt] [--report docs/results/prompt_selection.md]

Draws `--candidates` prompts of the training split (five of six two-object, the rest one object
counted two to four), samples `--images` base-model images of each with the environment's default
sampler (10 DDIM steps, guidance 5, eta 1, seed 1234), and keeps the `--keep` prompts whose
all-correct rate is nearest 0.5 among those within [0.2, 0.8] (ties: the candidate order). The
report lists every candidate's rate. The rates of the kept prompts are biased low or high by the
selection itself; the training runs measure their base rate again on other noise at epoch 0.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch


def candidates(n: int, seed: int) -> list[str]:
    from t2i_rl.world.grammar import split_scenes

    single, double = split_scenes("train")
    counted = [s for s in single if s.groups[0].count >= 2]
    rng = random.Random(seed)
    n_single = n // 6
    picks = rng.sample(list(double), n - n_single) + rng.sample(counted, n_single)
    return [s.text() for s in picks]


@torch.no_grad()
def base_rates(prompts: list[str], images: int, batch: int, seed: int) -> list[float]:
    """Each prompt's all-correct rate over `images` base-model samples (the judge is the reward here)."""
    from envs import DenoiseVectorEnv

    env = DenoiseVectorEnv(num_envs=batch, prompts=prompts, num_steps=10, guidance_scale=5.0, eta=1.0,
                           reward="gold", gold=None)
    policy = env.policy()
    generator = torch.Generator().manual_seed(seed)
    env.reset(seed=seed)
    repeated = [p for p in prompts for _ in range(images)]
    correct: list[float] = []
    for start in range(0, len(repeated), batch):
        obs, _ = env.reset(options={"prompts": repeated[start:start + batch]})
        for i in range(policy.num_steps):
            action, _ = policy.sample_step(obs["latents"], i, obs["prompt_embeds"], generator=generator)
            obs, _, _, _, info = env.step(action)
        correct += info["reward/gold/correct"].tolist()
        print(f"{start + batch}/{len(repeated)} images", file=sys.stderr, flush=True)
    return [sum(correct[i * images:(i + 1) * images]) / images for i in range(len(prompts))]


def select(prompts: list[str], rates: list[float], keep: int, low: float = 0.2, high: float = 0.8) -> list[str]:
    """The `keep` prompts with rates in [low, high] nearest 0.5 (stable for ties)."""
    inside = [i for i, r in enumerate(rates) if low <= r <= high]
    if len(inside) < keep:
        raise ValueError(f"only {len(inside)} candidates have a base rate in [{low}, {high}]; need {keep}: "
                         "draw more --candidates")
    chosen = sorted(sorted(inside, key=lambda i: abs(rates[i] - 0.5))[:keep])
    return [prompts[i] for i in chosen]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=192)
    p.add_argument("--images", type=int, default=16, help="base-model images per candidate")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=Path("t2i_rl/assets/prompts/shapes-16.txt"))
    p.add_argument("--report", type=Path, default=Path("docs/results/prompt_selection.md"))
    args = p.parse_args(argv)
    if args.batch % args.images and args.images % args.batch:
        p.error("--batch and --images must divide one another")
    prompts = candidates(args.candidates, args.seed)
    rates = base_rates(prompts, args.images, args.batch, args.seed)
    kept = select(prompts, rates, args.keep)
    args.out.write_text("# ShapesWorld's fixed training prompts (benchmarks/select_prompts.py; "
                        f"base-model all-correct rate in [0.2, 0.8] over {args.images} images each)\n"
                        + "".join(k + "\n" for k in kept))
    rows = "\n".join(f"| {p} | {r:.2f} | {'kept' if p in kept else ''} |" for p, r in zip(prompts, rates))
    mean_kept = sum(r for p, r in zip(prompts, rates) if p in kept) / len(kept)
    args.report.write_text(
        f"# Fixed training prompts: the base model's rate per candidate\n\n"
        f"Command: `python benchmarks/select_prompts.py --candidates {args.candidates} --images {args.images} "
        f"--keep {args.keep}` (10 DDIM steps, guidance 5, eta 1, seed {args.seed}). Kept: {len(kept)} prompts, "
        f"mean rate {mean_kept:.3f} on these selection samples; over all candidates {sum(rates) / len(rates):.3f}.\n\n"
        f"| prompt | all-correct rate | |\n|---|---:|---|\n{rows}\n")
    print(f"kept {len(kept)} prompts -> {args.out}; report -> {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
