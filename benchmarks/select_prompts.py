"""Choose ShapesWorld's fixed training prompts the way DDPO chose its 45 animals: a small shipped set
on which the base model is neither always right nor always wrong, and on which the proxy can tell
right from wrong, so that a policy that climbs the proxy has gold to gain.

    python benchmarks/select_prompts.py [--candidates 256] [--images 16] [--keep 16]
        [--name shapes-agree-16] [--samples docs/results/prompt_selection.json]
        [--report docs/results/prompt_selection.md]

Draws `--candidates` prompts of the training split (five of six two-object, the rest one object
counted two to four), samples `--images` base-model images of each with the environment's default
sampler (10 DDIM steps, guidance 5, eta 1, seed 1234), judges them and scores them with the default
proxy (TextNorm over the CLIP-style model). It keeps, among the prompts whose all-correct rate over
the judge's sure images is within [0.2, 0.8], the `--keep` on which the proxy agrees most with the
judge: the highest AUROC of the proxy for correct against wrong images of the same prompt. That is
what a policy-gradient agent learns from: group-relative advantages rank images of one prompt, and
a prompt whose proxy ranks wrong images first teaches the wrong thing. The report lists every
candidate. The kept prompts' rates and agreements are biased by the selection itself; the training
runs measure the base rate again on other noise at epoch 0.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from t2i_rl.prompts import PROMPT_ASSETS


def candidates(n: int, seed: int) -> list[str]:
    from t2i_rl.world.grammar import split_scenes

    single, double = split_scenes("train")
    counted = [s for s in single if s.groups[0].count >= 2]
    rng = random.Random(seed)
    n_single = n // 6
    picks = rng.sample(list(double), n - n_single) + rng.sample(counted, n_single)
    return [s.text() for s in picks]


@dataclass
class Candidate:
    """One candidate prompt's base-model samples: gold verdicts and the proxy's scores."""

    prompt: str
    correct: list[bool]
    unsure: list[bool]
    proxy: list[float]

    @property
    def sure(self) -> int:
        return sum(not u for u in self.unsure)

    @property
    def rate(self) -> float:
        """All-correct over the images the judge is sure of (nan with none)."""
        sure = [c for c, u in zip(self.correct, self.unsure) if not u]
        return sum(sure) / len(sure) if sure else float("nan")

    @property
    def agreement(self) -> float:
        """The proxy's AUROC within the prompt: the chance that a sure-correct image outscores a
        sure-wrong one (ties count half); nan without both kinds."""
        right = [p for p, c, u in zip(self.proxy, self.correct, self.unsure) if c and not u]
        wrong = [p for p, c, u in zip(self.proxy, self.correct, self.unsure) if not c and not u]
        if not right or not wrong:
            return float("nan")
        wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
        return wins / (len(right) * len(wrong))


@torch.no_grad()
def base_samples(prompts: list[str], images: int, batch: int, seed: int, reward: dict) -> list[Candidate]:
    """`images` base-model samples of each prompt, judged and scored by `reward` (the proxy)."""
    from envs import DenoiseVectorEnv

    env = DenoiseVectorEnv(num_envs=batch, prompts=prompts, num_steps=10, guidance_scale=5.0, eta=1.0,
                           reward=reward, gold="gold")
    policy = env.policy()
    generator = torch.Generator().manual_seed(seed)
    env.reset(seed=seed)
    repeated = [p for p in prompts for _ in range(images)]
    correct: list[bool] = []
    unsure: list[bool] = []
    proxy: list[float] = []
    for start in range(0, len(repeated), batch):
        obs, _ = env.reset(options={"prompts": repeated[start:start + batch]})
        for i in range(policy.num_steps):
            action, _ = policy.sample_step(obs["latents"], i, obs["prompt_embeds"], generator=generator)
            obs, rewards, _, _, info = env.step(action)
        correct += info["gold/correct"].bool().tolist()
        unsure += info["gold/unsure"].bool().tolist()
        proxy += rewards.tolist()
        print(f"{start + batch}/{len(repeated)} images", file=sys.stderr, flush=True)
    cut = [slice(i * images, (i + 1) * images) for i in range(len(prompts))]
    return [Candidate(p, correct[c], unsure[c], proxy[c]) for p, c in zip(prompts, cut)]


def select(cands: list[Candidate], keep: int, low: float = 0.2, high: float = 0.8,
           min_sure: int = 8) -> list[Candidate]:
    """The `keep` candidates with a base rate in [low, high] over at least `min_sure` sure images on
    which the proxy agrees most with the judge (highest within-prompt AUROC; ties: rate nearest 0.5,
    then the candidate order)."""
    inside = [i for i, c in enumerate(cands) if c.sure >= min_sure and low <= c.rate <= high]
    if len(inside) < keep:
        raise ValueError(f"only {len(inside)} candidates have a base rate in [{low}, {high}] over >= {min_sure} "
                         f"sure images; need {keep}: draw more --candidates")
    ranked = sorted(inside, key=lambda i: (-cands[i].agreement, abs(cands[i].rate - 0.5)))
    return [cands[i] for i in sorted(ranked[:keep])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--images", type=int, default=16, help="base-model images per candidate")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--name", default="shapes-agree-16", help="the set's name (t2i_rl/assets/prompts/NAME.txt)")
    p.add_argument("--samples", type=Path, default=Path("docs/results/prompt_selection.json"),
                   help="every candidate's verdicts and proxy scores; reused when it exists")
    p.add_argument("--report", type=Path, default=Path("docs/results/prompt_selection.md"))
    args = p.parse_args(argv)
    if args.batch % args.images and args.images % args.batch:
        p.error("--batch and --images must divide one another")
    reward = {"name": "textnorm", "base": "clip", "tau": 0.02}  # the default env's proxy
    setting = {"candidates": args.candidates, "images": args.images, "seed": args.seed, "reward": reward}
    saved = json.loads(args.samples.read_text()) if args.samples.exists() else None
    if saved is not None and saved["setting"] == setting:
        cands = [Candidate(**c) for c in saved["candidates"]]
    else:
        cands = base_samples(candidates(args.candidates, args.seed), args.images, args.batch, args.seed, reward)
        args.samples.write_text(json.dumps({"setting": setting, "candidates": [asdict(c) for c in cands]}))
    kept = select(cands, args.keep)
    out = PROMPT_ASSETS / f"{args.name}.txt"
    out.write_text(f"# ShapesWorld's fixed training prompts (benchmarks/select_prompts.py --keep {args.keep}): base-model "
                   f"all-correct rate in [0.2, 0.8] over {args.images} images each, highest proxy-judge agreement\n"
                   + "".join(c.prompt + "\n" for c in kept))
    rows = "\n".join(f"| {c.prompt} | {c.rate:.2f} | {c.sure} | {c.agreement:.2f} | {'kept' if c in kept else ''} |"
                     for c in cands)
    rates = [c.rate for c in cands if c.sure]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    agree = [c.agreement for c in cands if c.agreement == c.agreement]
    args.report.write_text(
        f"# Fixed training prompts: the base model's rate and the proxy's agreement per candidate\n\n"
        f"Command: `python benchmarks/select_prompts.py --candidates {args.candidates} --images {args.images} "
        f"--keep {args.keep} --name {args.name}` (10 DDIM steps, guidance 5, eta 1, seed {args.seed}; proxy: "
        f"TextNorm over the CLIP-style model, tau 0.02). Rates are over the images the judge is sure of; "
        f"agreement is the proxy's AUROC within the prompt (sure-correct against sure-wrong images).\n\n"
        f"Kept: {len(kept)} prompts, mean rate {mean([c.rate for c in kept]):.3f}, mean agreement "
        f"{mean([c.agreement for c in kept]):.3f}; over all candidates: rate {mean(rates):.3f}, agreement "
        f"{mean(agree):.3f} ({len(agree)} candidates with both kinds). Both are biased upward for the kept "
        f"prompts by the selection itself; training runs measure them again on other noise at epoch 0.\n\n"
        f"| prompt | all-correct rate | sure images | agreement | |\n|---|---:|---:|---:|---|\n{rows}\n")
    print(f"kept {len(kept)} prompts -> {out}; report -> {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
