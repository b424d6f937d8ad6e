"""Every agent for the same wall-clock budget on the default task, one line each: the judge's
all-correct and the optimized proxy in the fixed-noise evaluations on the training prompts and on
held-out prompts, before (the base model, epoch 0) and after, each with its 95% interval, and the
KL to the base model; and the paired change on the training prompts (image by image, same noise,
bootstrap over prompts; ↑/↓ where its interval excludes 0; ↑/↓ beside an "after" where the two
separate intervals are apart).

    python benchmarks/agents_at_equal_budget.py [--budget 10] [--agents ddpo dpok ...] [--env textnorm]
        [--parallel 2] [--out runs/equal-budget] [--summarize] [-- extra train overrides]

Runs `python -m t2i_rl.train agent=A env=E budget_minutes=B` for each agent. `--parallel N` runs N
at once, each with `threads=cores/N` (on 2 cores: two runs of one thread each), so every agent gets
the same share of the machine; the default runs one at a time with every core. Then it prints a
markdown table from each run's metrics.jsonl and draws each run's curves next to its folder
(`<run>.png`, by `python -m t2i_rl.plot`). `--summarize` only prints the table of runs already in
`--out`. `ddpo@raw` in `--agents` runs DDPO on the raw reward next to the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from t2i_rl.sweep import parallel_arg, run_side_by_side, split_overrides

AGENTS = ["ddpo", "ddpo@raw", "dpok", "ddpo_trl", "refl", "draft", "rwr", "sb3"]


def split(spec: str, env: str) -> tuple[str, str]:
    agent, _, run_env = spec.partition("@")
    return agent, run_env or env


def summarize(run: Path) -> dict[str, float] | None:
    """First and last evaluation of one run folder, or None when it has no final evaluation."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/train/proxy" in r]
    trained = [r for r in rows if "reward/proxy" in r]
    if len(evals) < 2 or not trained:
        return None
    return {"epochs": len(trained), "first": evals[0], "last": evals[-1],
            "kl": trained[-1].get("policy/kl_to_base", float("nan")),
            "seconds": sum(r.get("time/epoch_s", 0.0) for r in trained),
            "paired": paired_changes(run / "evals" / f"epoch{evals[0]['epoch']:04d}.json",
                                     run / "evals" / f"epoch{evals[-1]['epoch']:04d}.json")}


def paired_changes(first: Path, last: Path) -> dict[str, tuple[float, float, float]]:
    """(change, low, high) of each training-prompt score from the first evaluation to the last, image
    by image (same prompts, same noise), with a bootstrap over prompts."""
    from t2i_rl.intervals import paired_bootstrap_interval

    if not (first.is_file() and last.is_file()):
        return {}
    before, after = json.loads(first.read_text())["train"], json.loads(last.read_text())["train"]
    return {key: paired_bootstrap_interval(before[key], after[key], before["prompts"])
            for key in ("proxy", "gold_correct") if key in before}


def interval(row: dict, tag: str, percent: bool) -> str:
    if row.get(tag) is None:
        return "n/a"
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 3)
    return (f"{scale * row[tag]:.{digits}f}{unit} [{scale * row[tag + '/ci_low']:.{digits}f}, "
            f"{scale * row[tag + '/ci_high']:.{digits}f}]")


def apart(first: dict, last: dict, tag: str) -> str:
    """Whether the two 95% intervals are disjoint, and in which direction."""
    if first.get(tag) is None or last.get(tag) is None:
        return ""
    if last[tag + "/ci_low"] > first[tag + "/ci_high"]:
        return " ↑"
    if last[tag + "/ci_high"] < first[tag + "/ci_low"]:
        return " ↓"
    return ""


def paired(s: dict, key: str, percent: bool) -> str:
    if key not in s["paired"]:
        return "n/a"
    scale, unit, digits = (100, " pts", 1) if percent else (1, "", 3)
    change, low, high = (scale * x for x in s["paired"][key])
    mark = " ↑" if low > 0 else " ↓" if high < 0 else ""
    return f"{change:+.{digits}f}{unit} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


COLUMNS = [("eval/train/proxy", False, "train proxy"), ("eval/train/gold_correct", True, "train gold"),
           ("eval/heldout/proxy", False, "held-out proxy"), ("eval/heldout/gold_correct", True, "held-out gold")]


def table(out: Path, specs: list[str], env: str) -> str:
    head = " | ".join(f"{name} before | after" for _, _, name in COLUMNS)
    lines = [f"| agent | env | epochs | train s | {head} | train proxy change (paired) | train gold change (paired) "
             "| KL to base |",
             "|---|---|---:|---:|" + "---:|---:|" * len(COLUMNS) + "---:|---:|---:|"]
    for spec in specs:
        agent, run_env = split(spec, env)
        s = summarize(out / f"{agent}-{run_env}")
        if s is None:
            lines.append(f"| {agent} | {run_env} | (no finished run) |" + " |" * (2 * len(COLUMNS) + 4))
            continue
        cells = " | ".join(f"{interval(s['first'], tag, pct)} | {interval(s['last'], tag, pct)}"
                           f"{apart(s['first'], s['last'], tag)}" for tag, pct, _ in COLUMNS)
        lines.append(f"| {agent} | {run_env} | {s['epochs']} | {s['seconds']:.0f} | {cells} | "
                     f"{paired(s, 'proxy', False)} | {paired(s, 'gold_correct', True)} | {s['kl']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=10.0, help="minutes of training per agent")
    p.add_argument("--agents", nargs="+", default=AGENTS, help="agent names; agent@env picks another env")
    p.add_argument("--env", default="textnorm", help="env of the agents without @env")
    p.add_argument("--parallel", type=parallel_arg, default=1, help="runs at once, each with cores/N threads")
    p.add_argument("--out", type=Path, default=Path("runs/equal-budget"), help="one run folder per agent in here")
    p.add_argument("--summarize", action="store_true", help="only print the table of the runs in --out")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 minutes, got {args.budget}")
    if not args.summarize:
        runs = [(args.out / f"{agent}-{env}", [f"agent={agent}", f"env={env}", f"budget_minutes={args.budget}", *extra])
                for agent, env in (split(spec, args.env) for spec in args.agents)]
        for run, _ in runs:
            if run.exists():
                p.error(f"{run} exists: remove it or pick another --out (a finished run would only be resumed)")
        run_side_by_side(runs, args.parallel)
    print(table(args.out, args.agents, args.env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
