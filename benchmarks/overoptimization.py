"""The Goodhart curve: gold against KL to the base model, per reward, agent and seed.

    python benchmarks/overoptimization.py [--agents ddpo draft] [--rewards raw textnorm ensemble
        textnorm_ensemble] [--seeds 0 1 2] [--epochs 400] [--every 25] [--parallel 2]
        [--out runs/overoptimization] [--doc docs/results/overoptimization.md] [--summarize]
        [-- extra train overrides]

Each cell (agent x reward x seed) is one run folder, `<out>/<agent>-<reward>-seed<seed>`, trained by
`python -m t2i_rl.train agent=A env=R seed=S epochs=E eval.every=K resume=true`, `--parallel` at a
time with an equal share of the cores (`t2i_rl.sweep`). The grid is resumable: a cell whose
metrics.jsonl holds its final evaluation is skipped, an unfinished one resumes from its last
checkpoint. Then it writes `--doc`, a markdown table per agent x reward over the seeds (mean and
min-max): the peak of train gold (the judge's all-correct on the training prompts, fixed noise) and
its epoch, train and held-out gold at the peak and at the end, the optimized proxy at the end, and
the KL to base at the peak and at the end; and one PNG per agent beside it (`<doc>_<agent>.png`,
or `<doc>.png` for a grid of one agent): train and held-out gold against KL and against epochs, the proxy
against epochs, one colour per reward, one line per seed. A proxy that climbs while gold peaks and
falls is the overoptimization the package is for.

KL at an evaluation: the median of `policy/kl_to_base` over the training epochs within 2 of it
(the rollout of epoch e is sampled by the policy evaluated at e; single epochs spike).

Head to head, as the TextNorm paper's human evaluation: the policies of each reward and of `raw`
(the same agent and seed, so the same held-out prompts and noise) at the last evaluation, image by
image on the judge's graded score (the fraction of the prompt's attributes right, on every image,
the unsure ones too: a person comparing two images compares them all): win, tie or loss, pooled
over the seeds, each with a 95% interval from a bootstrap of the (seed, prompt) pairs. The
interval is over prompts for these trained policies, not over training seeds: the per-seed
win - loss beside it shows how much the seeds differ. A seed without both evaluations (a run
stopped early) is left out, and the seeds column says how many remain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from t2i_rl.sweep import parallel_arg, run_side_by_side, split_overrides

AGENTS = ["ddpo", "draft"]
REWARDS = ["raw", "textnorm", "ensemble", "textnorm_ensemble"]
SEEDS = [0, 1, 2]


def cell(out: Path, agent: str, reward: str, seed: int) -> Path:
    return out / f"{agent}-{reward}-seed{seed}"


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(run: Path, epochs: int) -> bool:
    return any(row["epoch"] == epochs and "eval/train/gold_correct" in row for row in read_metrics(run))


def kl_at(rows: list[dict], epoch: int) -> float:
    near = [r["policy/kl_to_base"] for r in rows
            if "policy/kl_to_base" in r and abs(r["epoch"] - epoch) <= 2 and r["policy/kl_to_base"] is not None]
    return statistics.median(near) if near else 0.0


def curve(run: Path, until: int | None = None) -> list[dict]:
    """One point per evaluation up to epoch `until` (all if None): epoch, KL at it, train and
    held-out gold, train proxy. A cell continued past the grid's epochs is summarized as the grid's."""
    rows = [r for r in read_metrics(run) if until is None or r["epoch"] <= until]
    return [{"epoch": r["epoch"], "kl": kl_at(rows, r["epoch"]), "train_gold": r["eval/train/gold_correct"],
             "heldout_gold": r.get("eval/heldout/gold_correct"), "proxy": r["eval/train/proxy"]}
            for r in rows if r.get("eval/train/gold_correct") is not None]


def cell_summary(points: list[dict]) -> dict[str, float]:
    peak = max(points, key=lambda p: p["train_gold"])
    end = points[-1]
    return {"peak_gold": peak["train_gold"], "peak_epoch": peak["epoch"], "peak_heldout": peak["heldout_gold"],
            "peak_kl": peak["kl"], "end_gold": end["train_gold"], "end_heldout": end["heldout_gold"],
            "end_proxy": end["proxy"], "end_kl": end["kl"], "base_gold": points[0]["train_gold"],
            "end_epoch": end["epoch"]}


# (key, header, scale, digits): gold as a percentage, proxy and KL as they are
COLUMNS = [("base_gold", "train gold at 0", 100, 1), ("peak_gold", "peak train gold", 100, 1),
           ("peak_epoch", "peak epoch", 1, 0), ("peak_kl", "KL at peak", 1, 0),
           ("peak_heldout", "held-out gold at peak", 100, 1), ("end_gold", "train gold at end", 100, 1),
           ("end_heldout", "held-out gold at end", 100, 1), ("end_proxy", "proxy at end", 1, 3),
           ("end_kl", "KL at end", 1, 0)]


def spread(values: list[float], scale: float, digits: int) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(out: Path, agents: list[str], rewards: list[str], seeds: list[int], epochs: int | None = None) -> str:
    lines = ["| agent | reward | seeds | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for agent in agents:
        for reward in rewards:
            points = [curve(cell(out, agent, reward, s), epochs) for s in seeds]
            summaries = [cell_summary(p) for p in points if len(p) >= 2]
            cells = " | ".join(spread([s[key] for s in summaries], scale, digits) for key, _, scale, digits in COLUMNS)
            lines.append(f"| {agent} | {reward} | {len(summaries)} | {cells} |")
    return "\n".join(lines)


def final_eval(run: Path, epoch: int) -> dict | None:
    """The held-out records of a run's evaluation at `epoch` (prompts and per-image scores), or None."""
    path = run / "evals" / f"epoch{epoch:04d}.json"
    return json.loads(path.read_text()).get("heldout") if path.is_file() else None


