"""One DDPO epoch, native (agents.ddpo) against TRL's DDPOTrainer (agents.ddpo_trl), side by side.

    python benchmarks/ddpo_vs_trl.py [--pipeline shapes|PATH] [--reward clip|PATH|JSON] [--samples 32]
        [--steps 20] [--guidance 5] [--batch 16] [--train-batch 8] [--reps 3] [--threads N] [--profile]

Both agents get their own copy of the same pipeline (loaded before any timing), the same reward
model, the same prompts and x_T (the env and the agent's generator are reseeded identically in
every repetition), the same sizes and the same DDPO settings. Repetitions alternate which agent goes
first. Per run: collect (sampling + reward + gold judge) and update (the PPO epoch), with the
reward and the judge timed inside the env, so sampling = collect - reward - gold. The last line is
`ratio native/trl (median of N): X` (X < 1: the native agent is faster).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.ddpo import DDPOAgent, DDPOConfig  # noqa: E402
from agents.ddpo_trl import TRLDDPOAgent, TRLDDPOConfig  # noqa: E402

KINDS = {"native": (DDPOAgent, DDPOConfig), "trl": (TRLDDPOAgent, TRLDDPOConfig)}


class Timed:
    """A reward callable that adds up the seconds spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, images, prompts):
        start = time.perf_counter()
        try:
            return self.fn(images, prompts)
        finally:
            self.seconds += time.perf_counter() - start


def reward_spec(text: str):
    """A reward name ("clip"), a folder of a CLIP-style model, or a JSON spec for make_reward."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    if Path(text).is_dir():
        return {"name": "clip", "path": text}
    return text


def default_pipeline() -> str | None:
    from t2i_rl.models import SHIPPED_PIPELINES

    path = SHIPPED_PIPELINES.get("shapes")
    return "shapes" if path and Path(path).is_dir() else None


def default_reward() -> str | None:
    from t2i_rl.rewards import REWARD_ASSETS

    return "clip" if (REWARD_ASSETS / "clip" / "config.json").is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=None, help="'shapes' (shipped, the default when present) or a folder")
    p.add_argument("--reward", default=None, help="reward: 'clip' (shipped, the default when present), a "
                                                  "CLIP-style model folder, or a JSON spec for make_reward")
    p.add_argument("--no-gold", action="store_true", help="skip the gold judge (diagnostic) in both agents")
    p.add_argument("--samples", type=int, default=32, help="images per epoch")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--batch", type=int, default=16, help="sampling batch (env batch); capped at --samples")
    p.add_argument("--train-batch", type=int, default=8, help="training minibatch; capped at --batch")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the policy")
    p.add_argument("--reps", type=int, default=3, help="repetitions per agent (at least 1; 3+ for a median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one cProfile'd epoch per agent: top entries by cumulative time")
    p.add_argument("--profile-top", type=int, default=25, help="entries printed per profile")
    args = p.parse_args(argv)
    args.pipeline = args.pipeline or default_pipeline()
    args.reward = args.reward or default_reward()
    if args.pipeline is None:
        p.error("the shipped pipeline t2i_rl/assets/shapes-sd is missing: pass --pipeline PATH")
    if args.reward is None:
        p.error("the shipped CLIP-style reward is missing: pass --reward PATH or a JSON spec")
    if args.reps < 1 or args.samples < 1 or args.steps < 1:
        p.error("--reps, --samples and --steps must be >= 1")
    args.batch = min(args.batch, args.samples)
    args.train_batch = min(args.train_batch, args.batch)
    if args.samples % args.batch or args.batch % args.train_batch:
        p.error(f"--samples ({args.samples}) must be a multiple of --batch ({args.batch}), and --batch of "
                f"--train-batch ({args.train_batch})")
    return args


def build(kind: str, args) -> tuple:
    """Pipeline, reward, env, policy and agent of one kind (never timed)."""
    from envs import DenoiseVectorEnv
    from t2i_rl.models import load_pipeline
    from t2i_rl.rewards import make_reward

    pipe = load_pipeline(args.pipeline)
    reward = Timed(make_reward(reward_spec(args.reward)))
    gold = None if args.no_gold else Timed(make_reward("gold"))
    env = DenoiseVectorEnv(num_envs=args.batch, pipeline=pipe, reward=reward, gold=gold, num_steps=args.steps,
                           guidance_scale=args.guidance, eta=args.eta)
    policy = env.policy(lora_rank=args.lora_rank)
    cls, cfg_cls = KINDS[kind]
    cfg = cfg_cls(samples_per_epoch=args.samples, train_batch_size=args.train_batch, lora_rank=args.lora_rank)
    return cls(cfg, env, policy), reward, gold


def epoch(agent, reward: Timed, gold: Timed | None, seed: int) -> dict[str, float]:
    agent.seed(seed)
    reward.seconds = 0.0
    if gold is not None:
        gold.seconds = 0.0
    start = time.perf_counter()
    rollout = agent.collect()
    collected = time.perf_counter()
    agent.update(rollout)
    done = time.perf_counter()
    gold_s = gold.seconds if gold is not None else 0.0
    collect_s = collected - start
    return {"collect": collect_s, "sampling": collect_s - reward.seconds - gold_s, "reward": reward.seconds,
            "gold": gold_s, "update": done - collected, "total": done - start,
            "proxy": rollout.rewards.mean().item()}


def profile(agent, reward, gold, seed: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    row = epoch(agent, reward, gold, seed)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    phases = ", ".join(f"{k} {row[k]:.2f}s" for k in ("sampling", "reward", "gold", "update", "total"))
    return f"phases (under the profiler): {phases}\n{out.getvalue()}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"pipeline {args.pipeline} | reward {args.reward} | {args.samples} samples x {args.steps} steps, "
          f"guidance {args.guidance}, batch {args.batch}, train batch {args.train_batch}, LoRA {args.lora_rank} | "
          f"torch threads {torch.get_num_threads()}", flush=True)
    built = {kind: build(kind, args) for kind in KINDS}

    rows: list[tuple[int, str, dict[str, float]]] = []
    header = f"{'rep':>3} {'agent':<6} {'sampling':>9} {'reward':>8} {'gold':>7} {'update':>8} {'total':>8} {'proxy':>8}"
    print(header)
    for rep in range(args.reps):
        order = list(KINDS) if rep % 2 == 0 else list(reversed(KINDS))
        for kind in order:
            row = epoch(*built[kind], seed=args.seed + rep)
            rows.append((rep, kind, row))
            print(f"{rep:>3} {kind:<6} {row['sampling']:>9.2f} {row['reward']:>8.2f} {row['gold']:>7.2f} "
                  f"{row['update']:>8.2f} {row['total']:>8.2f} {row['proxy']:>8.4f}", flush=True)

    if args.profile:
        for kind in KINDS:
            print(f"\n=== profile: {kind} ===")
            print(profile(*built[kind], seed=args.seed, top=args.profile_top))

    totals = {kind: [r["total"] for _, k, r in rows if k == kind] for kind in KINDS}
    print("\nmedian seconds per epoch: " + ", ".join(
        f"{kind} {statistics.median(totals[kind]):.2f} "
        f"(sampling {statistics.median(r['sampling'] for _, k, r in rows if k == kind):.2f}, "
        f"update {statistics.median(r['update'] for _, k, r in rows if k == kind):.2f})" for kind in KINDS))
    ratios = [n / t for n, t in zip(totals["native"], totals["trl"])]
    print(f"ratio native/trl (median of {len(ratios)}): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
