import math

import pytest
import torch

from agents.base import per_prompt_normalize
from agents.ddpo import DDPOConfig, PerPromptStatTracker, ppo_clip_loss


def test_ppo_clip_loss_equals_hand_computation():
    logp = torch.tensor([0.0, 0.2, -0.3])
    old = torch.tensor([0.1, 0.0, -0.3])
    adv = torch.tensor([1.0, -2.0, 0.5])
    eps = 0.1
    loss, approx_kl, clipfrac = ppo_clip_loss(logp, old, adv, eps)
    r = torch.exp(logp - old)  # 0.905, 1.221, 1.0
    # sample 0: 0.905 lies inside [0.9, 1.1]: max(-0.905, -0.905) = -0.905
    # sample 1: max(2*1.221, 2*1.1) = 2.443
    # sample 2: max(-0.5, -0.5) = -0.5
    want = (-r[0] + 2 * r[1] - 0.5) / 3
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert approx_kl.item() == pytest.approx(0.5 * (0.01 + 0.04 + 0) / 3, abs=1e-7)
    assert clipfrac.item() == pytest.approx(1 / 3)  # only sample 1 leaves the band


def test_per_prompt_normalization_and_groups():
    prompts = ["a", "a", "b", "b"]
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    adv = per_prompt_normalize(prompts, rewards)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]), atol=1e-4)
    assert torch.allclose(adv[2:], torch.zeros(2))


def test_stat_tracker_uses_the_batch_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    r = torch.tensor([0.0, 2.0])
    adv = tracker.update(["a", "b"], r)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0]), atol=1e-4)
    tracker.update(["a", "a"], torch.tensor([1.0, 2.0]))
    adv = tracker.update(["a"], torch.tensor([3.0]))  # buffer a: [0, 1, 2, 3]
    hist = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert adv.item() == pytest.approx(((3 - hist.mean()) / hist.std(unbiased=False)).item(), abs=1e-4)
    adv = tracker.update(["a", "b"], torch.tensor([4.0, 5.0]))  # a keeps its last 4: [1, 2, 3, 4]; b has 2 < 3
    hist = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert adv[0].item() == pytest.approx(((4 - hist.mean()) / hist.std(unbiased=False)).item(), abs=1e-4)
    assert adv[1].item() == pytest.approx(1.0, abs=1e-4)  # the batch's statistics: (5 - 4.5) / 0.5
    assert tracker.state_dict() == {"a": [1.0, 2.0, 3.0, 4.0], "b": [2.0, 5.0]}


