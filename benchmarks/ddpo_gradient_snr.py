"""How much signal a DDPO gradient carries, and which denoising steps it comes from.

    python benchmarks/ddpo_gradient_snr.py [--samples 64] [--estimates 4] [--train-steps 0 4 2]
        [--score-pool 1] [--antithetic] [--group-size 8] [--steps 10] [--prompts composition-train]
        [--reward textnorm] [--threads N]

Two measurements on the base model, the baseline of each being the same quantity computed the
other way in the same process:

1. Step sensitivity. For each denoising step t, the reward's variance within a prompt when only
   the noise drawn at step t is redrawn (x_T and every other step's noise fixed), against the
   variance when all of it is redrawn. Steps whose noise barely moves the reward give the
   score-function gradient nothing but noise, and their small sigma_t makes that noise large:
   this is what `agent.train_steps` (train on the first k steps only) is for.
2. Gradient agreement. DDPO gradients from independent rollouts of `--samples` images (GRPO groups,
   so that prompt difficulty is not in the advantages) for each `--train-steps` setting; the
   mean pairwise cosine estimates |g|^2 / (|g|^2 + noise^2 / N). Near 0: one optimizer step is a
   random direction, and the policy random-walks away from the base model (KL grows, reward does
   not). The last line is the cosine of each setting. `--score-pool 1 4` compares the gradient of
   the whole action's log-prob with that of its 4 x 4 average pools (`agent.score_pool`) on the same
   rollouts; `--reward gold` takes the judge's score, so that the reward is not what is measured.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agents.ddpo import DDPOAgent, DDPOConfig  # noqa: E402

REWARDS = {"textnorm": {"name": "textnorm", "base": "clip", "tau": 0.02}, "raw": "clip", "gold": "gold"}


class GradientProbe(DDPOAgent):
    """DDPO whose optimizer step records the accumulated gradient instead of stepping."""

    gradient: torch.Tensor

    def optimizer_step(self, loss: torch.Tensor) -> float:
        loss.backward()
        self.gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                   for p in self.params])
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.gradient.norm())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64, help="images per gradient estimate")
    p.add_argument("--estimates", type=int, default=4, help="independent gradient estimates (>= 2)")
    p.add_argument("--train-steps", type=int, nargs="+", default=[0, 4, 2], help="agent.train_steps settings")
    p.add_argument("--score-pool", type=int, nargs="+", default=[1], help="agent.score_pool settings")
    p.add_argument("--antithetic", action="store_true", help="mirrored pairs (agent.antithetic=true)")
    p.add_argument("--group-size", type=int, default=8, help="GRPO group size of the rollouts")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--prompts", default="composition-train", help="env.prompts")
    p.add_argument("--reward", default="textnorm", choices=sorted(REWARDS))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--sensitivity-prompts", type=int, default=16,
                   help="prompts of the step-sensitivity table (0: no table)")
    p.add_argument("--redraws", type=int, default=4, help="redraws per prompt in the step-sensitivity table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.estimates < 2 or args.samples < 1 or args.redraws < 2:
        p.error("--estimates and --redraws must be >= 2, --samples >= 1")
    if args.group_size and args.samples % args.group_size:
        p.error(f"--samples ({args.samples}) must be a multiple of --group-size ({args.group_size})")
    if args.antithetic and (len(args.train_steps) > 1 or not args.group_size or args.group_size % 2):
        p.error("--antithetic needs one --train-steps setting (the steps it mirrors) and an even --group-size")
    if args.sensitivity_prompts < 0 or any(k < 1 for k in args.score_pool):
        p.error("--sensitivity-prompts must be >= 0 and --score-pool >= 1")
    if any(k < 0 or k > args.steps for k in args.train_steps):
        p.error(f"--train-steps must lie in [0, --steps ({args.steps})]")
    return args


@torch.no_grad()
def step_sensitivity(env, policy, prompts: list[str], redraws: int, seed: int) -> list[float]:
    """Mean within-prompt reward variance when only step t's noise is redrawn, for each t, and
    last the variance when every step's noise is redrawn (x_T fixed per prompt)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [p for p in prompts for _ in range(redraws)]
    embeds = policy.encode_prompts(rows).float()
    shape = (len(prompts), 1, *env.latent_shape)

    def shared(x: torch.Tensor) -> torch.Tensor:  # one draw per prompt, repeated over its redraws
        return x.expand(-1, redraws, -1, -1, -1).reshape(len(rows), *env.latent_shape)

    x_T = shared(torch.randn(shape, generator=gen)) * env.pipe.scheduler.init_noise_sigma
    fixed = [shared(torch.randn(shape, generator=gen)) for _ in range(policy.num_steps)]
    out = []
    for redrawn in [*range(policy.num_steps), None]:
        x = x_T
        for i in range(policy.num_steps):
            mean, std = policy.step_stats(x, i, embeds)
            noise = torch.randn(x.shape, generator=gen) if redrawn in (i, None) else fixed[i]
            x = mean + std * noise
        scores = env.reward_fn(env.decode(x), rows).scores.float().view(len(prompts), redraws)
        out.append(scores.var(1, unbiased=False).mean().item())
    return out


