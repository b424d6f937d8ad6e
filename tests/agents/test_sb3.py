"""Stable-Baselines3's PPO runs on our env through the Gymnasium API, with our policy as its actor."""

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.preprocessing import preprocess_obs

import t2i_rl  # noqa: F401  (registers t2i_rl/Denoise-v0)
from agents.sb3 import DiffusionActorCriticPolicy, FiniteActionBounds, SB3Config, step_indices

T = 2


@pytest.fixture(scope="module")
def setup():
    from t2i_rl.models import build_pipeline
    from t2i_rl.rewards import ShapesCLIP

    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    reward = ShapesCLIP.build(seed=0)
    env = gymnasium.make("t2i_rl/Denoise-v0", pipeline=pipe, reward=reward, num_steps=T)
    policy = env.unwrapped.policy(lora_rank=4)
    torch.manual_seed(0)
    model = PPO(DiffusionActorCriticPolicy, FiniteActionBounds(env), n_steps=2 * T, batch_size=2 * T, n_epochs=1,
                learning_rate=1e-3, gamma=1.0, gae_lambda=1.0, device="cpu", seed=0,
                policy_kwargs={"diffusion_policy": policy})
    return env, policy, model


def test_ppo_learn_updates_the_lora_parameters(setup):
    _, policy, model = setup
    lora = policy.trainable_parameters()
    registered = {id(p) for p in model.policy.parameters()}
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in lora} <= registered and {id(p) for p in lora} <= optimized
    before = [p.detach().clone() for p in lora]
    model.learn(total_timesteps=2 * T)
    assert any(not torch.equal(a, b) for a, b in zip(lora, before)), "PPO did not move the LoRA weights"
    logged = model.logger.name_to_value
    assert np.isfinite(logged["train/policy_gradient_loss"]) and np.isfinite(logged["train/value_loss"])


def _obs_batch(env, model, seed):
    """A batch of two observations at steps 0 and 1 (the second one step further along)."""
    obs0, _ = env.reset(seed=seed)
    action, _ = model.predict(obs0, deterministic=False)
    obs1, *_ = env.step(action)
    batch = {k: np.stack([np.asarray(obs0[k]), np.asarray(obs1[k])]) for k in obs0}
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def test_actor_is_our_ddim_gaussian(setup):
    env, policy, model = setup
    with torch.no_grad():  # a policy different from the base model
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert policy.guidance_scale > 1  # classifier-free guidance with the cached unconditional embedding
    obs = _obs_batch(env, model, seed=3)
    latents, embeds = obs["latents"], obs["prompt_embeds"]
    actions = latents + 0.3 * torch.randn_like(latents)
    with torch.no_grad():
        want_mean = torch.stack([policy.step_stats(latents[i:i + 1], i, embeds[i:i + 1])[0][0] for i in range(2)])
        want_logp = torch.cat([policy.log_prob(latents[i:i + 1], actions[i:i + 1], i, embeds[i:i + 1], reduce="sum")
                               for i in range(2)])
        dist = model.policy.get_distribution(obs)
        values, logp, entropy = model.policy.evaluate_actions(obs, actions.flatten(1))
        # as SB3's rollout buffer hands it over: the step as float [B, 1]
        buffered = {**obs, "step": obs["step"].float()[:, None]}
        _, logp_buffered, _ = model.policy.evaluate_actions(buffered, actions.flatten(1))
    assert torch.allclose(dist.distribution.mean, want_mean.flatten(1), atol=1e-6)
    sigma = torch.stack([policy.sigma(i) for i in range(2)])
    assert torch.allclose(dist.distribution.stddev, sigma[:, None].expand_as(dist.distribution.stddev))
    assert torch.allclose(logp, want_logp, rtol=1e-5) and torch.allclose(logp_buffered, want_logp, rtol=1e-5)
    assert values.shape == (2, 1) and entropy.shape == (2,)

    # predict(deterministic=True) is the DDIM mean, in the action's shape
    single = {"latents": latents[1].numpy(), "step": 1, "prompt_embeds": embeds[1].numpy()}
    action, _ = model.predict(single, deterministic=True)
    assert action.shape == env.action_space.shape
    np.testing.assert_allclose(action, want_mean[1].numpy(), atol=1e-6)


