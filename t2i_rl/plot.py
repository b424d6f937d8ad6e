"""Reward-vs-human curves from runs' metrics.jsonl: `python -m t2i_rl.plot RUN [RUN ...] --out F.png`.

One panel per quantity (the proxy on the training batches; proxy and the judge's all-correct in the
fixed-noise evaluations on the training prompts and on held-out ones, shaded with their 95%
intervals; KL to base), one line per run, so a proxy that climbs while the gold stays flat or falls
is seen at a glance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("reward/proxy", "proxy reward (training batches)"),
          ("eval/train/proxy", "proxy reward (eval, training prompts)"),
          ("eval/train/gold_correct", "all-correct by the judge (eval, training prompts)"),
          ("eval/heldout/proxy", "proxy reward (eval, held-out prompts)"),
          ("eval/heldout/gold_correct", "all-correct by the judge (eval, held-out prompts)"),
          ("policy/kl_to_base", "KL to base (nats)")]


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[str], out: str | Path, labels: list[str] | None = None) -> Path:
    labels = labels or [Path(r).name for r in runs]
    fig, axes = plt.subplots(2, len(PANELS) // 2, figsize=(4.2 * len(PANELS) // 2, 6.4))
    axes = axes.flatten()
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        for ax, (tag, title) in zip(axes, PANELS):
            pts = [(r["epoch"], r[tag]) for r in rows if r.get(tag) is not None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o" if tag.startswith("eval/") else None, ms=3, label=label)
                band = [(r["epoch"], r[f"{tag}/ci_low"], r[f"{tag}/ci_high"]) for r in rows
                        if r.get(f"{tag}/ci_low") is not None]
                if band:
                    ax.fill_between(*zip(*band), color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_rl.plot", description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (output_dir of t2i_rl.train)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        print(f"error: {len(args.labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        print(plot_runs(args.runs, args.out, args.labels))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
