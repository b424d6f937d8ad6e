"""What the MDP costs over plain sampling: a batched episode through the vector env (with the
policy's log-probs and the env's reward) against `StableDiffusionPipeline.__call__` with the same
steps, batch, eta and guidance, interleaved in one process. The last line is the median ratio
env/pipeline (goal: at most 1.10).

    python benchmarks/rollout_overhead.py [--batch 16] [--steps 20] [--reps 5] [--reward SPEC]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from envs import DenoiseVectorEnv
from t2i_rl.models import load_pipeline
from t2i_rl.rewards import make_reward


@torch.no_grad()
def env_episode(env: DenoiseVectorEnv, policy, seed: int) -> float:
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for i in range(policy.num_steps):
        action, _log_prob = policy.sample_step(obs["latents"], i, obs["prompt_embeds"], generator=gen)
        obs, rewards, *_ = env.step(action)
    assert torch.isfinite(rewards).all()
    return time.perf_counter() - start


@torch.no_grad()
def pipeline_call(pipe, prompts: list[str], steps: int, guidance: float, eta: float, seed: int) -> float:
    start = time.perf_counter()
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=eta, output_type="pt",
         generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--reward", default='{"name": "textnorm", "base": "clip", "tau": 0.02}',
                   help="reward spec (name or JSON) scored by the env at the last step")
    args = p.parse_args()
    spec = json.loads(args.reward) if args.reward.startswith("{") else args.reward
    pipe = load_pipeline(args.model)
    env = DenoiseVectorEnv(num_envs=args.batch, pipeline=pipe, reward=make_reward(spec), gold=None,
                           num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta)
    policy = env.policy(lora_rank=None)
    env.reset(seed=0)
    prompts = list(env.prompts)
    # warm-up both paths once (allocator, caches)
    env_episode(env, policy, 0)
    pipeline_call(pipe, prompts, args.steps, args.guidance, args.eta, 0)
    env_times, pipe_times = [], []
    for rep in range(1, args.reps + 1):
        env_times.append(env_episode(env, policy, rep))
        pipe_times.append(pipeline_call(pipe, prompts, args.steps, args.guidance, args.eta, rep))
        print(f"rep {rep}: env {env_times[-1]:.3f} s  pipeline {pipe_times[-1]:.3f} s  "
              f"ratio {env_times[-1] / pipe_times[-1]:.3f}", flush=True)
    ratios = [e / q for e, q in zip(env_times, pipe_times)]
    print(f"batch {args.batch}, {args.steps} steps, guidance {args.guidance}, eta {args.eta}, reward {spec}")
    print(f"median env {statistics.median(env_times):.3f} s, pipeline {statistics.median(pipe_times):.3f} s")
    print(f"ratio env/pipeline (median of {args.reps}): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
