import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from t2i_rl.models import build_pipeline, build_tokenizer
from t2i_rl.policy import DiffusionPolicy, gaussian_kl

T, ETA, CFG = 4, 1.0, 3.0
PROMPTS = ["two red circles on a white background", "one blue square on a black background"]
STEPS = [0, T // 2, T - 1]  # first, middle, last


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def make_pipe(tokenizer):
    def make(**scheduler_overrides):
        pipe = build_pipeline(tokenizer, text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
        if scheduler_overrides:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **scheduler_overrides)
        return pipe

    return make


@pytest.fixture(scope="module")
def policy(make_pipe):
    """A fresh LoRA policy; tests must not change its weights."""
    return DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=CFG, eta=ETA, lora_rank=4)


@pytest.fixture(scope="module")
def embeds(policy):
    return policy.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))


def reference_scheduler(policy):
    sched = DDIMScheduler.from_config(policy.pipe.scheduler.config)
    sched.set_timesteps(T)
    return sched


def perturb_lora(policy, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_timesteps_and_embeddings(policy, embeds):
    assert policy.timesteps.shape == (T,)
    assert torch.all(policy.timesteps[:-1] > policy.timesteps[1:])
    assert torch.equal(policy.timesteps, reference_scheduler(policy).timesteps)
    assert embeds.shape == (2, 77, 32) and not embeds.requires_grad
    assert torch.equal(policy.uncond_embeds, policy.encode_prompts([""]))
    # the pipeline's scheduler being reset elsewhere does not move the policy's steps
    policy.pipe.scheduler.set_timesteps(7)
    assert torch.equal(policy.timesteps, reference_scheduler(policy).timesteps)


def test_guidance_is_one_batched_call_of_uncond_and_cond(policy, embeds, latents):
    i = 1
    t = policy.timesteps[i]
    with torch.no_grad():
        eps = policy.noise_pred(latents, i, embeds)
        cond = policy.unet(latents, t, encoder_hidden_states=embeds).sample
        uncond = policy.unet(latents, t, encoder_hidden_states=policy.uncond_embeds.expand(2, -1, -1)).sample
    torch.testing.assert_close(eps, uncond + CFG * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond)  # guidance really changes something here


@pytest.mark.parametrize("i", STEPS)
def test_mean_and_sample_match_ddim_scheduler_step(policy, embeds, latents, i):
    sched, t = reference_scheduler(policy), policy.timesteps[i]
    with torch.no_grad():
        eps = policy.noise_pred(latents, i, embeds)
        mean, std = policy.step_stats(latents, i, embeds)
    want_mean = sched.step(eps, t, latents, eta=ETA, variance_noise=torch.zeros_like(latents)).prev_sample
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)
    z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(10 + i))
    want = sched.step(eps, t, latents, eta=ETA, variance_noise=z).prev_sample
    torch.testing.assert_close(mean + std * z, want, atol=1e-5, rtol=1e-5)
    assert std.numel() == 1 and std > 0
    # sampling with a generator draws the scheduler's own noise from the same generator state
    got, _ = policy.sample_step(latents, i, embeds, generator=torch.Generator().manual_seed(3))
    want = sched.step(eps, t, latents, eta=ETA, generator=torch.Generator().manual_seed(3)).prev_sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_match_the_scheduler(make_pipe, latents, prediction_type):
    pol = DiffusionPolicy(make_pipe(prediction_type=prediction_type), num_steps=T, guidance_scale=CFG, eta=0.7)
    emb = pol.encode_prompts(PROMPTS)
    sched = DDIMScheduler.from_config(pol.pipe.scheduler.config)
    sched.set_timesteps(T)
    for i in STEPS:
        with torch.no_grad():
            out = pol.noise_pred(latents, i, emb)
            mean, _ = pol.step_stats(latents, i, emb)
        want = sched.step(out, pol.timesteps[i], latents, eta=0.7, variance_noise=torch.zeros_like(latents))
        torch.testing.assert_close(mean, want.prev_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_is_what_the_model_predicts(make_pipe, latents, prediction_type):
    """x_t = sqrt(a) x0 + sqrt(1-a) eps; the target is eps, v = sqrt(a) eps - sqrt(1-a) x0, or x0."""
    pol = DiffusionPolicy(make_pipe(prediction_type=prediction_type), num_steps=T, guidance_scale=CFG, eta=ETA)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 700])
    a = pol.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * latents, "sample": latents}
    torch.testing.assert_close(pol.training_target(latents, noise, t), want[prediction_type])


