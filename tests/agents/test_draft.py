import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from agents.draft import DRaFTAgent, DRaFTConfig
from t2i_rl.rewards import GoldReward

STEPS = 3
PROMPTS = ["a red circle on a white background", "two blue squares on a black background"]


def agent_grads(agent, k, seed=0):
    agent.generator.manual_seed(seed)
    embeds = agent.policy.encode_prompts(PROMPTS)
    loss, _, _ = agent.draft_step(PROMPTS, embeds, k)
    grads = torch.autograd.grad(loss, agent.params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(agent.params, grads)]


def test_one_update_changes_lora_only(tiny_agent, frozen_weights):
    agent = tiny_agent(DRaFTAgent, k_last=2, kl_coef=0.1)
    pipe = agent.policy.pipe
    frozen = frozen_weights(pipe)
    lora = [p.detach().clone() for p in agent.params]
    stats = agent.update(agent.collect())
    assert {"loss/draft", "reward/train_step_proxy", "policy/grad_norm"} <= set(stats)
    assert stats["loss/draft"] == pytest.approx(-stats["reward/train_step_proxy"])
    assert any(not torch.equal(a, b) for a, b in zip(agent.params, lora))
    now = frozen_weights(pipe)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())


def test_checkpointing_gives_the_same_gradient(tiny_agent):
    agent = tiny_agent(DRaFTAgent, k_last=STEPS, kl_coef=0.1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in agent.params:
            p.add_(0.05 * torch.randn_like(p))  # a nonzero KL term too
    loss_ckpt, with_ckpt = agent_grads(agent, STEPS)
    agent.cfg.gradient_checkpointing = False
    loss_plain, without = agent_grads(agent, STEPS)
    assert loss_ckpt.item() == pytest.approx(loss_plain.item(), abs=1e-6)
    assert any(g.abs().sum() > 0 for g in without)
    for a, b in zip(with_ckpt, without):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_k1_gradient_equals_a_manual_last_step_only_computation(tiny_agent, clip, monkeypatch):
    agent = tiny_agent(DRaFTAgent, k_last=1)
    policy = agent.policy
    calls = []
    original = policy.noise_pred

    def spy(latents, step_index, embeds, reference=False):
        calls.append((step_index, torch.is_grad_enabled()))
        return original(latents, step_index, embeds, reference)

    monkeypatch.setattr(policy, "noise_pred", spy)
    loss, grads = agent_grads(agent, 1, seed=3)
    # only the last step ran with gradients (forward and its checkpoint recomputation)
    assert {i for i, grad in calls if grad} == {STEPS - 1}
    assert {i for i, grad in calls if not grad} == set(range(STEPS - 1))

    # by hand: the same random draws, the first T-1 steps under no_grad, the last one with grad
    g = torch.Generator().manual_seed(3)
    embeds = policy.encode_prompts(PROMPTS)
    x = randn_tensor((2, *agent.env.latent_shape), generator=g, dtype=torch.float32)
    with torch.no_grad():
        for i in range(STEPS - 1):
            x, _ = policy.sample_step(x, i, embeds, generator=g)
    mean, std = policy.step_stats(x, STEPS - 1, embeds)
    x0 = mean + std * randn_tensor(x.shape, generator=g, dtype=torch.float32)
    want_loss = -clip(policy.decode(x0), PROMPTS).scores.mean()
    want = torch.autograd.grad(want_loss, agent.params, allow_unused=True)
    want = [torch.zeros_like(p) if w is None else w for p, w in zip(agent.params, want)]
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-6)
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # and the full chain's gradient differs: the earlier steps would have contributed
    _, full = agent_grads(agent, STEPS, seed=3)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(full, want))


def test_randomized_truncation_draws_k_in_range(tiny_agent):
    agent = tiny_agent(DRaFTAgent, k_last=STEPS, truncated_backprop_random=True)
    ks = {agent.draw_k() for _ in range(60)}
    assert ks == set(range(1, STEPS + 1))
    agent.cfg.truncated_backprop_random = False
    assert agent.draw_k() == STEPS


def test_non_differentiable_reward_is_refused(tiny_agent):
    with pytest.raises(ValueError, match="'gold'.*not differentiable"):
        tiny_agent(DRaFTAgent, reward=GoldReward())


def test_k_beyond_the_chain_is_refused(tiny_agent):
    with pytest.raises(ValueError, match="agent.k_last"):
        tiny_agent(DRaFTAgent, k_last=STEPS + 1)


@pytest.mark.parametrize("field, value", [("k_last", 0), ("k_last", 1.5), ("reward_scale", 0.0),
                                          ("reward_scale", float("inf")), ("truncated_backprop_random", "yes"),
                                          ("gradient_checkpointing", 1), ("train_batch_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"agent.{field}"):
        DRaFTConfig(**{field: value})
