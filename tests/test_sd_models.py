"""Stable Diffusion 1.5 and 2.1 through `model=sd15` / `model=sd21`, on their architectures scaled down.

No weights can be downloaded here, so each pipeline is built from the checkpoint's own component
configs (the values of its config.json files, t2i_rl/sd_architectures.py) with tiny widths, saved
with `save_pretrained`, and loaded back by the Trainer through `load_pipeline` with
`model.pipeline=<folder>`: the code path of the real checkpoints, in bfloat16, with SDPA attention,
gradient checkpointing and VAE slicing.
"""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from hydra import compose, initialize_config_dir

from t2i_rl.models import load_pipeline
from t2i_rl.policy import DiffusionPolicy
from t2i_rl.sd_architectures import SCALED_DOWN, save_random_sd
from t2i_rl.train import CONFIG_DIR, Trainer, group_options, precheck, validate
from tests.agents.test_train import tiny_agent_overrides

RESOLUTION = 64  # 8x8 latents: SD's three UNet downsamplings take them to 1x1
PROMPTS = ["two red circles on a white background", "one blue square on a black background"]


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    """{"sd15": folder, "sd21": folder}: tiny SD pipelines saved with save_pretrained."""
    root = tmp_path_factory.mktemp("sd")
    return {name: save_random_sd(name, root / name, RESOLUTION, **SCALED_DOWN[name]) for name in SCALED_DOWN}


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    """The env reward: the (untrained, differentiable) CLIP-style proxy model, loaded from its folder."""
    from t2i_rl.rewards import ShapesCLIP

    folder = tmp_path_factory.mktemp("clip")
    ShapesCLIP.build(seed=0).save_pretrained(folder)
    return {"name": "clip", "path": str(folder)}


