"""How far the judge can be trusted on images its own renderer did not draw.

    python benchmarks/judge_robustness.py [--n 500] [--seed 0] [--out docs/results/judge_robustness.md]

For every condition of tests/world/independent.py (another renderer's scenes under edges, colour
jitter, JPEG, textures, border cuts, orientations and small gaps; and adversarial images a careful
person rejects) it judges `--n` images and writes a markdown table: for the sure-accept conditions
the agreement (each image with its own prompt and one contrastive prompt; an unsure verdict is a
miss), for the adversarial classes the rejection (not accepted; a hesitation counts), each with a
95% Wilson interval, the unsure share and the goal (98% and 95%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The test set lives with the tests, which measure the judge on it too; both import it from there.
sys.path.insert(0, str(ROOT / "tests" / "world"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import independent  # noqa: E402
from t2i_rl.world import ShapesWorld  # noqa: E402


def table(rows: list[independent.Measurement], n: int, seed: int) -> str:
    lines = [
        f"# Judge robustness: {n} images per condition, seed {seed}",
        "",
        "Sure conditions: agreement of the judge's sure verdict with the truth over each image with its own prompt",
        "and one contrastive prompt (2n pairs; unsure is a miss). Adversarial classes: share not accepted.",
        "",
        "| condition | kind | n | agreement / rejection | 95% interval | unsure | goal | result |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for m in rows:
        lo, hi = m.interval
        lines.append(f"| {m.name} | {m.kind} | {m.n} | {m.rate:.1%} | [{lo:.1%}, {hi:.1%}] | "
                     f"{m.unsure / m.n:.1%} | {m.goal:.0%} | {'pass' if m.passed else 'FAIL'} |")
    passed = sum(m.passed for m in rows)
    lines += ["", f"{passed} of {len(rows)} conditions meet their goal.", "", "How each condition is drawn:", ""]
    lines += [f"- {c.name}: {c.description}" for c in independent.conditions().values()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "judge_robustness.md")
    args = parser.parse_args()
    world = ShapesWorld()
    rows = []
    for name in independent.conditions():
        start = time.perf_counter()
        rows.append(independent.measure(name, args.n, args.seed, world))
        print(f"{rows[-1].summary()} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, args.n, args.seed))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