def main(argv=None) -> None:
    from envs import DenoiseVectorEnv

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batch = args.group_size or 16
    env = DenoiseVectorEnv(num_envs=min(batch, args.samples), pipeline="shapes", reward=REWARDS[args.reward],
                           gold=None, prompts=args.prompts, num_steps=args.steps)
    policy = env.policy(lora_rank=args.lora_rank)
    print(f"{args.reward} reward | {args.prompts} | {args.steps} DDIM steps | {args.samples} samples per "
          f"estimate, GRPO groups of {args.group_size} | LoRA {args.lora_rank} | torch threads "
          f"{torch.get_num_threads()}", flush=True)

    if args.sensitivity_prompts:
        prompts = env.prompt_source(args.sensitivity_prompts, np.random.default_rng(args.seed))
        sens = step_sensitivity(env, policy, prompts, args.redraws, args.seed)
        print(f"\nreward variance within a prompt ({args.sensitivity_prompts} prompts x {args.redraws} redraws, "
              "x_T fixed)")
        print(f"{'noise redrawn':<16}{'variance':>10}{'share':>8}")
        for t, v in enumerate(sens):
            share = f"{v / sens[-1]:>8.2f}" if sens[-1] > 0 else f"{'-':>8}"
            print(f"{'step ' + str(t) if t < len(sens) - 1 else 'every step':<16}{v:>10.4f}{share}", flush=True)

    cfg = dict(samples_per_epoch=args.samples, train_batch_size=args.samples, group_size=args.group_size,
               lora_rank=args.lora_rank, antithetic=args.antithetic, train_steps=args.train_steps[0])
    probe = GradientProbe(DDPOConfig(**cfg), env, policy)
    rollouts = []
    for e in range(args.estimates):
        probe.seed(args.seed + 1 + e)
        rollouts.append(probe.collect())
    print(f"\ngradient agreement ({args.estimates} independent rollouts of {args.samples} samples)")
    print(f"{'train_steps':<12}{'pool':>5}{'mean cos':>10}{'min':>8}{'max':>8}{'|g|':>10}")
    summary = []
    for k, pool in itertools.product(args.train_steps, args.score_pool):
        probe = GradientProbe(DDPOConfig(**{**cfg, "train_steps": k, "score_pool": pool}), env, policy)
        grads = []
        for rollout in rollouts:
            probe.update(rollout)
            grads.append(probe.gradient)
        cos = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)]
        norm = statistics.mean(g.norm().item() for g in grads)
        label = str(k) if k else f"0 (all {args.steps})"
        print(f"{label:<12}{pool:>5}{statistics.mean(cos):>10.3f}{min(cos):>8.3f}{max(cos):>8.3f}{norm:>10.4f}",
              flush=True)
        summary.append(f"train_steps={k} score_pool={pool} {statistics.mean(cos):.3f}")
    print("mean pairwise cosine: " + ", ".join(summary))


if __name__ == "__main__":
    main()
