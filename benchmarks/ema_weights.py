"""Does a moving average of the trained weights keep more gold than the live weights?

    python benchmarks/ema_weights.py --out runs/ema-probe [--decays 0.9 0.97] [--every 25] [-- overrides]

DDPO's updates are mostly noise at this gradient signal (docs/results/ddpo_gradient_snr.md), and
the runs' KL to base keeps climbing after gold stops rising. An exponential moving average of the
weights, updated after every epoch's update (Flow-GRPO evaluates one), averages part of that walk
away while keeping the drift the signal causes. This trains one run as `python -m t2i_rl.train`
would (same config and overrides; the live weights sample every rollout) and at epoch 0 and every
`--every` epochs evaluates the live weights and each average on the same fixed-noise sets. The
evaluations are saved as the Trainer saves its own (`evals/epochNNNN.json`), the averages under
epoch 10000 * (1 + i) + e for the i-th decay, so `benchmarks/pooled_paired_change.py OUT --base E
--epochs 10000+E` pairs an average against the live weights image by image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from t2i_rl.sweep import split_overrides


def update_average(average: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * params, in place."""
    with torch.no_grad():
        for a, q in zip(average, params):
            a.mul_(decay).add_(q.detach(), alpha=1 - decay)


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the run folder (must not hold a run)")
    p.add_argument("--decays", nargs="+", type=float, default=[0.9, 0.97], help="per-epoch decays, each in (0, 1)")
    p.add_argument("--every", type=int, default=25, help="evaluate every this many epochs")
    args = p.parse_args(argv)
    if not all(0 < d < 1 for d in args.decays) or args.every < 1:
        p.error(f"--decays must be in (0, 1) and --every >= 1, got {args.decays} and {args.every}")
    from t2i_rl.train import Trainer, compose_config

    trainer = Trainer(compose_config([*extra, f"output_dir={args.out}", "resume=false"]))
    params = trainer.policy.trainable_parameters()
    averages = [[q.detach().clone() for q in params] for _ in args.decays]
    log = (args.out / "ema_weights.jsonl").open("a")

    def evaluate(epoch: int, label: str, weights: list[torch.Tensor] | None, offset: int) -> None:
        live = [q.detach().clone() for q in params]
        with torch.no_grad():
            for q, w in zip(params, weights or live):
                q.copy_(w)
            scores = trainer.evaluate(offset + epoch)
            for q, w in zip(params, live):
                q.copy_(w)
        row = {"epoch": epoch, "weights": label, **{k: v for k, v in scores.items() if k.startswith("eval/")}}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"epoch {epoch} {label}: train all-correct {100 * scores.get('eval/train/gold_correct', float('nan')):.1f}%",
              flush=True)

    epochs = trainer.cfg.epochs
    for epoch in range(epochs + 1):
        if epoch % args.every == 0 or epoch == epochs:
            evaluate(epoch, "live", None, 0)
            for i, (decay, average) in enumerate(zip(args.decays, averages)):
                if epoch:
                    evaluate(epoch, f"ema {decay:g}", average, 10000 * (1 + i))
        if epoch == epochs:
            break
        trainer.logger.log(epoch, trainer.epoch(epoch))
        for decay, average in zip(args.decays, averages):
            update_average(average, params, decay)
    trainer.logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
