"""The paired change of the fixed-noise evaluation, pooled over several runs (seeds) of one recipe.

    python benchmarks/pooled_paired_change.py RUN [RUN ...] [--epochs 50 100 150] [--base 0]

Each run's evaluation at an epoch is compared image by image with its own evaluation at `--base`
(same prompts, same noise), and the images of all runs are pooled: the change is their mean, its
95% interval a bootstrap over (run, prompt) clusters, so that a seed's prompts resample together.
Printed per epoch, set (train, held-out) and score (the judge's all-correct in points, the proxy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2i_rl.intervals import paired_bootstrap_interval

SCORES = (("gold_correct", 100.0, "all-correct (points)"), ("proxy", 1.0, "proxy"))


def pooled_change(runs: list[Path], base: int, epoch: int, split: str, key: str) -> tuple[float, float, float]:
    before, after, clusters = [], [], []
    for i, run in enumerate(runs):
        first = json.loads((run / "evals" / f"epoch{base:04d}.json").read_text())[split]
        last = json.loads((run / "evals" / f"epoch{epoch:04d}.json").read_text())[split]
        if first["prompts"] != last["prompts"]:
            raise ValueError(f"{run}: the evaluations at epochs {base} and {epoch} are of other prompts")
        before += first[key]
        after += last[key]
        clusters += [f"{i}|{p}" for p in first["prompts"]]
    return paired_bootstrap_interval(before, after, clusters)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of one recipe (e.g. one per seed)")
    p.add_argument("--epochs", nargs="+", type=int, default=[50, 100, 150], help="evaluations to compare")
    p.add_argument("--base", type=int, default=0, help="the evaluation each is compared with")
    args = p.parse_args(argv)
    for run in args.runs:
        for epoch in (args.base, *args.epochs):
            if not (run / "evals" / f"epoch{epoch:04d}.json").is_file():
                p.error(f"{run} has no evaluation at epoch {epoch} (evals/epoch{epoch:04d}.json)")
    print(f"| epoch | set | score | pooled paired change over {len(args.runs)} runs [95%] |\n|---:|---|---|---|")
    for epoch in args.epochs:
        for split in ("train", "heldout"):
            for key, scale, name in SCORES:
                change, low, high = (scale * x for x in pooled_change(args.runs, args.base, epoch, split, key))
                digits = 1 if scale == 100 else 3
                print(f"| {epoch} | {split} | {name} | {change:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
