"""Tiny reward models built from configs (no weights, no downloads)."""

import pytest

from t2i_rl.models import build_tokenizer
from t2i_rl.rewards import LeeReward, PairwiseReward, ShapesCLIP
from t2i_rl.recipe import load_config
from t2i_rl.rewards.train import DEFAULT_CONFIG
from t2i_rl.world import ShapesWorld

TINY = [
    "clip.vision_hidden=32", "clip.vision_layers=1", "clip.text_hidden=32", "clip.text_layers=1",
    "clip.projection_dim=16", "clip.steps=25", "clip.batch_size=32", "clip.pool_size=256",
    "clip.pool_refresh=1000", "clip.warmup=2", "clip.lr=2e-3",
    "samples.n=24", "samples.per_prompt=4", "samples.batch_size=12", "samples.num_inference_steps=2",
    "lee.hidden=32", "lee.steps=40", "lee.batch_size=16", "lee.warmup=2", "lee.n_contrastive=3",
    "pairwise.hidden=32", "pairwise.steps=40", "pairwise.batch_size=16", "pairwise.warmup=2",
    "eval.n_images=8", "val_fraction=0.25",
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def world():
    return ShapesWorld()


@pytest.fixture
def tiny_cfg():
    return load_config(DEFAULT_CONFIG, TINY)


@pytest.fixture(scope="session")
def clip(tokenizer):
    return ShapesCLIP.build(tokenizer, seed=0, vision_hidden=32, vision_layers=1, text_hidden=32,
                            text_layers=1, projection_dim=16)


@pytest.fixture(scope="session")
def lee(clip):
    return LeeReward.build(clip, hidden=16, seed=1)


@pytest.fixture(scope="session")
def pairwise(clip):
    return PairwiseReward.build(clip, hidden=16, seed=2)


@pytest.fixture(scope="session")
def batch(world):
    prompts = world.sample_prompts(4, seed=3)
    return world.render(prompts, seed=3), prompts