def test_gaussian_kl_is_the_closed_form_of_two_gaussians_of_one_variance():
    mean, ref = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    std = torch.tensor(0.5)
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "sum"), torch.tensor([(1 + 4) / 0.5, 9 / 0.5]))
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.tensor([5 / 0.5 / 2, 9 / 0.5 / 2]))
    with pytest.raises(ValueError, match="reduce must be one of"):
        gaussian_kl(mean, ref, std, "max")


def test_initial_latents_and_decode(policy):
    """x_T from the generator, scaled by the scheduler's init sigma; decoding keeps gradients for the
    agents that backpropagate the reward, in [0, 1]."""
    x = policy.initial_latents(2, (4, 16, 16), torch.Generator().manual_seed(3))
    again = policy.initial_latents(2, (4, 16, 16), torch.Generator().manual_seed(3))
    assert x.shape == (2, 4, 16, 16) and x.dtype == torch.float32 and torch.equal(x, again)
    x.requires_grad_(True)
    images = policy.decode(x)
    assert images.shape[:2] == (2, 3) and images.min() >= 0 and images.max() <= 1
    images.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density(policy, embeds, latents, reduce):
    i = 1
    nxt, logp_sampled = policy.sample_step(latents, i, embeds, generator=torch.Generator().manual_seed(0), reduce=reduce)
    assert not logp_sampled.requires_grad  # acting is gradient-free by default
    logp = policy.log_prob(latents, nxt, i, embeds, reduce=reduce)
    assert logp.shape == (2,) and logp.requires_grad
    with torch.no_grad():
        mean, std = policy.step_stats(latents, i, embeds)
    s = float(std)
    per_elem = -((nxt.double() - mean.double()) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
    hand = per_elem.flatten(1).mean(1) if reduce == "mean" else per_elem.flatten(1).sum(1)
    torch.testing.assert_close(logp.double(), hand, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logp_sampled, logp.detach(), atol=1e-5, rtol=1e-6)
    # the log-density of a different action is lower than at the mean
    at_mean = policy.log_prob(latents, mean, i, embeds, reduce=reduce)
    assert torch.all(at_mean > logp)


def test_kl_to_reference_zero_when_fresh_and_hand_formula_when_perturbed(make_pipe, latents):
    pol = DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=CFG, eta=ETA, lora_rank=4)
    emb = pol.encode_prompts(PROMPTS)
    i = 1
    with torch.no_grad():
        base_eps = pol.noise_pred(latents, i, emb)
    # fresh LoRA (B = 0) is exactly the base model
    assert torch.equal(pol.noise_pred(latents, i, emb, reference=True), base_eps)
    assert torch.equal(pol.kl_to_reference(latents, i, emb), torch.zeros(2))

    perturb_lora(pol)
    flags = [p.requires_grad for p in pol.unet.parameters()]
    with torch.no_grad():
        ref_eps = pol.noise_pred(latents, i, emb, reference=True)
        pol_eps = pol.noise_pred(latents, i, emb)
    assert [p.requires_grad for p in pol.unet.parameters()] == flags  # adapter toggle left flags alone
    assert torch.equal(ref_eps, base_eps)  # the reference is still the base model
    assert not torch.allclose(pol_eps, base_eps)
    for reduce in ("mean", "sum"):
        kl = pol.kl_to_reference(latents, i, emb, reduce=reduce)
        assert kl.shape == (2,) and torch.all(kl > 0) and kl.requires_grad
        with torch.no_grad():
            mu, std = pol.step_stats(latents, i, emb)
            mu_ref, _ = pol.step_stats(latents, i, emb, reference=True)
        per_elem = (mu - mu_ref) ** 2 / (2 * std**2)
        hand = per_elem.flatten(1).mean(1) if reduce == "mean" else per_elem.flatten(1).sum(1)
        torch.testing.assert_close(kl.detach(), hand, atol=1e-6, rtol=1e-5)
        nxt, _ = pol.sample_step(latents, i, emb, generator=torch.Generator().manual_seed(0))
        logp2, kl2 = pol.log_prob_and_kl(latents, nxt, i, emb, reduce=reduce)
        torch.testing.assert_close(kl2, kl, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logp2, pol.log_prob(latents, nxt, i, emb, reduce=reduce))