def sd_cfg(model, folder, run_dir, reward, agent="ddpo", overrides=()):
    """The real configs (`model=sd15` ...), with the tiny folder, 64x64 images and a tiny epoch."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={model}", f"model.pipeline={folder}", f"model.resolution={RESOLUTION}", f"agent={agent}",
            "env=raw", "env.batch_size=2", "env.num_steps=3", "agent.samples_per_epoch=2",
            "agent.train_batch_size=2", "agent.lora_rank=4", "epochs=1", f"output_dir={run_dir}",
            "eval.num_prompts=0", "eval.train_images=0", "samples.every=0",
            "diagnostics.kl_samples=2", *tiny_agent_overrides(agent), *overrides])
    cfg.env.reward = reward
    return cfg


def frozen_weights(pipe) -> dict[str, torch.Tensor]:
    out = {f"vae.{k}": v.detach().clone() for k, v in pipe.vae.state_dict().items()}
    out.update({f"text.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()})
    out.update({f"unet.{k}": v.detach().clone() for k, v in pipe.unet.named_parameters() if "lora" not in k})
    return out


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("model, pipeline, resolution", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    ("sd21", "stabilityai/stable-diffusion-2-1", 768),
])
def test_sd_configs_compose_validate_and_set_sd_sampling(model, pipeline, resolution):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "agent=refl", "env=textnorm"])
        shapes = compose(config_name="config", overrides=["env=textnorm"])
        override = compose(config_name="config", overrides=[f"model={model}", "env.num_steps=7"])
    validate(cfg)
    assert (cfg.model.name, cfg.model.pipeline, cfg.model.dtype) == (model, pipeline, "bfloat16")
    assert (cfg.model.attention, cfg.model.gradient_checkpointing, cfg.model.vae_slicing) == ("sdpa", True, True)
    assert cfg.model.resolution == resolution and cfg.agent.lora_rank == 8  # LoRA from the agent config
    assert (cfg.env.num_steps, cfg.env.guidance_scale, cfg.env.name) == (50, 5.0, "textnorm")
    assert cfg.env.reward == shapes.env.reward  # the env group keeps its own reward
    assert (shapes.env.num_steps, shapes.model.dtype, shapes.model.resolution) == (10, "float32", None)
    assert override.env.num_steps == 7  # the command line wins over the model file


@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("env", group_options("env"))
def test_every_env_composes_with_sd_and_keeps_its_reward_and_prompts(model, env):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", f"env={env}"])
        alone = compose(config_name="config", overrides=[f"env={env}"])
    validate(cfg)
    assert (cfg.env.name, cfg.env.reward, cfg.env.prompts, cfg.env.gold) == (
        alone.env.name, alone.env.reward, alone.env.prompts, alone.env.gold)
    assert cfg.env.num_steps == 50 and cfg.model.name == model


@pytest.mark.parametrize("override, message", [
    ("model.dtype=float64", "model.dtype = 'float64' is invalid: must be one of float32, bfloat16, float16"),
    ("model.attention=flash", "model.attention = 'flash' is invalid: must be one of sdpa, eager"),
    ("model.resolution=-64", "model.resolution = -64 is invalid: must be a positive int"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing = 'maybe' is invalid: must be true or false"),
    ("model=sdxl", "unknown model 'sdxl'; allowed: "),  # not shipped: see test_sdxl_folder_is_refused_in_one_line
])
def test_bad_model_values_give_one_line_errors(override, message):
    with pytest.raises(ValueError) as err:
        precheck(["model=sd15", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# ---------------------------------------------------------------------- loading
def test_sd15_folder_loads_in_bf16_with_sdpa_checkpointing_slicing_and_sd_ddim(sd_folders):
    saved = StableDiffusionPipeline.from_pretrained(sd_folders["sd15"], safety_checker=None)
    pipe = load_pipeline(str(sd_folders["sd15"]), dtype=torch.bfloat16, attention="sdpa",
                         gradient_checkpointing=True, vae_slicing=True)
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, part).state_dict(), getattr(saved, part).state_dict()
        assert all(v.dtype == torch.bfloat16 for v in got.values())
        assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    for part in (pipe.unet, pipe.vae):
        assert part.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in part.attn_processors.values())
    assert pipe.unet.is_gradient_checkpointing and not pipe.vae.is_gradient_checkpointing
    assert pipe.vae.use_slicing
    # SD 1.5 ships a PNDM scheduler: the policy gets DDIM with the same schedule
    sched = pipe.scheduler
    assert isinstance(saved.scheduler, PNDMScheduler) and isinstance(sched, DDIMScheduler)
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.beta_schedule) == (0.00085, 0.012,
                                                                                            "scaled_linear")
    assert (sched.config.steps_offset, sched.config.set_alpha_to_one, sched.config.clip_sample) == (1, False, False)
    assert torch.equal(sched.alphas_cumprod, saved.scheduler.alphas_cumprod)
    assert float(sched.alphas_cumprod[999]) == pytest.approx(0.0047, abs=1e-4)  # SD's terminal alpha-bar


def test_scheduler_without_clip_sample_keeps_latents_unclipped(sd_folders, tmp_path):
    """DDIM's own default would clip SD's latents to [-1, 1]; a config that does not say keeps it off."""
    folder = tmp_path / "sd15"
    shutil.copytree(sd_folders["sd15"], folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("clip_sample") is False
    config_file.write_text(json.dumps(config))
    assert load_pipeline(str(folder)).scheduler.config.clip_sample is False


def test_sdxl_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(ValueError, match="holds an SDXL pipeline .* pooled embeddings of a second text encoder"):
        load_pipeline(str(tmp_path / "sdxl"))


# ---------------------------------------------------------------------- precision
def test_bf16_full_finetuning_trains_a_float32_unet_against_a_float32_reference(sd_folders):
    pipe = load_pipeline(str(sd_folders["sd15"]), dtype=torch.bfloat16)
    policy = DiffusionPolicy(pipe, num_steps=3, guidance_scale=5.0, lora_rank=None)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.unet.parameters())
    assert all(p.dtype == torch.float32 for p in policy.reference_unet.parameters())
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kl = policy.kl_to_reference(latents, 1, policy.encode_prompts(PROMPTS))
    assert kl.dtype == torch.float32 and torch.equal(kl, torch.zeros(2))


def test_v_prediction_step_matches_diffusers_ddim_and_the_formula(sd_folders):
    """SD 2.1's v-prediction, at SD's 50 steps: mean, predicted x0 and the sampled step equal
    DDIMScheduler.step on the same inputs, and x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v."""
    pipe = load_pipeline(str(sd_folders["sd21"]), dtype=torch.bfloat16, attention="sdpa")
    policy = DiffusionPolicy(pipe, num_steps=50, guidance_scale=5.0, eta=1.0, lora_rank=4)
    assert policy.prediction_type == "v_prediction"
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    assert torch.equal(sched.timesteps, policy.timesteps) and policy.timesteps[0] == 981
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(2, 4, 8, 8, generator=g)
    embeds = policy.encode_prompts(PROMPTS)
    for i in (0, 25, 49):
        t = int(policy.timesteps[i])
        mean, std, pred_x0 = policy.ddim_moments(latents, v, i)
        want = sched.step(v, t, latents, eta=1.0, variance_noise=torch.zeros_like(latents))
        torch.testing.assert_close(mean, want.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pred_x0, want.pred_original_sample, rtol=1e-5, atol=1e-6)
        a = sched.alphas_cumprod[t]
        torch.testing.assert_close(pred_x0, a.sqrt() * latents - (1 - a).sqrt() * v, rtol=1e-5, atol=1e-6)
        sampled, logp = policy.sample_step(latents, i, embeds, generator=torch.Generator().manual_seed(3))
        out = policy.noise_pred(latents, i, embeds)
        want = sched.step(out, t, latents, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
        torch.testing.assert_close(sampled, want, rtol=1e-5, atol=1e-6)
        assert sampled.dtype == logp.dtype == out.dtype == torch.float32 and std > 0


# ---------------------------------------------------------------------- training through the Trainer
@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("agent", ["ddpo", "refl"])
def test_trainer_trains_lora_in_float32_on_a_bf16_sd_pipeline(sd_folders, clip_reward, tmp_path, model, agent):
    trainer = Trainer(sd_cfg(model, sd_folders[model], tmp_path / "run", clip_reward, agent))
    pipe = trainer.policy.pipe
    assert pipe.unet.is_gradient_checkpointing and pipe.vae.use_slicing
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert trainer.env.latent_shape == (4, 8, 8) and trainer.env.image_size == RESOLUTION
    assert trainer.policy.prediction_type == ("v_prediction" if model == "sd21" else "epsilon")
    lora = dict((n, p) for n, p in pipe.unet.named_parameters() if p.requires_grad)
    assert lora and all("lora" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert [id(p) for p in trainer.agent.params] == [id(p) for p in lora.values()]
    frozen = frozen_weights(pipe)
    assert {v.dtype for v in frozen.values()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in lora.items()}

    metrics = trainer.fit()

    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if not k.startswith("overopt/")), metrics
    assert metrics["policy/grad_norm"] > 0  # the loss reached the LoRA weights (not only weight decay)
    # every LoRA B moved, but maybe the mid block's self-attention q and k: at 64x64 it sees one 1x1
    # token, whose softmax is constant, so their gradient is 0 up to rounding (real SD's sees 8x8)
    unchanged = {n for n, p in lora.items() if "lora_B" in n and torch.equal(p, before[n])}
    assert unchanged <= {f"mid_block.attentions.0.transformer_blocks.0.attn1.to_{x}.lora_B.default.weight"
                         for x in "qk"}, unchanged
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora.values())
    after = frozen_weights(pipe)
    assert after.keys() == frozen.keys() and all(torch.equal(v, after[k]) for k, v in frozen.items())
    state = trainer.agent.optimizer.state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    # what the env hands out and the agent stores: float32 latents, embeddings, log-probs; images in [0, 1]
    rollout = trainer.agent.collect()
    for x in (rollout.latents, rollout.embeds, rollout.log_probs, rollout.images, rollout.rewards):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert rollout.latents.shape == (2, 4, 4, 8, 8) and rollout.images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1


# ---------------------------------------------------------------------- float16: loss scaling
def test_float16_lora_scales_the_loss_and_trains(sd_folders, clip_reward, tmp_path):
    """float16 weights backpropagate in float16, whose small gradients underflow: the agent scales
    the loss (GradScaler), unscales before clipping, and the LoRA weights train in float32."""
    trainer = Trainer(sd_cfg("sd15", sd_folders["sd15"], tmp_path / "run", clip_reward,
                             overrides=["model.dtype=float16"]))
    agent = trainer.agent
    assert trainer.policy.computes_in_float16 and agent.scaler.is_enabled()
    before = [p.detach().clone() for p in agent.params]
    metrics = trainer.fit()
    assert 0 < metrics["policy/grad_norm"] < float("inf")  # unscaled: the gradient's own norm
    assert agent.scaler.get_scale() == 2.0 ** 16  # no overflow in one step, the initial scale
    assert any(not torch.equal(p, b) for p, b in zip(agent.params, before))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in agent.params)


def test_float16_step_with_an_overflow_is_skipped_and_the_scale_halved(sd_folders, clip_reward):
    from agents.ddpo import DDPOAgent, DDPOConfig
    from envs import DenoiseVectorEnv

    pipe = load_pipeline(str(sd_folders["sd15"]), dtype=torch.float16)
    env = DenoiseVectorEnv(num_envs=2, pipeline=pipe, reward=clip_reward, gold=None, num_steps=2, prompts=PROMPTS,
                           resolution=RESOLUTION)
    agent = DDPOAgent(DDPOConfig(samples_per_epoch=2, train_batch_size=2), env, env.policy(lora_rank=4))
    before = [p.detach().clone() for p in agent.params]
    overflow = agent.params[0].sum() * float("inf")
    assert agent.optimizer_step(overflow) == float("inf")
    assert all(torch.equal(p, b) for p, b in zip(agent.params, before))  # skipped
    assert agent.scaler.get_scale() == 2.0 ** 15 and all(p.grad is None for p in agent.params)
    assert 0 < agent.optimizer_step(sum(p.square().sum() for p in agent.params) + agent.params[0].sum()) < 1e3
    assert any(not torch.equal(p, b) for p, b in zip(agent.params, before))
    with pytest.raises(ValueError, match=r"^DeepSpeed launches are invalid for a float16 UNet"):
        agent.use_deepspeed({})  # refused before DeepSpeed is touched


def test_bfloat16_and_full_finetuning_need_no_loss_scaling(sd_folders):
    for dtype, rank in ((torch.bfloat16, 4), (torch.float16, None)):
        policy = DiffusionPolicy(load_pipeline(str(sd_folders["sd15"]), dtype=dtype), num_steps=2, lora_rank=rank)
        assert not policy.computes_in_float16, (dtype, rank)


@pytest.mark.parametrize("agent", ["ddpo_trl", "sb3"])
def test_float16_lora_is_refused_for_agents_that_step_their_own_optimizer(agent):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"agent={agent}", "model=sd15", "model.dtype=float16",
                                                       "agent.lora_rank=4"])
    with pytest.raises(ValueError, match=rf"^model.dtype = float16 is invalid for agent={agent} with LoRA: its "
                                         r"float16 gradients need loss scaling"):
        validate(cfg)
