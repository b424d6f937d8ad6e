"""The flow-matching policy (Flow-GRPO's SDE) on a tiny random Stable Diffusion 3 pipeline.

No weights can be downloaded here, so the pipeline is built from configs with SD 3's layout (an
SD3Transformer2DModel over 16-channel latents, two CLIP text encoders with projections and a T5
encoder, AutoencoderKL with SD 3's scaling and shift factors, FlowMatchEulerDiscreteScheduler with
shift 3), saved with `save_pretrained` and loaded back through `load_pipeline`, the code path of
real checkpoints. The tokenizers are offline: ShapesWorld's shipped CLIP tokenizer and a
word-level T5 (unigram) tokenizer of the ShapesWorld vocabulary.
"""

import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from t2i_rl.flow_policy import (
    FlowEmbeds,
    FlowPolicy,
    flow_noise_schedule,
    sde_step_mean,
)
from t2i_rl.models import ASSETS, load_pipeline
from t2i_rl.train import precheck
from t2i_rl.world import ShapesWorld

T, A, CFG = 4, 0.7, 4.5
T5_TOKENS = 16
RESOLUTION = 16  # 8x8x16 latents: 4x4 patches of 2x2
PROMPTS = ["two red circles on a white background", "one blue square on a black background"]
STEPS = [0, T // 2, T - 1]  # the first (s = 1), a middle one, the last (s' = 0)


def t5_tokenizer() -> T5Tokenizer:
    """A word-level unigram T5 tokenizer of ShapesWorld's words (T5's layout: pad 0, eos 1, unk 2)."""
    world = ShapesWorld()
    words = sorted({w for p in world.prompts("train") + world.prompts("heldout") for w in p.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)


def save_tiny_sd3(path, num_layers: int = 2, seed: int = 0):
    """A random StableDiffusion3Pipeline with SD 3's layout at tiny widths, saved to `path`."""
    torch.manual_seed(seed)
    clip_tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "shapes-sd" / "tokenizer")
    t5_tok = t5_tokenizer()

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id))

    pipe = StableDiffusion3Pipeline(
        # joint_attention_dim = T5's width >= the two CLIPs' 16 + 16; pooled = their projections' 16 + 16
        transformer=SD3Transformer2DModel(
            sample_size=RESOLUTION // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=32, pos_embed_max_size=8),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD 3's
        vae=AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5305,
            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),  # SD 3's factors
        text_encoder=clip(), tokenizer=clip_tokenizer, text_encoder_2=clip(), tokenizer_2=clip_tokenizer,
        text_encoder_3=T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def make_policy(folder):
    def make(**kwargs) -> FlowPolicy:
        kwargs = {"num_steps": T, "guidance_scale": CFG, "noise_level": A, "lora_rank": 4,
                  "max_sequence_length": T5_TOKENS, **kwargs}
        return FlowPolicy(load_pipeline(str(folder)), **kwargs)

    return make


@pytest.fixture(scope="module")
def policy(make_policy):
    """A fresh LoRA policy; tests must not change its weights."""
    return make_policy()


@pytest.fixture(scope="module")
def embeds(policy):
    return policy.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def latents(policy):
    return torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))