def head_to_head(out: Path, agent: str, reward: str, baseline: str, seeds: list[int], epoch: int) -> dict | None:
    """Win / tie / loss rates of `reward`'s policy against `baseline`'s on held-out gold at `epoch`,
    image by image, with 95% bootstrap intervals (resampling the prompts of each seed); None when no
    seed has both evaluations."""
    from t2i_rl.intervals import bootstrap_mean_interval

    outcome, groups = [], []
    for seed in seeds:
        mine, theirs = (final_eval(cell(out, agent, r, seed), epoch) for r in (reward, baseline))
        if mine is None or theirs is None:
            continue
        if mine["prompts"] != theirs["prompts"]:
            raise ValueError(f"{agent} seed {seed}: {reward} and {baseline} were evaluated on other prompts")
        for prompt, a, b in zip(mine["prompts"], mine["gold"], theirs["gold"]):
            outcome.append((a > b) - (a < b))
            groups.append(f"{seed}:{prompt}")
    if not outcome:
        return None
    seeds_seen = list(dict.fromkeys(g.split(":")[0] for g in groups))
    per_seed = [statistics.fmean(o for o, g in zip(outcome, groups) if g.split(":")[0] == s) for s in seeds_seen]
    result = {"n": len(outcome), "seeds": len(seeds_seen), "net_per_seed": per_seed}
    for name, values in [("win", [float(o == 1) for o in outcome]), ("tie", [float(o == 0) for o in outcome]),
                         ("loss", [float(o == -1) for o in outcome]), ("net", [float(o) for o in outcome])]:
        result[name] = statistics.fmean(values)
        result[f"{name}_ci"] = bootstrap_mean_interval(values, groups)
    return result


