import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import t2i_rl
from envs import DenoiseEnv, DenoiseVectorEnv, NumpyDenoise
from t2i_rl.models import build_pipeline
from t2i_rl.rewards import GoldReward, ShapesCLIP, TextNorm

STEPS = 3
PROMPT = "two red circles on a white background"


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)


@pytest.fixture(scope="module")
def textnorm():
    return TextNorm(ShapesCLIP.build(seed=0), tau=0.05)


def make_vec(pipe, reward, n=2, **kw):
    return DenoiseVectorEnv(num_envs=n, pipeline=pipe, reward=reward, num_steps=STEPS, **kw)


def test_every_registered_id_passes_gymnasium_and_sb3_checks(pipe, textnorm):
    assert set(t2i_rl.ENV_IDS) <= set(gymnasium.registry)
    for env_id in t2i_rl.ENV_IDS:
        env = gymnasium.make(env_id, pipeline=pipe, reward=textnorm, num_steps=STEPS).unwrapped
        assert isinstance(env, NumpyDenoise)
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(NumpyDenoise(DenoiseEnv(pipeline=pipe, reward=textnorm, num_steps=STEPS)), warn=False)


def test_make_vec_gives_the_native_batched_env(pipe, textnorm):
    envs = gymnasium.make_vec("t2i_rl/Denoise-v0", num_envs=3, vectorization_mode="vector_entry_point",
                              pipeline=pipe, reward=textnorm, num_steps=STEPS)
    obs, info = envs.reset(seed=0)
    assert isinstance(envs.unwrapped, DenoiseVectorEnv)
    assert obs["latents"].shape == (3, 4, 16, 16) and isinstance(obs["latents"], torch.Tensor)


def test_policy_rollout_gives_finite_rewards_and_full_info(pipe, textnorm):
    env = make_vec(pipe, textnorm, n=2)
    policy = env.policy(lora_rank=None)
    obs, info = env.reset(seed=1, options={"prompts": [PROMPT, "one blue square on a pink background"]})
    assert info["prompt"][0] == PROMPT
    gen = torch.Generator().manual_seed(0)
    for i in range(STEPS):
        rewards = None
        assert (obs["step"] == i).all()
        action, logp = policy.sample_step(obs["latents"], i, obs["prompt_embeds"], generator=gen)
        assert torch.isfinite(logp).all()
        obs, rewards, terminated, truncated, info = env.step(action)
        assert terminated.all() == (i == STEPS - 1) and not truncated.any()
        if i < STEPS - 1:
            assert (rewards == 0).all()
    assert torch.isfinite(rewards).all() and ((rewards > 0) & (rewards < 1)).all()
    assert torch.allclose(info["reward/textnorm/confidence"], rewards)
    assert {"reward/rm/clip", "gold/score", "gold/correct", "gold/count"} <= set(info)
    assert env.render().shape == (2, 32, 32, 3) and env.render().dtype == np.uint8
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action)


def test_random_actions_give_finite_rewards(pipe):
    env = NumpyDenoise(DenoiseEnv(pipeline=pipe, reward=GoldReward(), num_steps=STEPS))
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(STEPS):
        obs, reward, terminated, truncated, info = env.step(np.random.default_rng(0).standard_normal(
            env.action_space.shape).astype(np.float32))
    assert terminated and isinstance(reward, float) and np.isfinite(reward)
    assert info["prompt"] and "gold/score" in info


def test_same_seed_same_episode(pipe):
    def episode(seed):
        env = DenoiseEnv(pipeline=pipe, reward=GoldReward(), num_steps=STEPS)
        obs, info = env.reset(seed=seed)
        return obs["latents"].clone(), info["prompt"]

    a, b, c = episode(3), episode(3), episode(4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_options_fix_the_prompt(pipe):
    env = DenoiseEnv(pipeline=pipe, reward=GoldReward(), num_steps=STEPS)
    _, info = env.reset(seed=0, options={"prompt": PROMPT})
    assert info["prompt"] == PROMPT


def test_noise_group_shares_x_T_within_groups_and_keeps_the_default_draw(pipe):
    env = make_vec(pipe, GoldReward(), n=4)
    alone = env.reset(seed=5)[0]["latents"].clone()
    again = env.reset(seed=5, options={"noise_group": 1})[0]["latents"]
    assert torch.equal(alone, again)  # the option's default changes nothing
    grouped = env.reset(seed=5, options={"noise_group": 2})[0]["latents"]
    assert torch.equal(grouped[0], grouped[1]) and torch.equal(grouped[2], grouped[3])
    assert not torch.equal(grouped[0], grouped[2])


@pytest.mark.parametrize("group", [0, 3, 2.0, True])
def test_bad_noise_group_is_refused_naming_it(pipe, group):
    env = make_vec(pipe, GoldReward(), n=4)
    with pytest.raises(ValueError, match=r"noise_group.*dividing num_envs \(4\)"):
        env.reset(seed=0, options={"noise_group": group})


@pytest.mark.parametrize("action, match", [
    (torch.zeros(2, 4, 8, 8), r"shape \(2, 4, 16, 16\)"),
    (torch.zeros(2, 4, 16, 16, dtype=torch.long), "floating point"),
    (torch.full((2, 4, 16, 16), float("nan")), "NaN or inf"),
    (np.zeros((2, 4, 16, 16), dtype=np.int32), "floating point"),
    ([[0.0]], "torch.Tensor or numpy array"),
])
def test_bad_actions_raise_value_errors_naming_what_is_expected(pipe, action, match):
    env = make_vec(pipe, GoldReward())
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"), ({"eta": 0.0}, "eta"), ({"eta": 1.5}, r"eta must be in \(0, 1\]"),
    ({"prompts": "laion"}, "prompt source"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
])
def test_bad_constructor_arguments(pipe, kwargs, match):
    args = {"num_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        DenoiseVectorEnv(num_envs=1, pipeline=pipe, reward=GoldReward(), **args)


def test_prompt_list_source_and_wrong_prompt_count(pipe):
    env = make_vec(pipe, GoldReward(), prompts=[PROMPT])
    _, info = env.reset(seed=0)
    assert info["prompt"] == [PROMPT, PROMPT]
    with pytest.raises(ValueError, match="list of 2 prompts"):
        env.reset(options={"prompts": [PROMPT]})


def test_named_shapes_prompt_sets_and_their_heldout_counterparts():
    from envs import heldout_counterpart, make_prompt_source
    from t2i_rl.world import parse_prompt
    from t2i_rl.world.grammar import is_heldout

    rng = np.random.default_rng(0)
    pairs = [parse_prompt(p) for p in make_prompt_source("composition-train")(64, rng)]
    assert all(len(s.groups) == 2 and not is_heldout(s) for s in pairs)
    held = [parse_prompt(p) for p in make_prompt_source("composition-heldout")(64, rng)]
    assert all(len(s.groups) == 2 and is_heldout(s) for s in held)
    mixed = [parse_prompt(p) for p in make_prompt_source("shapes-train")(200, rng)]
    assert {len(s.groups) for s in mixed} == {1, 2}
    assert heldout_counterpart("composition-train") == "composition-heldout"
    assert heldout_counterpart("shapes-heldout") is None and heldout_counterpart(["a prompt"]) is None
    with pytest.raises(ValueError, match="unknown prompt source 'pairs'.*composition-train"):
        make_prompt_source("pairs")
