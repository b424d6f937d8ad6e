"""ddpo_trl runs DDPO through TRL's DDPOTrainer: its loss must be the native one on the same batch,
its sampler must be the native sampler, and one TRL epoch must train the policy's own weights."""

import pytest
import torch

from agents.ddpo import DDPOAgent, DDPOConfig, ppo_clip_loss
from agents.ddpo_trl import TRLDDPOAgent, TRLDDPOConfig
from envs import DenoiseVectorEnv
from t2i_rl.models import build_pipeline
from t2i_rl.rewards import ShapesCLIP

NUM_STEPS = 3


def make_agent(cls=TRLDDPOAgent, cfg_cls=TRLDDPOConfig, seed=0, **cfg):
    """A tiny pipeline with a LoRA policy whose adapter is not zero (so it differs from the base)."""
    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    pipe.set_progress_bar_config(disable=True)
    env = DenoiseVectorEnv(num_envs=2, pipeline=pipe, reward=ShapesCLIP.build(seed=0), gold="gold",
                           num_steps=NUM_STEPS, guidance_scale=5.0)
    policy = env.policy(lora_rank=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    agent = cls(cfg_cls(**{"samples_per_epoch": 4, "train_batch_size": 2, "lora_rank": 4, **cfg}), env, policy)
    agent.seed(seed)
    return agent


@pytest.fixture(scope="module")
def trl_agent():
    return make_agent(clip_range=1e-3)


def test_native_and_trl_losses_agree_on_the_same_batch(trl_agent):
    agent, policy, trainer = trl_agent, trl_agent.policy, trl_agent.trainer
    rollout = agent.collect()
    b = len(rollout)
    # old log-probs off the current ones by ratios well inside and well outside the clip range 1e-3
    shift = torch.tensor([3e-3, -2e-4, 2e-4, -4e-3])
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0])
    neg = trainer.neg_prompt_embed.repeat(b, 1, 1)
    for i in range(NUM_STEPS):
        x, x_next, embeds = rollout.latents[:, i], rollout.latents[:, i + 1], rollout.embeds
        old = rollout.log_probs[:, i] - shift

        logp = policy.log_prob(x, x_next, i, embeds)
        native = ppo_clip_loss(logp, old, adv, agent.cfg.clip_range)
        native_grads = torch.autograd.grad(native[0], policy.trainable_parameters())

        timesteps = policy.timesteps[i].repeat(b)
        trl = trainer.calculate_loss(x, timesteps, x_next, old, adv, torch.cat([neg, embeds]))
        trl_grads = torch.autograd.grad(trl[0], policy.trainable_parameters())

        for name, a, c in zip(("loss", "approx_kl", "clipfrac"), native, trl):
            torch.testing.assert_close(a.float(), c.float(), atol=1e-5, rtol=1e-4, msg=f"{name} at step {i}")
        assert native[2].item() == 0.5  # two of four ratios clipped: the comparison is not vacuous
        for a, c in zip(native_grads, trl_grads):
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)
        # TRL's sampler log-prob of the stored action is our policy's
        torch.testing.assert_close(logp.detach(), rollout.log_probs[:, i], atol=1e-5, rtol=1e-5)


def test_trl_samples_what_the_native_agent_samples():
    """Same seeds: the same prompts, x_T and sampler noise, so the same images and rewards."""
    native, trl = make_agent(DDPOAgent, DDPOConfig), make_agent()
    a, b = native.collect(), trl.collect()
    assert a.prompts == b.prompts
    for name in ("embeds", "latents", "log_probs", "rewards", "images"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    assert a.info.keys() == b.info.keys()
    for key in a.info:
        torch.testing.assert_close(a.info[key], b.info[key], atol=1e-5, rtol=1e-5, msg=key)


def test_one_trl_epoch_trains_the_policy_weights(trl_agent):
    agent = trl_agent
    rollout = agent.collect()
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    stats = agent.update(rollout)
    after = agent.policy.trainable_parameters()
    assert any(not torch.equal(a, c) for a, c in zip(after, before)), "TRL's epoch changed nothing"
    assert {"loss/policy", "policy/approx_kl", "policy/clipfrac"} <= set(stats)
    assert stats["trl/optimizer_steps"] == 2  # 4 samples / train batch 2, one step per minibatch
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert len(agent.last_image_data) == 1 and agent.last_image_data[0][0].shape[0] == len(rollout)
    state = agent.state_dict()
    assert state["epoch"] == 1 and state["optimizer"]["state"]
    agent.load_state_dict(state)


@pytest.mark.parametrize("bad, match", [
    ({"kl_coef": 0.1}, "no KL"),
    ({"group_size": 2}, "GRPO"),
    ({"antithetic": True}, "antithetic = true needs an even agent.group_size"),  # TRL has no groups
    ({"shared_noise": True}, "shared_noise = true needs agent.group_size"),
    ({"train_steps": 2}, "all T"),
    ({"score_pool": 2}, "TRL's loss scores the whole action"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
])
def test_config_rejects_what_trl_cannot_do(bad, match):
    with pytest.raises(ValueError, match=match):
        TRLDDPOConfig(**bad)


def test_train_batch_must_divide_the_env_batch():
    with pytest.raises(ValueError, match="multiple of agent.train_batch_size"):
        make_agent(train_batch_size=4, samples_per_epoch=8)
