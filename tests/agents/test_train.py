"""Every agent x env pair composes and runs a tiny epoch through the real Hydra configs."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from agents import AGENTS
from t2i_rl.train import CONFIG_DIR, Trainer, group_options, run

ENVS = group_options("env")


def tiny_overrides(assets, run_dir, agent="ddpo", env="textnorm", epochs=1):
    clip = {"name": "clip", "path": assets["clip"]}
    members = [clip, {"name": "lee", "path": assets["lee"]}, {"name": "pairwise", "path": assets["pairwise"]}]
    reward = {
        "raw": clip,
        "textnorm": {"name": "textnorm", "base": clip, "tau": 0.05},
        "ensemble": {"name": "ensemble", "members": members, "mode": "mean_minus_std", "lam": 0.5},
        "textnorm_ensemble": {"name": "textnorm", "base": {"name": "ensemble", "members": members,
                                                          "mode": "mean_minus_std"}, "tau": 0.1},
    }[env]
    return [
        f"agent={agent}", f"env={env}", f"epochs={epochs}", f"output_dir={run_dir}",
        f"model.pipeline={assets['pipeline']}", "env.batch_size=2", "env.num_steps=2",
        "agent.samples_per_epoch=4", "agent.train_batch_size=2",
        "eval.num_prompts=4", "eval.batch_size=4", "eval.every=1", "samples.every=1", "samples.num=4",
        "diagnostics.kl_samples=2",
    ], reward


def compose_cfg(overrides_and_reward):
    """The real configs, with the tiny models' folders in place of the shipped ones."""
    overrides, reward = overrides_and_reward
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.env.reward = reward
    return cfg


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("env", ENVS)
def test_every_agent_env_pair_composes(agent, env):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"agent={agent}", f"env={env}"])
    assert cfg.agent.name == agent and cfg.env.name == env


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("env", ENVS)
def test_every_agent_env_pair_runs_a_tiny_epoch(tiny_assets, tmp_path, agent, env):
    cfg = compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", agent, env))
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    metrics = trainer.fit()
    after = trainer.policy.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the update changed nothing"
    assert torch.isfinite(torch.tensor(metrics["reward/proxy"]))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"reward/proxy", "reward/gold", "eval/gold_correct", "policy/kl_to_base"} <= set(first)
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir()
    assert (tmp_path / "run" / "config.yaml").is_file()
