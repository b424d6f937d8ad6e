"""Where does a trained adapter act? Evaluate a checkpoint with its LoRA on the first k sampler steps only.

    python benchmarks/adapter_steps.py CHECKPOINT [--steps 1 2 10] [-- training overrides]

DDPO trains the first `agent.train_steps` denoising steps, but its LoRA sits in the one UNet that
every step calls, so it changes the untrained steps too (KL to base counts them all). This
evaluates the checkpoint (a `checkpoints/last` or `best` folder) on the run's fixed-noise training
prompts with the adapter on steps < k and the base model on the rest, for each k: if the side
effects on the untrained steps spoiled the gain, turning them off would raise gold. The config is
the training command's (same overrides), so the evaluation sets and their noise are the run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from t2i_rl.sweep import split_overrides


def adapter_on_first(policy, k: int) -> None:
    """Make `policy` sample with its adapter on steps < k only (the reference model after them)."""
    noise_pred = type(policy).noise_pred

    def gated(latents, step_index, embeds, reference=False):
        late = isinstance(step_index, int) and step_index >= k
        return noise_pred(policy, latents, step_index, embeds, reference or late)
    policy.noise_pred = gated


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder (checkpoints/last or best of a run)")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 10], help="k: the adapter acts on steps < k")
    args = p.parse_args(argv)
    if not (args.checkpoint / "trainer_state.json").is_file():
        p.error(f"not a checkpoint folder (no trainer_state.json): {args.checkpoint}")
    if any(k < 1 for k in args.steps):
        p.error(f"--steps must be >= 1, got {args.steps}")
    from t2i_rl.checkpoint import load_checkpoint
    from t2i_rl.train import Trainer, compose_config

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_config(["eval.num_prompts=0", *extra, f"output_dir={scratch}/run", "resume=false"])
        trainer = Trainer(cfg)
        epoch = load_checkpoint(args.checkpoint, trainer.policy)["epoch"]
        print(f"{args.checkpoint} (epoch {epoch}), {len(trainer.eval_sets['train'][0])} training-prompt images")
        print("| adapter on steps | train all-correct [95%] | train proxy |\n|---|---|---|")
        for k in args.steps:
            adapter_on_first(trainer.policy, k)
            m = trainer.evaluate(epoch)
            print(f"| 0-{k - 1} | {100 * m['eval/train/gold_correct']:.1f}% [{100 * m['eval/train/gold_correct/ci_low']:.1f}, "
                  f"{100 * m['eval/train/gold_correct/ci_high']:.1f}] | {m['eval/train/proxy']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
