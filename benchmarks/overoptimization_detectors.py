"""Do the diagnostics catch overoptimization before gold has fallen? Lead times on finished runs.

    python benchmarks/overoptimization_detectors.py RUN_FOLDER... [--patience 1 2 3] [--drop 5]
        [--gold heldout|train] [--until EPOCH] [--doc docs/results/overoptimization_detectors.md]

For each run (a folder of `python -m t2i_rl.train`, e.g. the cells of `benchmarks/overoptimization.py`)
it finds the damage, then asks each detector when it fired:

- **the damage**: the first evaluation after gold's peak (the judge's all-correct on the fixed-noise
  held-out images, or with `--gold train` on the training prompts' images) at which it has fallen
  `--drop` points below that peak; a run that never falls so far has no damage, and a detector that
  fires on it raises a false alarm;
- **`overopt/hacked_frac`** (uses the judge, so a study's diagnostic, not a user's): the first
  training epoch at which its mean over the last 5 epochs exceeds its mean over epochs 0-4 by 0.05;
- **early stopping on a monitor** (`early_stop.watch=monitor`, what a user has): the package's
  `EarlyStopper` replayed over the evaluations, on the held-out score of a reward model the run did
  not optimize and the run's proxy on its training prompts (where it is optimized: a policy that
  overfits its prompts lowers the proxy on held-out prompts too). The monitors' scores are computed here from the
  evaluation images the run saved (evals/epochNNNN.npz), so runs made before `env.monitor` existed
  are measured too; a monitor the run's reward scores with is not held out and is left out;
- **early stopping on gold** (`early_stop.watch=gold`): the same rule on held-out gold, the bound a
  user cannot reach.

Lead time = the damage's epoch - the detector's epoch (positive or 0: it fired no later). "Kept" is
the gold of the evaluation that `checkpoints/best` holds when the run stops there (the best one so
far on the watched score; the last evaluation's if it never stops) against the peak's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from t2i_rl.diagnostics import EarlyStopper
from t2i_rl.train import leaf_models

# the monitors a user of ShapesWorld could watch: the shipped models and the web-caption CLIP-style one
MONITORS = {"pairwise": "pairwise", "lee": "lee", "web clip": {"name": "clip", "path": "rewards-web/clip"}}
HACK_WINDOW, HACK_MARGIN = 5, 0.05


@dataclass(frozen=True)
class Damage:
    peak_epoch: int
    peak: float
    fall_epoch: int | None  # None: gold never fell `drop` below its peak after it


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


NEEDED = ("eval/heldout/gold_correct", "eval/train/gold_correct", "eval/heldout/proxy")


def evaluations(rows: list[dict]) -> list[dict]:
    """The evaluation rows with every score used here (a rate is null where the judge was unsure of all)."""
    return [r for r in rows if all(r.get(k) is not None for k in NEEDED)]


def damage(epochs: list[int], gold: list[float], drop: float) -> Damage:
    """The peak of `gold` (its first evaluation) and the first later evaluation `drop` below it."""
    i = int(np.argmax(gold))
    fall = next((e for e, g in zip(epochs[i + 1:], gold[i + 1:]) if g <= gold[i] - drop), None)
    return Damage(epochs[i], gold[i], fall)


def hacked_rise(rows: list[dict], window: int = HACK_WINDOW, margin: float = HACK_MARGIN) -> int | None:
    """The first epoch whose trailing `window`-epoch mean of overopt/hacked_frac exceeds the first
    `window` epochs' mean by `margin`, or None."""
    series = [(r["epoch"], r["overopt/hacked_frac"]) for r in rows
              if r.get("overopt/hacked_frac") is not None and not np.isnan(r["overopt/hacked_frac"])]
    if len(series) < 2 * window:
        return None
    values = [v for _, v in series]
    base = statistics.fmean(values[:window])
    return next((series[i][0] for i in range(2 * window - 1, len(series))
                 if statistics.fmean(values[i - window + 1:i + 1]) > base + margin), None)


def replay_stopper(epochs: list[int], watched: list[float], proxy: list[float], patience: int,
                   final: bool = False) -> tuple[int | None, int]:
    """(the epoch at which `EarlyStopper` stops, or None; the epoch best on `watched` up to then).
    `final`: the last evaluation is the one after the last epoch, which the Trainer does not give its
    stopper. A stopped run's own final evaluation (after one more update) is not in the data, so
    "best up to then" is what checkpoints/best held before it."""
    stopper = EarlyStopper(patience)
    fed = len(epochs) - 1 if final else len(epochs)
    stop = next((i for i, (w, p) in enumerate(zip(watched[:fed], proxy[:fed])) if stopper.update(w, p)), None)
    seen = len(epochs) if stop is None else stop + 1
    return (None if stop is None else epochs[stop]), epochs[int(np.argmax(watched[:seen]))]


def saved_images(run: Path, epoch: int, split: str = "heldout") -> tuple[torch.Tensor, list[str]]:
    """The images [N, 3, H, W] in [0, 1] and prompts a run saved at an evaluation."""
    prompts = json.loads((run / "evals" / f"epoch{epoch:04d}.json").read_text())[split]["prompts"]
    with np.load(run / "evals" / f"epoch{epoch:04d}.npz") as saved:
        pixels = saved[split]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, prompts


def mean_score(reward, images: torch.Tensor, prompts: list[str]) -> float:
    with torch.no_grad():
        return float(reward(images, prompts).scores.double().mean())


def held_out_monitors(run: Path) -> list[str]:
    """The MONITORS that the run's optimized reward does not score with."""
    reward = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").env, resolve=True)["reward"]
    return [name for name, spec in MONITORS.items() if not leaf_models(spec) & leaf_models(reward)]