def euler_scheduler(policy, step):
    """diffusers' own ODE sampler at `step` of the policy's schedule."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(policy.pipe.scheduler.config)
    sched.set_timesteps(T)
    sched.set_begin_index(step)
    return sched


def perturb_lora(policy, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------- loading and conditioning
def test_sd3_folder_loads_with_its_flow_scheduler_sdpa_and_checkpointing(folder):
    saved = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe = load_pipeline(str(folder), dtype=torch.bfloat16, attention="sdpa", gradient_checkpointing=True,
                         vae_slicing=True)
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0
    got, want = pipe.transformer.state_dict(), saved.transformer.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in pipe.transformer.attn_processors.values())
    assert pipe.transformer.is_gradient_checkpointing and pipe.vae.use_slicing
    with pytest.raises(ValueError, match="attention = 'eager' is invalid .* an SD 3 pipeline"):
        load_pipeline(str(folder), attention="eager")


def test_embeddings_are_the_pipelines_own_and_guidance_is_one_batched_call(policy, embeds, latents):
    prompt, negative, pooled, negative_pooled = policy.pipe.encode_prompt(
        PROMPTS, None, None, max_sequence_length=T5_TOKENS, do_classifier_free_guidance=True)
    assert torch.equal(embeds.prompt, prompt) and torch.equal(embeds.pooled, pooled)
    assert embeds.prompt.shape == (2, 77 + T5_TOKENS, 32) and embeds.pooled.shape == (2, 32)
    # the pipeline's default negative prompt (batched with another, so equal up to rounding)
    torch.testing.assert_close(policy.uncond_embeds.prompt[0], negative[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(policy.uncond_embeds.pooled[0], negative_pooled[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(FlowEmbeds.cat([embeds[:1], embeds[1:]]).prompt, embeds.prompt) and len(embeds[[1]]) == 1
    i = 1
    t = policy.timesteps[i].expand(2)
    with torch.no_grad():
        v = policy.velocity(latents, i, embeds)
        cond = policy.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=prompt,
                                  pooled_projections=pooled).sample
        uncond = policy.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=negative,
                                    pooled_projections=negative_pooled).sample
    torch.testing.assert_close(v, uncond + CFG * (cond - uncond), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(policy.noise_pred(latents, i, embeds), v)  # the DDIM policy's name for it
    assert not torch.allclose(cond, uncond)


# ---------------------------------------------------------------------- the SDE
def test_noise_schedule_guards_s_equal_one_with_the_next_sigma(policy):
    sigmas = policy.sigmas.double()
    ref = FlowMatchEulerDiscreteScheduler.from_config(policy.pipe.scheduler.config)
    ref.set_timesteps(T)
    assert torch.equal(policy.sigmas, ref.sigmas) and sigmas[0] == 1 and sigmas[-1] == 0
    dt, sde_sigma, std = flow_noise_schedule(policy.sigmas, A)
    s_cap = float(sigmas[1])
    for i in range(T):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_tilde = min(s, s_cap)  # s = 1 only at the first step, which takes the second sigma's noise
        want = A * math.sqrt(s_tilde / (1 - s_tilde))
        assert sde_sigma[i].item() == pytest.approx(want, rel=1e-6)
        assert std[i].item() == pytest.approx(want * math.sqrt(s - s_next), rel=1e-6)
        assert dt[i].item() == pytest.approx(s_next - s, rel=1e-6)
    assert sde_sigma[0] == sde_sigma[1] and torch.isfinite(std).all() and (std > 0).all()  # incl. the last step
    assert torch.equal(policy.sigma(T - 1), std[T - 1])
    with pytest.raises(ValueError, match="num_steps = 1 is invalid: .* use num_steps >= 2"):
        flow_noise_schedule(torch.tensor([1.0, 0.0]), A)


@pytest.mark.parametrize("step", STEPS)
def test_step_mean_and_log_prob_match_a_hand_computation(policy, embeds, latents, step):
    x = latents.double()
    action = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v = policy.velocity(latents, step, embeds).double()
        mean, std = policy.step_stats(latents, step, embeds)
        logp_mean = policy.log_prob(latents, action, step, embeds)
        logp_sum = policy.log_prob(latents, action, step, embeds, reduce="sum")
    s, s_next = float(policy.sigmas[step]), float(policy.sigmas[step + 1])
    s_tilde = min(s, float(policy.sigmas[1]))
    sigma = A * math.sqrt(s_tilde / (1 - s_tilde))
    dt = s_next - s
    want_mean = x + (v + sigma**2 / (2 * s) * (x + (1 - s) * v)) * dt
    want_std = sigma * math.sqrt(-dt)
    torch.testing.assert_close(mean.double(), want_mean, atol=1e-5, rtol=1e-5)
    assert std.item() == pytest.approx(want_std, rel=1e-6)
    elementwise = -(action.double() - want_mean) ** 2 / (2 * want_std**2) - math.log(want_std) \
        - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logp_mean.double(), elementwise.flatten(1).mean(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logp_sum.double(), elementwise.flatten(1).sum(1), atol=1e-2, rtol=1e-5)
    if step == T - 1:  # to s' = 0 the mean is x0_hat - sigma^2 / 2 * eps_hat
        torch.testing.assert_close(mean.double(), x - s * v - sigma**2 / 2 * (x + (1 - s) * v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", range(T))
def test_mean_tends_to_the_schedulers_euler_ode_step_as_the_noise_level_goes_to_zero(policy, embeds, latents, step):
    with torch.no_grad():
        v = policy.velocity(latents, step, embeds)
    ode = euler_scheduler(policy, step).step(v, policy.timesteps[step], latents).prev_sample.double()
    x, v = latents.double(), v.double()
    means = {}
    for a in (1e-1, 1e-2, 1e-3):
        dt, sde_sigma, _ = flow_noise_schedule(policy.sigmas, a)
        means[a] = sde_step_mean(x, v, policy.sigmas[step].double(), dt[step].double(), sde_sigma[step].double())
    torch.testing.assert_close(means[1e-3], ode, atol=1e-5, rtol=1e-5)  # float32 rounding of the scheduler's
    # the gap to x + v dt is sigma^2 / (2 s) (x + (1 - s) v) dt: quadratic in a (in float64, away from
    # the scheduler's float32 rounding)
    exact_ode = x + v * (policy.sigmas[step + 1].double() - policy.sigmas[step].double())
    gaps = [(means[a] - exact_ode).abs().max().item() for a in (1e-1, 1e-2)]
    assert gaps[0] > 0 and gaps[0] / gaps[1] == pytest.approx(100, rel=1e-3)

def test_the_policy_at_a_tiny_noise_level_steps_as_the_ode(make_policy, latents):
    tiny = make_policy(noise_level=1e-4)
    embeds = tiny.encode_prompts(PROMPTS)
    for step in range(T):
        with torch.no_grad():
            mean, std = tiny.step_stats(latents, step, embeds)
            v = tiny.velocity(latents, step, embeds)
        ode = euler_scheduler(tiny, step).step(v, tiny.timesteps[step], latents).prev_sample
        torch.testing.assert_close(mean, ode, atol=1e-5, rtol=1e-5)
        assert 0 < std.item() < 1e-3  # a sqrt(s / (1 - s)) sqrt(-dt): a few times a near s = 1


def test_per_sample_steps_match_per_step_calls(policy, embeds, latents):
    steps = torch.tensor([0, T - 1])
    with torch.no_grad():
        mean, std = policy.step_stats(latents, steps, embeds)
        for row, i in enumerate(steps.tolist()):
            mean_i, std_i = policy.step_stats(latents[row:row + 1], i, embeds[row:row + 1])
            torch.testing.assert_close(mean[row:row + 1], mean_i, atol=1e-5, rtol=1e-5)
            assert std[row].item() == std_i.item()


# ---------------------------------------------------------------------- acting, scoring, training
@pytest.mark.parametrize("step", STEPS)
def test_sampled_action_log_prob_equals_the_reevaluated_one(policy, embeds, latents, step):
    action, logp = policy.sample_step(latents, step, embeds, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean, std = policy.step_stats(latents, step, embeds)
        again = policy.log_prob(latents, action, step, embeds)
    z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(action, mean + std * z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, again, atol=1e-6, rtol=1e-6)
    assert not logp.requires_grad and logp.shape == (2,)


def test_kl_to_reference_is_zero_fresh_and_positive_after_one_lora_update(make_policy, latents):
    policy = make_policy()
    embeds = policy.encode_prompts(PROMPTS)
    for i in STEPS:
        assert torch.equal(policy.kl_to_reference(latents, i, embeds), torch.zeros(2))
    params = policy.trainable_parameters()
    assert params and all(p.dtype == torch.float32 and "lora" in n
                          for n, p in policy.transformer.named_parameters() if p.requires_grad)
    targets = set(policy.lora_target_modules)
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} == targets
    frozen = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    action, _ = policy.sample_step(latents, 1, embeds, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    logp, kl = policy.log_prob_and_kl(latents, action, 1, embeds)
    assert torch.equal(kl, torch.zeros(2))
    (-logp.mean()).backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p, frozen[n]) for n, p in policy.transformer.named_parameters() if n in frozen)
    with torch.no_grad():
        assert (policy.kl_to_reference(latents, 1, embeds) > 0).all()
    assert all(p.requires_grad for p in params)  # toggling the adapters for the reference kept them trainable


def test_default_lora_targets_are_the_projections_the_transformer_has(tmp_path):
    """SD 3's last block feeds no text stream on (context_pre_only): no to_add_out there, so a
    one-block transformer has none, and only an explicit request for it is an error."""
    pipe = load_pipeline(str(save_tiny_sd3(tmp_path / "one", num_layers=1)))
    policy = FlowPolicy(pipe, num_steps=T, max_sequence_length=T5_TOKENS)
    assert policy.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    with pytest.raises(ValueError, match="'to_add_out' matches no layer of the transformer"):
        FlowPolicy(load_pipeline(str(tmp_path / "one")), num_steps=T, lora_target_modules=["to_q", "to_add_out"])


def test_full_finetuning_trains_a_float32_transformer_against_a_frozen_copy(make_policy, latents):
    policy = make_policy(lora_rank=None, guidance_scale=1.0)
    embeds = policy.encode_prompts(PROMPTS)
    assert all(p.requires_grad for p in policy.transformer.parameters())
    assert not any(p.requires_grad for p in policy.reference_transformer.parameters())
    assert torch.equal(policy.kl_to_reference(latents, 0, embeds), torch.zeros(2))
    with pytest.raises(ValueError, match="save_lora needs a LoRA policy"):
        policy.save_lora("unused")


def test_a_full_sampling_loop_gives_finite_images_in_0_1(policy, embeds):
    g = torch.Generator().manual_seed(5)
    x = policy.initial_latents(2, policy.latent_shape(RESOLUTION), g)
    logps = []
    for i in range(T):
        x, logp = policy.sample_step(x, i, embeds, generator=g)
        logps.append(logp)
    with torch.no_grad():
        images = policy.decode(x)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert torch.isfinite(torch.stack(logps)).all()


def test_saved_lora_loads_into_a_fresh_pipeline_with_load_lora_weights(make_policy, folder, latents, tmp_path):
    policy = make_policy()
    perturb_lora(policy)
    policy.save_lora(tmp_path / "lora")
    pipe = load_pipeline(str(folder))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    embeds = policy.encode_prompts(PROMPTS)
    kwargs = dict(hidden_states=latents, timestep=policy.timesteps[1].expand(2), encoder_hidden_states=embeds.prompt,
                  pooled_projections=embeds.pooled, return_dict=False)
    with torch.no_grad():
        want = policy.transformer(**kwargs)[0]
        got = pipe.transformer(**kwargs)[0]
        base = load_pipeline(str(folder)).transformer(**kwargs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changed the output


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"noise_level": 0.0}, "noise_level = 0.0 is invalid: must be a number > 0"),
    ({"noise_level": -0.5}, "noise_level = -0.5 is invalid: must be a number > 0"),
    ({"noise_level": float("nan")}, "noise_level = nan is invalid"),
    ({"num_steps": 1}, "num_steps = 1 is invalid: must be an int >= 2"),
    ({"num_steps": 2.5}, "num_steps = 2.5 is invalid"),
    ({"num_steps": True}, "num_steps = True is invalid"),
    ({"guidance_scale": -1.0}, "guidance_scale = -1.0 is invalid: must be a number >= 0"),
    ({"guidance_scale": "5"}, "guidance_scale = '5' is invalid: must be a number >= 0"),
    ({"lora_rank": 0}, "lora_rank = 0 is invalid: must be an int >= 1, or None"),
    ({"mu": 0.5}, "mu = 0.5 is invalid: a scheduler with use_dynamic_shifting = False has a fixed shift"),
    ({"max_sequence_length": 1000}, "max_sequence_length = 1000 is invalid: must be an int in"),
    ({"lora_target_modules": ["to_kv"]}, "lora_target_modules = .* 'to_kv' matches no layer of the transformer"),
])
def test_bad_settings_raise_one_clear_value_error(make_policy, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_policy(**kwargs)
    assert "\n" not in str(err.value)


def test_a_wrong_scheduler_and_bad_embeddings_are_refused(folder, policy, embeds, latents):
    pipe = load_pipeline(str(folder))
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="pipe.scheduler = DDIMScheduler is invalid: .* FlowMatchEulerDiscrete"):
        FlowPolicy(pipe)
    with pytest.raises(ValueError, match="embeds = Tensor is invalid: must be FlowEmbeds"):
        policy.velocity(latents, 0, embeds.prompt)
    with pytest.raises(ValueError, match=r"embeds of shapes prompt \(1, 93, 32\), pooled \(1, 32\) are invalid for 2"):
        policy.velocity(latents, 0, embeds[:1])
    with pytest.raises(ValueError, match="resolution = 18 is invalid: must be a positive multiple of 4"):
        policy.latent_shape(18)


def test_train_refuses_flow_models_in_one_line_until_the_env_drives_them(folder):
    for argv in (["model=sd3"], ["model=sd35m"], ["model=sd15", f"model.pipeline={folder}"]):
        with pytest.raises(ValueError, match="a flow-matching pipeline .* needs t2i_rl.flow_policy.FlowPolicy") as err:
            precheck(argv)
        assert "\n" not in str(err.value)


def test_flow_model_configs_compose_and_a_bad_policy_value_is_one_line():
    with pytest.raises(ValueError, match="model.policy = 'euler' is invalid: must be one of ddim, flow"):
        precheck(["model=sd35m", "model.policy=euler"])