def test_step_index_survives_sb3_one_hot(setup):
    env, _, model = setup
    step_space = gymnasium.spaces.Dict({"step": env.observation_space["step"]})
    onehot = preprocess_obs({"step": torch.tensor([0, 2, 1])}, step_space)  # what SB3 does by default
    assert step_indices(onehot["step"], 3, T).tolist() == [0, 2, 1]
    assert step_indices(torch.tensor([[1.0], [0.0]]), 2, T).tolist() == [1, 0]
    obs = {"latents": torch.zeros(1, *env.observation_space["latents"].shape), "step": torch.tensor([T]),
           "prompt_embeds": torch.zeros(1, *env.observation_space["prompt_embeds"].shape)}
    with pytest.raises(ValueError, match="no action at step"):
        model.policy.get_distribution(obs)
    assert model.policy.predict_values(obs).shape == (1, 1)  # the critic still values the last state


def test_policy_needs_our_policy(setup):
    env, _, _ = setup
    with pytest.raises(ValueError, match="diffusion_policy"):
        PPO(DiffusionActorCriticPolicy, FiniteActionBounds(env), n_steps=T, batch_size=T, device="cpu")


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("n_epochs", 0), ("clip_range", 0.0),
                                          ("gamma", 1.5), ("gae_lambda", -0.1), ("vf_coef", -1.0),
                                          ("ent_coef", -0.1), ("target_kl", 0.0), ("value_hidden", 0),
                                          ("kl_coef", 0.1), ("lr", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SB3Config(**{field: value})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        SB3Config.from_dict({"learning_rate": 1e-3})


def test_an_epoch_samples_once_and_the_diagnostics_see_what_ppo_trains_on(tiny_assets, tmp_path, monkeypatch):
    """collect() is PPO's collect_rollouts through the gym API and update() its train(): the Trainer's
    rollout is PPO's buffer, and the Trainer's own env samples nothing."""
    from t2i_rl.train import Trainer
    from tests.agents.test_train import compose_cfg, tiny_overrides

    trainer = Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", "sb3", "raw")))
    agent, n = trainer.agent, trainer.agent.cfg.samples_per_epoch
    with pytest.raises(RuntimeError, match=r"collect\(\) \(without prompts\) before each update\(\)"):
        agent.update(None)
    monkeypatch.setattr(trainer.env, "step", lambda *a: pytest.fail("the Trainer's env sampled"))
    trainer.epoch(0)
    assert len(agent.monitor.get_episode_rewards()) == n  # one collection of samples_per_epoch episodes

    rollout = agent.collect()
    buffer, T = agent.model.rollout_buffer, agent.policy.num_steps
    assert len(rollout) == n
    # each episode's prompt (from its final info) is the one whose embedding PPO's buffer holds
    torch.testing.assert_close(rollout.embeds, agent.policy.encode_prompts(rollout.prompts).to(rollout.embeds))
    states = torch.as_tensor(buffer.observations["latents"][:, 0])
    assert torch.equal(rollout.latents[:, :-1].flatten(0, 1), states)
    assert torch.equal(rollout.latents[:, -1].flatten(1), torch.as_tensor(buffer.actions[T - 1::T, 0]))
    assert torch.equal(rollout.rewards, torch.as_tensor(buffer.rewards[T - 1::T, 0]))
    assert rollout.log_probs.shape == (n, T) and rollout.images.shape[0] == n
    assert {"gold/correct", "gold/score"} <= rollout.info.keys()
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    agent.update(rollout)
    assert any(not torch.equal(p, b) for p, b in zip(agent.policy.trainable_parameters(), before))