def measure(run: Path, patiences: list[int], drop: float, models: dict, split: str = "heldout",
            until: int | None = None) -> dict:
    rows = [r for r in read_rows(run) if until is None or r["epoch"] <= until]
    evals = evaluations(rows)
    epochs = [r["epoch"] for r in evals]
    gold = [r[f"eval/{split}/gold_correct"] for r in evals]
    proxy = [r.get("eval/train/proxy", r["eval/heldout/proxy"]) for r in evals]  # as the Trainer's stopper
    hurt = damage(epochs, gold, drop)
    by_epoch = dict(zip(epochs, gold))
    detectors = {"hacked_frac": {"fired": hacked_rise(rows), "kept_gold": None}}
    watched = {"gold": [r["eval/heldout/gold_correct"] for r in evals]}
    monitors = held_out_monitors(run)
    for name in monitors:
        watched[f"monitor: {name}"] = []
    for e in epochs if monitors else []:  # each evaluation's images read once, for every monitor
        images, prompts = saved_images(run, e)
        for name in monitors:
            watched[f"monitor: {name}"].append(mean_score(models[name], images, prompts))
    for name, series in watched.items():
        for k in patiences:
            fired, kept = replay_stopper(epochs, series, proxy, k, final="reward/proxy" not in evals[-1])
            detectors[f"{name}, patience {k}"] = {"fired": fired, "kept_gold": by_epoch[kept]}
    return {"run": str(run), "damage": hurt, "detectors": detectors}


def lead(fired: int | None, fall: int | None) -> str:
    if fall is None:
        return "false alarm" if fired is not None else "–"
    return "missed" if fired is None else f"{fall - fired:+d}"


def run_table(results: list[dict], patience: int) -> str:
    """One row per run: the damage, then each detector's epoch (lead) at one patience."""
    names = list(dict.fromkeys(n for r in results for n in r["detectors"]
                               if "patience" not in n or n.endswith(f"patience {patience}")))
    lines = ["| run | gold peak (epoch) | fell at | " + " | ".join(n.replace(f", patience {patience}", "")
                                                          for n in names) + " |",
             "|---|---|---:|" + "---|" * len(names)]
    for r in results:
        d = r["damage"]
        cells = []
        for name in names:
            v = r["detectors"].get(name)
            cells.append("n/a" if v is None else
                         f"{v['fired'] if v['fired'] is not None else 'never'} ({lead(v['fired'], d.fall_epoch)})")
        lines.append(f"| {Path(r['run']).name} | {100 * d.peak:.1f} ({d.peak_epoch}) | "
                     f"{d.fall_epoch if d.fall_epoch is not None else 'never'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Per detector: of the runs that fell, how many it stopped before the fall and its mean lead;
    its false alarms on the runs that did not; the kept checkpoint's gold against the peak."""
    names = list(dict.fromkeys(n for r in results for n in r["detectors"]))
    lines = ["| detector | runs | stopped before the fall | mean lead (epochs) | missed or late | false alarms | "
             "kept gold - peak gold (points, mean) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        mine = [r for r in results if name in r["detectors"]]
        fell = [r for r in mine if r["damage"].fall_epoch is not None]
        leads = [r["damage"].fall_epoch - r["detectors"][name]["fired"] for r in fell
                 if r["detectors"][name]["fired"] is not None]
        early = sum(x >= 0 for x in leads)
        alarms = sum(r["detectors"][name]["fired"] is not None for r in mine if r["damage"].fall_epoch is None)
        kept = [100 * (r["detectors"][name]["kept_gold"] - r["damage"].peak) for r in mine
                if r["detectors"][name]["kept_gold"] is not None]
        mean_lead = f"{statistics.fmean(leads):+.1f}" if leads else "–"
        lines.append(f"| {name} | {len(mine)} | {early} of {len(fell)} | {mean_lead} | {len(fell) - early} | "
                     f"{alarms} of {len(mine) - len(fell)} | {f'{statistics.fmean(kept):+.1f}' if kept else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl, config.yaml, evals/)")
    p.add_argument("--patience", nargs="+", type=int, default=[1, 2, 3], help="EarlyStopper patiences to replay")
    p.add_argument("--drop", type=float, default=5.0, help="points below the peak that count as damage")
    p.add_argument("--gold", choices=["heldout", "train"], default="heldout",
                   help="the gold whose fall is the damage: held-out prompts' or the training prompts'")
    p.add_argument("--until", type=int, default=None, help="only the evaluations up to this epoch")
    p.add_argument("--doc", type=Path, default=None, help="write the tables here (markdown)")
    args = p.parse_args(argv)
    bad = [r for r in args.runs if not (r / "metrics.jsonl").is_file() or not (r / "config.yaml").is_file()]
    if bad:
        p.error(f"not a run folder (no metrics.jsonl or config.yaml): {', '.join(map(str, bad))}")
    if any(k < 1 for k in args.patience) or not args.drop > 0:
        p.error(f"--patience must be >= 1 and --drop > 0, got {args.patience} and {args.drop}")
    from t2i_rl.rewards import make_reward

    models = {name: make_reward(spec) for name, spec in MONITORS.items()}
    results = [measure(run, args.patience, args.drop / 100, models, args.gold, args.until) for run in args.runs]
    shown = args.patience[len(args.patience) // 2]
    text = "\n".join([
        f"`python benchmarks/overoptimization_detectors.py {' '.join(map(str, argv))}`", "",
        f"Damage: {args.gold} gold {args.drop:g} points below its peak.", "",
        summary_table(results), "", f"Per run, at patience {shown}: the epoch each detector fires (lead).", "",
        run_table(results, shown), ""])
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