@pytest.mark.parametrize("field, value", [("clip_range", 0.0), ("lr", -1.0), ("group_size", 1),
                                          ("timestep_fraction", 1.5), ("lora_rank", 0), ("adam_beta1", 1.0),
                                          ("score_pool", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DDPOConfig(**{field: value})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        DDPOConfig.from_dict({"learning_rate": 1e-3})


def test_shared_noise_starts_each_group_from_one_x_T(tiny_agent):
    from agents.ddpo import DDPOAgent

    agent = tiny_agent(DDPOAgent, samples_per_epoch=4, group_size=2, shared_noise=True)
    agent.seed(0)
    x_T = agent.collect().latents[:, 0]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    agent = tiny_agent(DDPOAgent, samples_per_epoch=4, group_size=2)
    agent.seed(0)
    x_T = agent.collect().latents[:, 0]
    assert not torch.equal(x_T[0], x_T[1])


def test_antithetic_pairs_mirror_the_trained_steps_and_share_the_rest(tiny_agent):
    from agents.ddpo import DDPOAgent

    agent = tiny_agent(DDPOAgent, steps=3, samples_per_epoch=4, group_size=2, antithetic=True, train_steps=1)
    agent.seed(0)
    r = agent.collect()
    x = r.latents  # [sample, step, C, H, W]
    assert torch.equal(x[0, 0], x[1, 0]) and not torch.equal(x[0, 0], x[2, 0])
    # step 0 (trained): x_1 = mean -+ std z, the pair symmetric about the mean both share
    mean, std = agent.policy.step_stats(x[:2, 0], 0, r.embeds[:2], reference=True)
    assert torch.allclose((x[0, 1] + x[1, 1]) / 2, mean[0], atol=1e-5)
    assert not torch.allclose(x[0, 1], x[1, 1])
    # step 1 (not trained): the same z for both, x_2 - mean(x_1) equal
    m0, s1 = agent.policy.step_stats(x[:2, 1], 1, r.embeds[:2], reference=True)
    assert torch.allclose(x[0, 2] - m0[0], x[1, 2] - m0[1], atol=1e-5)
    # the stored log-probs are those of the actions taken
    logp = agent.policy.log_prob(x[:, 0], x[:, 1], 0, r.embeds)
    assert torch.allclose(logp, r.log_probs[:, 0], atol=1e-5)
    # the evaluation path (prompts given) draws as before: no mirroring outside the training groups
    agent.seed(0)
    free = agent.collect(["one red circle on a white background"] * 2).latents
    assert not torch.equal(free[0, 0], free[1, 0])


def test_antithetic_needs_even_groups():
    with pytest.raises(ValueError, match="antithetic = true needs an even agent.group_size"):
        DDPOConfig(antithetic=True, group_size=3, samples_per_epoch=6)


def test_shared_noise_needs_groups_that_fit_a_reset(tiny_agent):
    from agents.ddpo import DDPOAgent

    with pytest.raises(ValueError, match="shared_noise = true needs agent.group_size >= 2"):
        DDPOConfig(shared_noise=True, group_size=0)
    with pytest.raises(ValueError, match=r"group_size \(4\) to divide env.batch_size \(2\)"):
        tiny_agent(DDPOAgent, samples_per_epoch=4, group_size=4, shared_noise=True)


def test_one_unet_call_over_all_steps_gives_the_per_step_gradient(tiny_agent):
    """step_chunk=0 (every sampled step in one UNet call) == step_chunk=1 (one call per step)."""
    from agents.ddpo import DDPOAgent

    grads = []
    for chunk in (1, 0):
        agent = tiny_agent(DDPOAgent, clip_range=0.2, step_chunk=chunk, kl_coef=0.1, per_prompt_stat_tracking=False)
        with torch.no_grad():  # a policy away from the reference, so ratios and KL are not trivial
            for p in agent.policy.trainable_parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        agent.seed(0)
        rollout = agent.collect()
        agent.optimizer.step = lambda: None  # keep the weights: compare the gradients
        agent.optimizer.zero_grad = lambda set_to_none=True: None
        agent.update(rollout)
        grads.append([p.grad.clone() for p in agent.policy.trainable_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_train_steps_trains_only_the_first_steps(tiny_agent):
    """train_steps=k re-evaluates transitions of the first k denoising steps only, every one of them."""
    from agents.ddpo import DDPOAgent

    agent = tiny_agent(DDPOAgent, steps=3, train_steps=2, step_chunk=1)
    seen = []
    log_prob = agent.policy.log_prob

    def spy(x, x_next, i, embeds, *args, **kwargs):
        seen.append(int(i))
        return log_prob(x, x_next, i, embeds, *args, **kwargs)

    agent.policy.log_prob = spy
    agent.seed(0)
    agent.update(agent.collect())
    assert sorted(seen) == [0, 1]


def test_train_steps_beyond_the_sampler_is_refused(tiny_agent):
    from agents.ddpo import DDPOAgent

    with pytest.raises(ValueError, match="train_steps = 4 .* only 3 steps"):
        tiny_agent(DDPOAgent, steps=3, train_steps=4)
    with pytest.raises(ValueError, match="train_steps"):
        DDPOConfig(train_steps=-1)


def test_minibatches_keep_blocks_whole():
    from agents.base import minibatches

    g = torch.Generator().manual_seed(0)
    batches = minibatches(12, 4, g, unit=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(12)) and [len(b) for b in batches] == [4, 4, 4]
    for b in batches:
        pairs = b.view(-1, 2)
        assert torch.all(pairs[:, 0] % 2 == 0) and torch.all(pairs[:, 1] == pairs[:, 0] + 1)
    assert minibatches(12, 4, g, unit=2)[0].tolist() != batches[0].tolist()  # shuffled afresh
    with pytest.raises(ValueError, match=r"minibatch unit 4 must divide the rows \(12\) and the batch size \(6\)"):
        minibatches(12, 6, g, unit=4)


@pytest.mark.parametrize("group_size, antithetic, batch, unit", [(8, True, 8, 2), (8, True, 5, 1), (4, False, 4, 1),
                                                                 (0, False, 8, 1)])
def test_an_optimizer_step_takes_whole_mirrored_pairs(group_size, antithetic, batch, unit):
    cfg = DDPOConfig(samples_per_epoch=16 if group_size != 4 else 12, group_size=group_size, antithetic=antithetic,
                     train_batch_size=batch)
    assert cfg.minibatch_unit() == unit


def test_adamw_takes_the_configured_momentum(tiny_agent):
    from agents.ddpo import DDPOAgent

    agent = tiny_agent(DDPOAgent, adam_beta1=0.99)
    group = agent.optimizer.param_groups[0]
    assert group["betas"] == (0.99, 0.999) and group["lr"] == agent.cfg.lr


def test_the_pooled_log_prob_is_the_density_of_the_block_means():
    from t2i_rl.policy import DiffusionPolicy

    x = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 2.0]]).view(1, 1, 2, 4)  # blocks of 2 x 2: means 4, 0.5
    mean = torch.zeros_like(x)
    logp = DiffusionPolicy.gaussian_log_prob(x, mean, 2.0, reduce="sum", pool=2)
    # the mean of 4 draws of N(0, 2^2) is N(0, 1): log N(4; 0, 1) + log N(0.5; 0, 1)
    want = -(4.0**2) / 2 - (0.5**2) / 2 - 2 * 0.5 * math.log(2 * math.pi)
    assert logp.item() == pytest.approx(want, abs=1e-5)
    # "mean" divides by the whole action's 8 elements, not by the 2 pools
    assert DiffusionPolicy.gaussian_log_prob(x, mean, 2.0, pool=2).item() == pytest.approx(want / 8, abs=1e-6)
    assert torch.equal(DiffusionPolicy.gaussian_log_prob(x, mean, 2.0, pool=1), DiffusionPolicy.gaussian_log_prob(x, mean, 2.0))
    with pytest.raises(ValueError, match=r"pool = 3 must be an int >= 1 dividing the latents' height and width, "
                                         r"got shape \(1, 1, 2, 4\)"):
        DiffusionPolicy.gaussian_log_prob(x, mean, 2.0, pool=3)


def test_the_pooled_score_is_the_whole_score_averaged_over_each_block():
    """d/d mean of the pooled "mean" log-prob = the whole one's gradient averaged over each k x k block,
    here with one std per row (the update's rows at several steps)."""
    from t2i_rl.policy import DiffusionPolicy

    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    grads = []
    for pool in (1, 2):
        m = mean.clone().requires_grad_(True)
        DiffusionPolicy.gaussian_log_prob(x, m, std, pool=pool).sum().backward()
        grads.append(m.grad)
    whole, pooled = grads
    block_avg = torch.nn.functional.avg_pool2d(whole, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(pooled, block_avg, atol=1e-6, rtol=1e-5)


def test_score_pool_trains_on_the_pooled_score(tiny_agent):
    """With score_pool=k the update's gradient is that of -mean(A * log pi(pool_k(x_1))) at the first
    step (ratio 1: the old pooled log-probs are the sampling policy's)."""
    from agents.ddpo import DDPOAgent

    agent = tiny_agent(DDPOAgent, score_pool=4, train_steps=1, per_prompt_stat_tracking=False)
    agent.seed(0)
    rollout = agent.collect()
    old = agent.pooled_log_probs(rollout, 1)
    x, x1 = rollout.latents[:, 0], rollout.latents[:, 1]
    assert torch.allclose(old[:, 0], agent.policy.log_prob(x, x1, 0, rollout.embeds, pool=4), atol=1e-6)
    assert torch.equal(old[:, 1:], rollout.log_probs[:, 1:])  # the untrained steps keep the rollout's
    adv = agent.advantages(rollout)
    params = agent.policy.trainable_parameters()
    want = torch.autograd.grad(-(adv * agent.policy.log_prob(x, x1, 0, rollout.embeds, pool=4)).mean(), params)
    agent.optimizer.step = lambda: None  # keep the weights: compare the gradients
    agent.optimizer.zero_grad = lambda set_to_none=True: None
    stats = agent.update(rollout)
    assert stats["policy/approx_kl"] == pytest.approx(0.0, abs=1e-10)
    for g, w in zip([p.grad for p in params], want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-4)
    assert any(w.abs().sum() > 0 for w in want)
    whole = torch.autograd.grad(-(adv * agent.policy.log_prob(x, x1, 0, rollout.embeds)).mean(), params)
    assert not all(torch.allclose(a, b) for a, b in zip(whole, want))  # pooling changed the gradient


def test_a_score_pool_that_does_not_divide_the_latents_is_refused(tiny_agent):
    from agents.ddpo import DDPOAgent

    with pytest.raises(ValueError, match=r"score_pool = 3 is invalid: it must divide the latents' side \(16 pixels\), "
                                         r"for example 1, 2, 4, 8, 16"):
        tiny_agent(DDPOAgent, score_pool=3)
