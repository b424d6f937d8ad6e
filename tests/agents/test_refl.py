import pytest
import torch

from agents.refl import ReFLAgent, ReFLConfig, kl_penalty_from_mean, refl_loss
from t2i_rl.rewards import GoldReward

STEPS = 3
PROMPTS = ["a red circle on a white background", "two blue squares on a black background"]


def test_refl_loss_equals_hand_computation():
    r = torch.tensor([0.5, 2.5, -1.0])
    # hinge: ReLU(2 - r) = [1.5, 0, 3] -> mean 1.5
    assert refl_loss(r, "hinge", 2.0).item() == pytest.approx(1.5)
    assert refl_loss(r, "hinge", 2.0, scale=0.1).item() == pytest.approx(0.15)
    # margin 1: ReLU(1 - r) = [0.5, 0, 2] -> mean 2.5 / 3
    assert refl_loss(r, "hinge", 1.0).item() == pytest.approx(2.5 / 3)
    # linear: -r -> mean -2 / 3
    assert refl_loss(r, "linear").item() == pytest.approx(-2.0 / 3)
    assert refl_loss(r, "linear", scale=3.0).item() == pytest.approx(-2.0)
    # the hinge passes no gradient where the margin is met
    x = r.clone().requires_grad_(True)
    refl_loss(x, "hinge", 2.0).backward()
    assert torch.allclose(x.grad, torch.tensor([-1.0, 0.0, -1.0]) / 3)


def test_one_update_changes_lora_only(tiny_agent, frozen_weights):
    agent = tiny_agent(ReFLAgent, pretrain_beta=0.5, kl_coef=0.1)
    pipe = agent.policy.pipe
    frozen = frozen_weights(pipe)
    lora = [p.detach().clone() for p in agent.params]
    stats = agent.update(agent.collect())
    assert {"loss/refl", "loss/pretrain", "reward/train_step_proxy", "policy/grad_norm"} <= set(stats)
    assert stats["loss/pretrain"] > 0 and stats["policy/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(agent.params, lora))
    now = frozen_weights(pipe)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())


def test_only_the_chosen_late_step_has_gradients(tiny_agent, monkeypatch):
    agent = tiny_agent(ReFLAgent, late_window=[1, 1])
    calls = []
    original = agent.policy.noise_pred

    def spy(latents, step_index, embeds, reference=False):
        calls.append((step_index, torch.is_grad_enabled(), reference))
        return original(latents, step_index, embeds, reference)

    monkeypatch.setattr(agent.policy, "noise_pred", spy)
    embeds = agent.policy.encode_prompts(PROMPTS)
    loss, rewards, _, i = agent.refl_step(PROMPTS, embeds)
    assert i == 1 and rewards.shape == (2,)
    assert calls == [(0, False, False), (1, True, False)]  # steps after the chosen one never run
    grads = torch.autograd.grad(loss, agent.params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_default_window_is_late_and_valid():
    assert ReFLAgent._window(None, 20) == (14, 17)
    assert ReFLAgent._window(None, 2) == (1, 1)
    assert ReFLAgent._window(None, 1) == (0, 0)
    assert ReFLAgent._window([0, 2], 3) == (0, 2)


def test_kl_from_the_gradient_step_equals_the_base_penalty(tiny_agent):
    agent = tiny_agent(ReFLAgent, kl_coef=0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in agent.params:
            p.add_(0.1 * torch.randn_like(p))  # move away from the reference (LoRA B starts at 0)
    embeds = agent.policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *agent.env.latent_shape)
    mean, std, _ = agent.policy.ddim_moments(x, agent.policy.noise_pred(x, 1, embeds), 1)
    got = kl_penalty_from_mean(agent, mean, std, x, 1, embeds)
    want = agent.kl_penalty(x, 1, embeds)
    assert want.item() > 0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_non_differentiable_reward_is_refused(tiny_agent):
    with pytest.raises(ValueError, match="'gold'.*not differentiable"):
        tiny_agent(ReFLAgent, reward=GoldReward())


@pytest.mark.parametrize("field, value", [("late_window", [3, 1]), ("late_window", [-1, 2]),
                                          ("late_window", [1]), ("late_window", [0.5, 1.0]),
                                          ("loss", "squared"), ("reward_scale", 0.0),
                                          ("pretrain_beta", -1.0), ("hinge_margin", float("nan")),
                                          ("lr", -1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"agent.{field}"):
        ReFLConfig(**{field: value})


def test_window_beyond_the_chain_is_refused(tiny_agent):
    with pytest.raises(ValueError, match="agent.late_window"):
        tiny_agent(ReFLAgent, late_window=[1, STEPS])


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="k_last"):
        ReFLConfig.from_dict({"k_last": 1})
