"""Judge a pipeline on held-out prompts: `python -m t2i_rl.evaluate [--model shapes] [--n 512]`.

Prints the judge's per-attribute accuracy and all-correct rate (the base-model table of the
README) and the sampling speed in images per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .world import ATTRIBUTES, ShapesWorld


@dataclass
class Evaluation:
    n: int
    steps: int
    guidance: float
    eta: float
    accuracy: dict[str, float]  # attribute -> fraction right, plus "all_correct", "unsure" and "score"
    images_per_s: float


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, eta: float, batch: int,
             seed: int) -> tuple[torch.Tensor, float]:
    """Images [N, 3, H, W] in [0, 1] from the pipeline's own sampler, and images per second."""
    images, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                   output_type="pt", generator=gen)
        images.append(out.images.float().cpu())
    return torch.cat(images), len(prompts) / (time.perf_counter() - start)


def evaluate_pipeline(pipe, world: ShapesWorld, n: int = 512, steps: int = 20, guidance: float = 5.0,
                      eta: float = 1.0, batch: int = 32, seed: int = 0) -> Evaluation:
    prompts = world.sample_prompts(n, seed=seed, split="heldout")
    images, speed = generate(pipe, prompts, steps, guidance, eta, batch, seed)
    result = world.judge(images, prompts)
    # rates over the images the judge is sure about (of that attribute; of every attribute for
    # all-correct), and the share it hesitates on beside them
    acc = {a: result.attributes[a][~result.unsure[a]].float().mean().item() for a in ATTRIBUTES}
    acc["all_correct"] = result.correct[result.sure].float().mean().item()
    acc["unsure"] = 1.0 - result.sure.float().mean().item()
    acc["score"] = result.score.mean().item()
    return Evaluation(n, steps, guidance, eta, acc, speed)


def markdown(rows: list[Evaluation]) -> str:
    cols = [*ATTRIBUTES, "all_correct", "unsure", "score"]
    lines = ["| steps | guidance | eta | n | " + " | ".join(cols) + " | images/s |",
             "|---" * (len(cols) + 5) + "|"]
    for r in rows:
        cells = " | ".join(f"{100 * r.accuracy[c]:.1f}%" if c != "score" else f"{r.accuracy[c]:.3f}"
                           for c in cols)
        lines.append(f"| {r.steps} | {r.guidance:g} | {r.eta:g} | {r.n} | {cells} | {r.images_per_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .models import load_pipeline

    p = argparse.ArgumentParser(prog="python -m t2i_rl.evaluate", description=__doc__)
    p.add_argument("--model", default="shapes", help="shipped name, local folder or hub id")
    p.add_argument("--n", type=int, default=512, help="held-out prompts (one image each)")
    p.add_argument("--steps", type=int, nargs="+", default=[20])
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    p.add_argument("--eta", type=float, nargs="+", default=[1.0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or min(args.steps) < 1:
        print("error: --n, --batch and --steps must be >= 1", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model)
    world = ShapesWorld()
    rows = [evaluate_pipeline(pipe, world, args.n, s, g, e, args.batch, args.seed)
            for s in args.steps for g in args.guidance for e in args.eta]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