def test_gradients_reach_only_the_lora_weights(make_pipe, latents):
    pol = DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=CFG, eta=ETA, lora_rank=4)
    emb = pol.encode_prompts(PROMPTS)
    trainable = pol.trainable_parameters()
    names = {id(p): n for n, p in pol.unet.named_parameters()}
    assert trainable and all("lora_" in names[id(p)] for p in trainable)
    assert not any(p.requires_grad for p in pol.pipe.vae.parameters())
    assert not any(p.requires_grad for p in pol.pipe.text_encoder.parameters())

    nxt, _ = pol.sample_step(latents, 1, emb, generator=torch.Generator().manual_seed(0))
    (-pol.log_prob(latents, nxt, 1, emb).mean() + pol.kl_to_reference(latents, 1, emb).mean()).backward()
    for module in (pol.pipe.vae, pol.pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())
    got_grad = [n for n, p in pol.unet.named_parameters() if p.grad is not None]
    assert got_grad and all("lora_" in n for n in got_grad)
    # with B = 0 at init, the gradient flows into every B (A's gradient goes through B and is 0)
    assert all(p.grad.abs().sum() > 0 for n, p in pol.unet.named_parameters() if "lora_B" in n)


def test_full_finetuning_keeps_a_frozen_reference(make_pipe, latents):
    pol = DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=CFG, eta=ETA, lora_rank=None)
    emb = pol.encode_prompts(PROMPTS)
    assert len(pol.trainable_parameters()) == len(list(pol.unet.parameters()))
    assert not any(p.requires_grad for p in pol.reference_unet.parameters())
    i = 2
    with torch.no_grad():
        ref_before = pol.noise_pred(latents, i, emb, reference=True)
        pol_before = pol.noise_pred(latents, i, emb)
    assert torch.equal(ref_before, pol_before)
    assert torch.equal(pol.kl_to_reference(latents, i, emb), torch.zeros(2))

    nxt, _ = pol.sample_step(latents, i, emb, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=1e-2)
    (-pol.log_prob(latents, nxt, i, emb).mean()).backward()
    opt.step()
    assert all(p.grad is None for p in pol.reference_unet.parameters())
    with torch.no_grad():
        assert torch.equal(pol.noise_pred(latents, i, emb, reference=True), ref_before)
        assert not torch.allclose(pol.noise_pred(latents, i, emb), pol_before)
    assert torch.all(pol.kl_to_reference(latents, i, emb) > 0)


