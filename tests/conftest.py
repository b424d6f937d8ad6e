"""Shared fixtures: tiny models built from configs and saved where the real loaders read them."""

import pytest

from t2i_rl.models import build_pipeline, save_pipeline_atomically


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny SD pipeline and tiny proxy reward models on disk: {"pipeline": dir, "clip": dir, ...}."""
    from t2i_rl.rewards import LeeReward, PairwiseReward, ShapesCLIP

    root = tmp_path_factory.mktemp("tiny")
    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    save_pipeline_atomically(pipe, root / "pipeline")
    clip = ShapesCLIP.build(seed=0)
    clip.save_pretrained(root / "clip")
    LeeReward.build(clip, seed=1).save_pretrained(root / "lee")
    PairwiseReward.build(clip, seed=2).save_pretrained(root / "pairwise")
    return {name: str(root / name) for name in ("pipeline", "clip", "lee", "pairwise")}