def head_to_head_table(out: Path, agents: list[str], rewards: list[str], seeds: list[int], epoch: int,
                       baseline: str = "raw") -> str:
    def pct(r: dict, key: str) -> str:
        low, high = r[f"{key}_ci"]
        return f"{100 * r[key]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    lines = [f"| agent | reward vs {baseline} | seeds | images | win | tie | loss | win - loss | win - loss per seed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for agent in agents:
        for reward in rewards:
            r = None if reward == baseline else head_to_head(out, agent, reward, baseline, seeds, epoch)
            if r is not None:
                lines.append(f"| {agent} | {reward} | {r['seeds']} | {r['n']} | {pct(r, 'win')} | {pct(r, 'tie')} | "
                             f"{pct(r, 'loss')} | {pct(r, 'net')} | "
                             f"{', '.join(f'{100 * v:+.1f}%' for v in r['net_per_seed'])} |")
    return "\n".join(lines)


def plot(out: Path, agent: str, rewards: list[str], seeds: list[int], path: Path, epochs: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl", "train_gold", "train gold (all-correct) vs KL"),
              ("kl", "heldout_gold", "held-out gold vs KL"),
              ("epoch", "train_gold", "train gold vs epoch"),
              ("epoch", "proxy", "optimized proxy (train prompts) vs epoch")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, reward in enumerate(rewards):
        for j, seed in enumerate(seeds):
            points = curve(cell(out, agent, reward, seed), epochs)
            if not points:
                continue
            for ax, (x, y, _) in zip(axes, panels):
                ax.plot([p[x] for p in points], [p[y] for p in points], color=colours[i % len(colours)],
                        alpha=0.8, marker=".", label=reward if j == 0 else None)
    for ax, (x, _, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("KL to base (nats)" if x == "kl" else "epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{agent}: proxy and gold per reward, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    given = " ".join(argv)
    argv, extra = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", nargs="+", default=AGENTS, help="agent names")
    p.add_argument("--rewards", nargs="+", default=REWARDS, help="env names (the reward each optimizes)")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="seeds of each agent x reward")
    p.add_argument("--epochs", type=int, default=400, help="epochs of each run")
    p.add_argument("--every", type=int, default=25, help="evaluate every this many epochs")
    p.add_argument("--parallel", type=parallel_arg, default=1, help="runs at once, each with cores/N threads")
    p.add_argument("--out", type=Path, default=Path("runs/overoptimization"), help="one run folder per cell")
    p.add_argument("--doc", type=Path, default=Path("docs/results/overoptimization.md"), help="the table to write")
    p.add_argument("--summarize", action="store_true", help="only write the table and plots of the runs in --out")
    args = p.parse_args(argv)
    for name in ("epochs", "every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.summarize:
        todo = [(cell(args.out, agent, reward, seed),
                 [f"agent={agent}", f"env={reward}", f"seed={seed}", f"epochs={args.epochs}",
                  f"eval.every={args.every}", "resume=true", *extra])
                for agent in args.agents for reward in args.rewards for seed in args.seeds
                if not finished(cell(args.out, agent, reward, seed), args.epochs)]
        print(f"{len(todo)} of {len(args.agents) * len(args.rewards) * len(args.seeds)} cells to run", flush=True)
        run_side_by_side(todo, args.parallel)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# Overoptimization: gold against KL, per reward ({args.epochs} epochs, evaluations every "
            f"{args.every})", "",
            f"`python benchmarks/overoptimization.py {given}`; "
            f"runs in `{args.out}`. Gold: the judge's all-correct on the fixed-noise evaluation images "
            "(train: the training prompts; held-out: held-out prompts); mean over seeds (min–max).", "",
            table(args.out, args.agents, args.rewards, args.seeds, args.epochs), "",
            f"Head to head at epoch {args.epochs}: each reward's policy against raw's, held-out prompts, the "
            "judge's graded score image by image (same seed: same prompts and noise); 95% intervals, bootstrap "
            "over prompts.", "",
            head_to_head_table(args.out, args.agents, args.rewards, args.seeds, args.epochs), ""]
    for agent in args.agents:
        png = args.doc.with_name(f"{args.doc.stem}{'_' + agent if len(args.agents) > 1 else ''}.png")
        plot(args.out, agent, args.rewards, args.seeds, png, args.epochs)
        body += [f"![{agent}: gold and proxy against KL and epochs, per reward]({png.name})", ""]
    args.doc.write_text("\n".join(body))
    print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
