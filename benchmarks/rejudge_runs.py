"""A run's evaluations judged again by the judge as it is now, for the tools that read evaluations.

    python benchmarks/rejudge_runs.py RUN [RUN ...] --out DIR

Every gold figure rests on the judge, and the judge changes; a run's evals/epochNNNN.json keep the
verdicts of the judge it was trained with. For each run this writes DIR/<run name>/ with its
config.yaml and, for every evaluation whose images were saved (evals/epochNNNN.npz), the json with
`gold`, `gold_correct` and `gold_unsure` recomputed from those images (the proxy and monitor scores
are kept). `benchmarks/pooled_paired_change.py DIR/<run>...` then gives the paired changes under the
current judge. Prints, per run and epoch, the train and held-out all-correct rate (over the images
the judge is sure of) as recorded and as judged now.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from t2i_rl.audit import AuditError, load_set, saved_epochs
from t2i_rl.world import ShapesWorld


def rate(record: dict[str, list]) -> str:
    """The all-correct rate over the sure images of one set, as train.py reports it."""
    sure = [c for c, u in zip(record["gold_correct"], record["gold_unsure"]) if u < 0.5]
    return f"{sum(sure) / max(len(sure), 1):.1%} of {len(sure)}"


def rejudge(run: Path, out: Path, world: ShapesWorld) -> None:
    target = out / run.name
    (target / "evals").mkdir(parents=True, exist_ok=True)
    if (run / "config.yaml").is_file():
        shutil.copy(run / "config.yaml", target / "config.yaml")
    for epoch in saved_epochs(run):
        name = f"epoch{epoch:04d}"
        record = json.loads((run / "evals" / f"{name}.json").read_text())
        line = [f"{run.name} epoch {epoch}:"]
        for set_name in list(record):
            old, images = load_set(run, epoch, set_name)
            result = world.judge(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, old["prompts"])
            new = dict(old, gold=result.score.double().tolist(), gold_correct=result.correct.double().tolist(),
                       gold_unsure=(~result.sure).double().tolist())
            record[set_name] = new
            line.append(f"{set_name} {rate(old)} -> {rate(new)}")
        (target / "evals" / f"{name}.json").write_text(json.dumps(record))
        print("  ".join(line))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders whose evaluations saved their images")
    p.add_argument("--out", type=Path, required=True, help="folder for the re-judged copies (one per run)")
    args = p.parse_args(argv)
    if len({r.name for r in args.runs}) < len(args.runs):
        print("error: two runs share a folder name; their copies would overwrite each other", file=sys.stderr)
        return 2
    world = ShapesWorld()
    try:
        for run in args.runs:
            rejudge(run, args.out, world)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
