"""One process of tests/test_distributed.py, started by `accelerate launch --num_processes 2`.

`python tests/distributed_worker.py JOBS.json` runs, in this rank, every job of the file in order
(every rank runs the same jobs: each is a collective) and writes what the test compares to
`<out>.rank<R>.pt`:
- {"kind": "helpers", "out": PATH}: t2i_rl.distributed's gather, gather_to_main, local_rows,
  average_gradients and mean_metrics on values that depend on the rank;
- {"kind": "train", "overrides": [...], "reward": {...}, "out": PATH}: a Trainer on the composed
  configs (the tiny models' reward in env.reward), fit; then its trained weights (LoRA or the whole
  UNet, named as in the checkpoint's safetensors) before and after, its metrics, how many
  parameters' optimizer states this rank holds and their size, its DeepSpeed ZeRO stage (0: none),
  one more rollout's prompts and x_T, and the advantages of that rollout next to those one process
  computes on every rank's samples (DDPO).
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def helpers() -> dict:
    from t2i_rl import distributed

    r = distributed.rank()
    gathered = distributed.gather(torch.tensor([float(r), r + 10.0]))
    # grads: rank-dependent on `both`; only rank 1 has one on `one`; no rank has one on `none`
    both, one, none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), r + 1.0)
    if r == 1:
        one.grad = torch.full((3,), 4.0)
    distributed.average_gradients([both, one, none])
    return {
        "gathered": gathered, "local_rows": distributed.local_rows(gathered),
        "gather_list": distributed.gather_list([f"p{r}"]),
        "grads": [both.grad, one.grad, none.grad],
        "metrics": distributed.mean_metrics({"a": float(r), **({"b": 5.0} if r == 0 else {})}),
        "seeds": distributed.gather_objects(distributed.rank_seed(7)),
        "to_main": distributed.gather_to_main({"rank": torch.tensor([r])}),
    }


def train(job: dict) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from hydra import compose, initialize_config_dir
    from peft import get_peft_model_state_dict

    from t2i_rl import distributed
    from t2i_rl.train import CONFIG_DIR, Trainer

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=job["overrides"])
    cfg.env.reward = job["reward"]
    trainer = Trainer(cfg)

    def weights() -> dict[str, torch.Tensor]:
        unet = trainer.policy.unet
        trained = (unet.state_dict() if trainer.policy.lora_rank is None
                   else convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
        return {k: v.detach().clone() for k, v in trained.items()}

    initial = weights()
    metrics = trainer.fit()
    agent = trainer.agent
    # the AdamW this rank steps: a ZeroRedundancyOptimizer's own shard, DeepSpeed's partition, or the whole
    local = getattr(agent.optimizer, "optim", None) or getattr(agent.optimizer, "optimizer", agent.optimizer)
    out = {"initial": initial, "weights": weights(), "metrics": metrics, "optimizer_states": len(local.state),
           "optimizer_numel": sum(s["exp_avg"].numel() for s in local.state.values()),
           "zero_stage": agent.engine.zero_optimization_stage() if agent.engine is not None else 0,
           "num_envs": trainer.env.num_envs}
    tracker = copy.deepcopy(getattr(agent, "tracker", None))
    rollout = agent.collect()
    out["prompts"], out["x_T"] = rollout.prompts, rollout.latents[:, 0]
    if cfg.agent.name == "ddpo":  # this rank's advantages, and one process's on every rank's samples
        out["advantages"] = distributed.gather(agent.advantages(rollout))
        prompts, rewards = distributed.gather_list(rollout.prompts), distributed.gather(rollout.rewards)
        from agents.base import per_prompt_normalize

        # one process's rule on the whole batch: group-relative (GRPO-style groups) or running statistics
        whole = per_prompt_normalize(prompts, rewards) if agent.cfg.group_size else tracker.update(prompts, rewards)
        out["one_process_advantages"] = whole.clamp(-agent.cfg.adv_clip_max, agent.cfg.adv_clip_max)
    return out


def main(path: str) -> None:
    from t2i_rl import distributed

    distributed.init("cpu")
    for job in json.loads(open(path).read()):
        result = helpers() if job["kind"] == "helpers" else train(job)
        torch.save(result, f"{job['out']}.rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
