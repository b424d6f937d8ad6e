"""How much gold a perfect optimizer of the proxy could reach: best-of-n under the proxy.

    python benchmarks/proxy_ceiling.py [--prompts shapes-agree-16] [--images 64] [--seed 777]
        [--reward textnorm] [--out docs/results/proxy_ceiling.md]

Samples `--images` base-model images of every prompt of a set with the environment's default sampler
(10 DDIM steps, guidance 5, eta 1), judges them and scores them with the proxy, and reports the
judge's all-correct rate (over its sure images) among the proxy's top share of each prompt's
images: all of them (the base rate), the top half, quarter, eighth and the single best. A policy
that moved its samples into the proxy's top half of the base distribution would score the top
half's rate, so this bounds what optimizing this proxy can buy on these prompts before the policy
leaves the base model's support. The interval is a bootstrap over prompts. On `shapes-agree-16`
it separates the two reasons a run can stall: a proxy that cannot tell right from wrong there, or
an optimizer that does not move the policy far enough.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.select_prompts import Candidate, base_samples  # noqa: E402
from t2i_rl.intervals import bootstrap_mean_interval  # noqa: E402

REWARDS = {"textnorm": {"name": "textnorm", "base": "clip", "tau": 0.02}, "clip": {"name": "clip"}}
SHARES = (1.0, 0.5, 0.25, 0.125)


def top_verdicts(c: Candidate, share: float) -> list[bool]:
    """The judge's sure verdicts on the proxy's top `share` of a prompt's images (at least one
    image; ties in the proxy keep the earlier image)."""
    k = max(1, int(round(share * len(c.proxy))))
    order = sorted(range(len(c.proxy)), key=lambda i: -c.proxy[i])[:k]
    return [c.correct[i] for i in order if not c.unsure[i]]


def ceiling(cands: list[Candidate], share: float) -> tuple[float, tuple[float, float], int]:
    """(all-correct rate, 95% bootstrap interval over prompts, sure images) among the top `share`."""
    values, groups = [], []
    for c in cands:
        v = top_verdicts(c, share)
        values += [float(x) for x in v]
        groups += [c.prompt] * len(v)
    if not values:
        raise ValueError(f"no sure image among the proxy's top {share:.0%} of any prompt")
    return float(np.mean(values)), bootstrap_mean_interval(values, groups), len(values)


def main(argv: list[str] | None = None) -> int:
    from t2i_rl.prompts import load_prompt_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="shapes-agree-16", help="a shipped prompt set or a prompt file")
    p.add_argument("--images", type=int, default=64, help="base-model images per prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--reward", choices=sorted(REWARDS), default="textnorm", help="the proxy")
    p.add_argument("--out", type=Path, default=Path("docs/results/proxy_ceiling.md"))
    args = p.parse_args(argv)
    if args.images < 2:
        p.error(f"--images must be at least 2, got {args.images}")
    if args.batch % args.images and args.images % args.batch:
        p.error(f"--batch ({args.batch}) and --images ({args.images}) must divide one another")
    prompts = load_prompt_set(args.prompts)
    cands = base_samples(prompts, args.images, args.batch, args.seed, REWARDS[args.reward])
    shares = SHARES + (1 / args.images,)
    rows = []
    for share in shares:
        rate, (lo, hi), n = ceiling(cands, share)
        label = "best image" if share == 1 / args.images else ("all (base rate)" if share == 1 else f"top {share:.1%}")
        rows.append(f"| {label} | {rate:.1%} [{lo:.1%}, {hi:.1%}] | {n} |")
        print(rows[-1])
    auroc = [c.agreement for c in cands if c.agreement == c.agreement]
    args.out.write_text(
        f"# Best-of-n under the proxy: the gold a perfect optimizer of it could reach\n\n"
        f"Command: `python benchmarks/proxy_ceiling.py --prompts {args.prompts} --images {args.images} "
        f"--seed {args.seed} --reward {args.reward}`: {len(prompts)} prompts x {args.images} base-model images "
        f"(10 DDIM steps, guidance 5, eta 1). The judge's all-correct rate over its sure images among the "
        f"proxy's top share of each prompt's images; 95% bootstrap interval over prompts. The proxy's "
        f"within-prompt AUROC (sure-correct against sure-wrong images) averages {np.mean(auroc):.3f} over "
        f"{len(auroc)} prompts with both kinds.\n\n"
        f"| images kept per prompt | all-correct | sure images |\n|---|---|---:|\n" + "\n".join(rows) + "\n")
    print(f"report -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
