"""Every agent for the same wall-clock budget on the default task, one line each: held-out gold
before (the base model, epoch 0) and after, the proxy, and the KL to the base model.

    python benchmarks/agents_at_equal_budget.py [--budget 2.5] [--agents ddpo dpok ...] [--env textnorm]
        [--out runs/equal-budget] [--summarize] [-- extra train overrides]

Runs `python -m t2i_rl.train agent=A env=E budget_minutes=B eval.every=0` one after another (never
side by side: two runs would share the cores and each would get less than its budget), then prints
a markdown table from each run's metrics.jsonl. `--summarize` only prints the table of runs already
in `--out`. `ddpo@raw` in `--agents` runs DDPO on the raw reward next to the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

AGENTS = ["ddpo", "ddpo@raw", "dpok", "ddpo_trl", "refl", "draft", "rwr", "sb3"]


def split(spec: str, env: str) -> tuple[str, str]:
    agent, _, run_env = spec.partition("@")
    return agent, run_env or env


def summarize(run: Path) -> dict[str, float] | None:
    """Before/after numbers of one run folder, or None when it has no final evaluation."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    evals = [r for r in rows if "eval/gold_correct" in r]
    trained = [r for r in rows if "reward/proxy" in r]
    if len(evals) < 2 or not trained:
        return None
    first, last = evals[0], evals[-1]
    return {"epochs": len(trained), "gold_before": first["eval/gold_correct"], "gold_after": last["eval/gold_correct"],
            "proxy_before": first["eval/proxy"], "proxy_after": last["eval/proxy"],
            "kl": trained[-1].get("policy/kl_to_base", float("nan")),
            "seconds": sum(r.get("time/epoch_s", 0.0) for r in trained)}


def table(out: Path, specs: list[str], env: str) -> str:
    lines = ["| agent | env | epochs | train s | held-out gold before | after | change | held-out proxy before | after | KL to base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in specs:
        agent, run_env = split(spec, env)
        s = summarize(out / f"{agent}-{run_env}")
        if s is None:
            lines.append(f"| {agent} | {run_env} | (no finished run) |||||||| |")
            continue
        change = 100 * (s["gold_after"] - s["gold_before"])
        lines.append(f"| {agent} | {run_env} | {s['epochs']} | {s['seconds']:.0f} | {100 * s['gold_before']:.1f}% | "
                     f"{100 * s['gold_after']:.1f}% | {change:+.1f} pts | {s['proxy_before']:.3f} | "
                     f"{s['proxy_after']:.3f} | {s['kl']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=2.5, help="minutes of training per agent")
    p.add_argument("--agents", nargs="+", default=AGENTS, help="agent names; agent@env picks another env")
    p.add_argument("--env", default="textnorm", help="env of the agents without @env")
    p.add_argument("--out", type=Path, default=Path("runs/equal-budget"), help="one run folder per agent in here")
    p.add_argument("--summarize", action="store_true", help="only print the table of the runs in --out")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 minutes, got {args.budget}")
    if not args.summarize:
        for spec in args.agents:
            agent, env = split(spec, args.env)
            run = args.out / f"{agent}-{env}"
            if run.exists():
                p.error(f"{run} exists: remove it or pick another --out (a finished run would only be resumed)")
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "t2i_rl.train", f"agent={agent}", f"env={env}",
                   f"budget_minutes={args.budget}", "eval.every=0", "samples.every=0", f"output_dir={run}", *extra]
            args.out.mkdir(parents=True, exist_ok=True)
            with (args.out / f"{agent}-{env}.log").open("w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{agent} on {env}: exit {code}, {time.perf_counter() - start:.0f} s (log: {run}.log)", flush=True)
    print(table(args.out, args.agents, args.env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
