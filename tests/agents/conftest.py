"""Tiny agents on a tiny pipeline built from configs, with a real (untrained) CLIP-style reward."""

import pytest

import envs
from t2i_rl.models import build_pipeline
from t2i_rl.rewards import ShapesCLIP


@pytest.fixture(scope="module")
def clip():
    return ShapesCLIP.build(seed=0)


@pytest.fixture
def tiny_agent(clip):
    """make(agent_class, reward=None, steps=3, **config) -> an agent on 2 envs with LoRA rank 4."""

    def make(agent_class, reward=None, steps=3, **cfg):
        pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
        env = envs.DenoiseVectorEnv(num_envs=2, pipeline=pipe, reward=reward or clip, num_steps=steps)
        cfg = {"samples_per_epoch": 2, "train_batch_size": 2, **cfg}
        return agent_class(agent_class.config_class(**cfg), env, env.policy(lora_rank=4))

    return make


@pytest.fixture
def frozen_weights():
    """snapshot(pipe) -> copies of every weight that must not train (VAE, text encoder, base UNet)."""

    def snapshot(pipe):
        out = {f"vae.{k}": v.detach().clone() for k, v in pipe.vae.state_dict().items()}
        out.update({f"text.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()})
        out.update({f"unet.{k}": v.detach().clone() for k, v in pipe.unet.named_parameters() if not v.requires_grad})
        return out

    return snapshot
