"""RWR (Lee et al. 2023): weights and the weighted loss by hand, updates on a tiny pipeline with
ShapesWorld and image-folder pre-training data, config checks."""

import json
import math

import numpy as np
import pytest
import torch

from agents.rwr import CaptionFolder, RWRAgent, RWRConfig, reward_weights, weighted_denoising_loss


def make_agent(**overrides):
    import envs
    from t2i_rl.models import build_pipeline
    from t2i_rl.rewards import ShapesCLIP

    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    env = envs.DenoiseVectorEnv(num_envs=2, pipeline=pipe, reward=ShapesCLIP.build(seed=0), num_steps=2)
    policy = env.policy(lora_rank=4)
    cfg = RWRConfig(**{"samples_per_epoch": 2, "train_batch_size": 2, "pretrain_batch_size": 2, **overrides})
    agent = RWRAgent(cfg, env, policy)
    agent.seed(0)
    return agent


def test_weighted_denoising_loss_matches_a_hand_computation():
    pred = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    # per-sample mean squared error: (1 + 4) / 2 = 2.5 and (4 + 4) / 2 = 4
    assert weighted_denoising_loss(pred, target).item() == pytest.approx((2.5 + 4.0) / 2)
    weights = torch.tensor([0.5, 2.0])
    assert weighted_denoising_loss(pred, target, weights).item() == pytest.approx((0.5 * 2.5 + 2.0 * 4.0) / 2)


def test_reward_weights():
    r = torch.tensor([0.3, -0.2, 0.9])
    assert torch.allclose(reward_weights(r, "reward"), torch.tensor([0.3, 0.0, 0.9]))
    w = reward_weights(torch.tensor([0.0, 0.1 * math.log(3.0)]), "softmax", temperature=0.1)
    assert torch.allclose(w, torch.tensor([0.5, 1.5]))  # 2 * softmax([0, ln 3]) = 2 * [1/4, 3/4]
    with pytest.raises(ValueError, match="weighting"):
        reward_weights(r, "rank")


def changed(agent, before):
    return any(not torch.equal(a, b) for a, b in zip(agent.policy.trainable_parameters(), before))


def test_reward_weighted_term_alone_updates_the_policy():
    agent = make_agent(weighting="softmax", temperature=0.1, pretrain_beta=0.0)
    assert agent.pretrain_data is None
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(agent.collect())
    assert "loss/pretrain" not in stats and stats["loss/reward_weighted"] > 0
    assert stats["rwr/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert changed(agent, before)


def test_update_with_shapes_pretrain_data():
    agent = make_agent(weighting="reward", pretrain_beta=1.0, pretrain_data="shapes")
    latents, embeds = agent.pretrain_batch()
    assert latents.shape == (2, *agent.env.latent_shape) and embeds.shape[0] == 2
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(agent.collect())
    assert {"loss/reward_weighted", "loss/pretrain", "policy/grad_norm"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values()) and stats["loss/pretrain"] > 0
    assert changed(agent, before)


def test_caption_folder_pretrain_data(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # not square
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).convert("L").save(tmp_path / "b.jpg")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "one red circle", "b.jpg": "two blue squares"}))
    folder = CaptionFolder(tmp_path, resolution=32)
    image = folder.load(0)
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert folder.load(1).shape == (3, 32, 32)  # grayscale -> RGB
    agent = make_agent(pretrain_data=str(tmp_path))
    assert isinstance(agent.pretrain_data, CaptionFolder)
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(agent.collect())
    assert math.isfinite(stats["loss/pretrain"]) and changed(agent, before)


@pytest.mark.parametrize("key, value", [
    ("weighting", "rank"), ("temperature", 0.0), ("pretrain_beta", -1.0), ("pretrain_batch_size", 0),
    ("pretrain_data", "/nonexistent/folder"), ("inner_epochs", 0),
])
def test_bad_config_values_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"agent.{key} = "):
        RWRConfig(**{key: value})


def test_group_top_keeps_the_best_share_of_each_group():
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.8, 0.0])  # two groups of 4
    w = reward_weights(r, "group_top", group_size=4, top_fraction=0.5)
    assert w.tolist() == [0.0, 2.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0]  # a tie keeps the earlier row
    assert w.mean().item() == pytest.approx(1.0)
    assert reward_weights(r, "group_top", group_size=4, top_fraction=0.1).tolist() == [0, 4, 0, 0, 0, 0, 4, 0]
    with pytest.raises(ValueError, match="group_top needs groups of >= 2 dividing the 8 rewards, got 3"):
        reward_weights(r, "group_top", group_size=3)


def test_group_top_collects_groups_and_trains_on_the_kept_samples_alone():
    agent = make_agent(weighting="group_top", group_size=2, top_fraction=0.5, samples_per_epoch=4,
                       train_batch_size=1, pretrain_beta=0.0)
    rollout = agent.collect()
    assert rollout.prompts[0] == rollout.prompts[1] and rollout.prompts[2] == rollout.prompts[3]
    kept = reward_weights(rollout.rewards, "group_top", group_size=2, top_fraction=0.5) > 0
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(rollout)
    assert changed(agent, before)
    assert len(agent.optimizer.state_dict()["state"]) and int(kept.sum()) == 2
    steps = next(iter(agent.optimizer.state_dict()["state"].values()))["step"]
    assert float(steps) == 2  # one optimizer step per kept sample (batch 1), none for the dropped ones
    assert stats["rwr/weight_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("overrides, match", [
    ({"weighting": "group_top"}, "group_top needs agent.group_size >= 2"),
    ({"group_size": 3, "samples_per_epoch": 4}, r"agent.group_size = 3 is invalid.*dividing agent.samples_per_epoch \(4\)"),
    ({"group_size": 1}, "agent.group_size = 1 is invalid"),
    ({"top_fraction": 0.0}, r"agent.top_fraction = 0.0 is invalid.*must be in \(0, 1\]"),
])
def test_group_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        RWRConfig(**overrides)
