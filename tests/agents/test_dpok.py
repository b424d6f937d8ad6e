"""DPOK: the loss by hand, one update on a tiny pipeline, the KL at the reference, config checks."""

import math

import pytest
import torch

from agents.dpok import DPOKAgent, DPOKConfig, dpok_loss


def make_agent(**overrides):
    import envs
    from t2i_rl.models import build_pipeline
    from t2i_rl.rewards import ShapesCLIP

    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    env = envs.DenoiseVectorEnv(num_envs=2, pipeline=pipe, reward=ShapesCLIP.build(seed=0), num_steps=2)
    policy = env.policy(lora_rank=4)
    cfg = DPOKConfig(**{"samples_per_epoch": 2, "train_batch_size": 2, **overrides})
    agent = DPOKAgent(cfg, env, policy)
    agent.seed(0)
    return agent


def test_dpok_loss_matches_a_hand_computation():
    log_prob = torch.tensor([0.1, -0.2, 0.0], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, -2.0, 0.5])
    kl = torch.tensor([0.3, 0.1, 0.2])
    loss, stats = dpok_loss(log_prob, old, adv, kl, beta=0.5, clip_range=0.15)
    # ratios e^0.1 = 1.105 (inside [0.85, 1.15]), e^-0.2 = 0.819 (clipped to 0.85), 1
    r0, r1 = math.exp(0.1), math.exp(-0.2)
    terms = [max(-1.0 * r0, -1.0 * r0), max(2.0 * r1, 2.0 * 0.85), max(-0.5, -0.5)]
    policy = sum(terms) / 3  # (-1.10517 + 1.7 - 0.5) / 3
    assert stats["policy"].item() == pytest.approx(policy, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.2, abs=1e-6)
    assert stats["kl_term"].item() == pytest.approx(0.1, abs=1e-6)
    assert loss.item() == pytest.approx(policy + 0.5 * 0.2, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.04 + 0.0) / 3, abs=1e-7)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # gradient: -A r / B inside the clip range (and where clipping is not pessimistic), 0 where clipped
    loss.backward()
    assert torch.allclose(log_prob.grad, torch.tensor([-r0 / 3, 0.0, -0.5 / 3]), atol=1e-6)


def test_dpok_loss_at_ratio_one_is_the_policy_gradient():
    log_prob = torch.tensor([-1.0, 0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = dpok_loss(log_prob, log_prob.detach(), adv, torch.zeros(2), beta=0.01, clip_range=1e-4)
    loss.backward()
    assert torch.allclose(log_prob.grad, -adv / 2)  # grad of -(adv * log_prob).mean()
    loss_inf, _ = dpok_loss(log_prob, log_prob.detach() - 1.0, adv, torch.zeros(2), beta=0.0,
                            clip_range=float("inf"))
    assert loss_inf.item() == pytest.approx((-(adv * math.e)).mean().item())  # unclipped importance weight


@pytest.mark.parametrize("score_pool", [1, 4])  # 4: the pooled action's log-probs, the KL of the whole step
def test_update_changes_parameters_and_kl_is_zero_at_the_reference(score_pool):
    agent = make_agent(kl_beta=1.0, score_pool=score_pool)
    # a fresh LoRA policy (B = 0) is the reference model: the per-step KL is exactly 0
    rollout = agent.collect()
    _, kl = agent.policy.log_prob_and_kl(rollout.latents[:, 0], rollout.latents[:, 1], 0, rollout.embeds)
    assert torch.equal(kl, torch.zeros_like(kl))
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(rollout)  # one minibatch: evaluated before the optimizer step
    assert stats["loss/kl"] == 0.0 and stats["policy/kl_to_ref"] == 0.0
    assert stats["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)  # ratio 1: old log-probs as re-evaluated
    assert {"loss/policy", "policy/approx_kl", "policy/clipfrac", "policy/grad_norm"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    after = agent.policy.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the update changed nothing"
    # after the step the policy has moved off the reference: the KL is now positive
    _, kl = agent.policy.log_prob_and_kl(rollout.latents[:, 0], rollout.latents[:, 1], 0, rollout.embeds)
    assert kl.min() > 0


@pytest.mark.parametrize("key, value", [
    ("kl_beta", -0.1), ("kl_beta", float("inf")), ("clip_range", 0.0), ("adv_clip_max", 0.0),
    ("inner_epochs", 0), ("timestep_fraction", 0.0), ("timestep_fraction", 1.5),
])
def test_bad_config_values_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"agent.{key} = "):
        DPOKConfig(**{key: value})