def rollout(policy, embeds, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    states, logps = [x], []
    for i in range(policy.num_steps):
        x, logp = policy.sample_step(x, i, embeds, generator=g)
        states.append(x)
        logps.append(logp)
    return torch.stack(states), torch.stack(logps)


def test_rollout_is_finite_and_reproducible(policy, embeds):
    states, logps = rollout(policy, embeds, seed=5)
    assert states.shape == (T + 1, 2, 4, 16, 16) and logps.shape == (T, 2)
    assert torch.isfinite(states).all() and torch.isfinite(logps).all()
    again_states, again_logps = rollout(policy, embeds, seed=5)
    assert torch.equal(states, again_states) and torch.equal(logps, again_logps)
    other, _ = rollout(policy, embeds, seed=6)
    assert not torch.allclose(states[-1], other[-1])
    # every stored transition re-evaluates to the log-prob recorded when acting
    with torch.no_grad():
        for i in range(T):
            torch.testing.assert_close(policy.log_prob(states[i], states[i + 1], i, embeds), logps[i], atol=1e-5, rtol=1e-6)


def test_no_guidance_skips_the_uncond_half(make_pipe, latents):
    pol = DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=1.0, eta=ETA)
    emb = pol.encode_prompts(PROMPTS)
    batches = []
    hook = pol.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            eps = pol.noise_pred(latents, 0, emb)
            cond = pol.unet(latents, pol.timesteps[0], encoder_hidden_states=emb).sample
    finally:
        hook.remove()
    assert batches == [2, 2]
    torch.testing.assert_close(eps, cond)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eta=0.0), "eta must be in"),
        (dict(eta=-1.0), "eta must be in"),
        (dict(eta=1.5), "eta must be in"),
        (dict(num_steps=0), "num_steps must be an int in"),
        (dict(num_steps=2000), "num_steps must be an int in"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(lora_rank=0), "lora_rank must be an int >= 1"),
        (dict(lora_alpha=-2.0), "lora_alpha must be > 0"),
    ],
)
def test_bad_arguments_raise(make_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionPolicy(make_pipe(), **kwargs)


@pytest.mark.parametrize("targets, kinds", [
    (("attn2.to_k", "attn2.to_v"), {"attn2.to_k", "attn2.to_v"}),  # cross-attention: where the prompt enters
    (("to_k", "conv1"), {"attn1.to_k", "attn2.to_k", "conv1"}),  # every key projection, and the ResNets' convs
])
def test_the_adapter_goes_on_the_named_layers_only(make_pipe, latents, targets, kinds):
    pol = DiffusionPolicy(make_pipe(), num_steps=T, guidance_scale=CFG, eta=ETA, lora_rank=4,
                          lora_target_modules=targets)
    adapted = {n.split(".lora_")[0] for n, p in pol.unet.named_parameters() if p.requires_grad}
    kind = {n: next(k for k in sorted(kinds) if n.endswith("." + k)) for n in adapted}  # StopIteration: a stray layer
    assert set(kind.values()) == kinds
    assert len(pol.trainable_parameters()) == 2 * len(adapted)  # A and B of each adapted layer
    emb = pol.encode_prompts(PROMPTS)
    nxt, _ = pol.sample_step(latents, 1, emb, generator=torch.Generator().manual_seed(0))
    pol.log_prob(latents, nxt, 1, emb).sum().backward()
    assert all(p.grad is not None for p in pol.trainable_parameters())


@pytest.mark.parametrize("targets, match", [
    (("to_q", "attn3.to_k"), r"'attn3.to_k' matches no layer of the UNet"),
    (("attn2",), r"'attn2' names Attention modules, which LoRA cannot wrap; name the Linear, Conv1d, Conv2d or "
                 r"Embedding layers inside them"),
    (("to_out",), r"'to_out' names ModuleList modules"),  # to_out.0 is the projection; to_out holds it and a dropout
])
def test_lora_targets_that_name_no_layer_lora_can_wrap_are_refused_before_any_adapter(make_pipe, targets, match):
    pipe = make_pipe()
    with pytest.raises(ValueError, match=r"lora_target_modules = \[.*\] is invalid: " + match):
        DiffusionPolicy(pipe, lora_target_modules=targets)
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False)  # nothing was added: the pipe is reusable
    DiffusionPolicy(pipe, lora_target_modules=("to_q",))


def test_bad_schedulers_raise(make_pipe):
    pipe = make_pipe()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="must be a diffusers DDIMScheduler"):
        DiffusionPolicy(pipe)
    with pytest.raises(NotImplementedError, match="clip_sample"):
        DiffusionPolicy(make_pipe(clip_sample=True))
    with pytest.raises(ValueError, match="sigma_t is 0"):  # the last step would be deterministic
        DiffusionPolicy(make_pipe(set_alpha_to_one=True), num_steps=T)


def test_bad_reduce_and_step_index_raise(policy, embeds, latents):
    with pytest.raises(ValueError, match="reduce must be one of"):
        policy.log_prob(latents, latents, 0, embeds, reduce="max")
    with pytest.raises(ValueError, match="reduce must be one of"):
        policy.kl_to_reference(latents, 0, embeds, reduce="max")
    with pytest.raises(ValueError, match="reduce must be one of"):
        policy.sample_step(latents, 0, embeds, reduce="max")
    with pytest.raises(IndexError, match="step_index must be in"):
        policy.step_stats(latents, T, embeds)
    with pytest.raises(ValueError, match="embeds batch"):
        policy.noise_pred(latents, 0, embeds[:1])


def test_kl_to_base_in_one_call_equals_the_sum_of_per_step_kls():
    """The diagnostic batches every (sample, step) pair; it must equal the per-step closed form."""
    from t2i_rl.diagnostics import kl_to_base

    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    policy = DiffusionPolicy(pipe, num_steps=4, guidance_scale=3.0, eta=1.0, lora_rank=4)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # away from the base model, so the KL is not 0
    gen = torch.Generator().manual_seed(0)
    embeds = policy.encode_prompts(["one red circle on a white background", "two blue squares on a black background"])
    latents = torch.randn(2, 5, 4, 8, 8, generator=gen)
    for every in (1, 2, 3):
        steps = list(range(0, 4, every))
        by_step = sum(policy.kl_to_reference(latents[:, i], i, embeds, reduce="sum").mean().item() for i in steps)
        assert kl_to_base(policy, latents, embeds, every) == pytest.approx(by_step * 4 / len(steps), rel=1e-4)
        assert kl_to_base(policy, latents, embeds, every) > 0
