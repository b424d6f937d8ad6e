"""Shared fixtures: tiny models built from configs and saved where the real loaders read them."""

import sys

import pytest

from t2i_rl.models import build_pipeline, save_pipeline_atomically


@pytest.fixture(autouse=True)
def _run_in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs from an empty folder: the configs' default output_dir (runs/..., relative to
    the working directory) must not find the runs a user made in the checkout (`make train`, then
    `make test`), and nothing a test writes there by default lands in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny SD pipeline and tiny proxy reward models on disk: {"pipeline": dir, "clip": dir, ...}; "monitor"
    is one more CLIP-style model, outside every tiny reward, for env.monitor."""
    from t2i_rl.rewards import LeeReward, PairwiseReward, ShapesCLIP

    root = tmp_path_factory.mktemp("tiny")
    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    save_pipeline_atomically(pipe, root / "pipeline")
    clip = ShapesCLIP.build(seed=0)
    clip.save_pretrained(root / "clip")
    LeeReward.build(clip, seed=1).save_pretrained(root / "lee")
    PairwiseReward.build(clip, seed=2).save_pretrained(root / "pairwise")
    ShapesCLIP.build(seed=3).save_pretrained(root / "monitor")  # a CLIP-style model no tiny proxy uses
    return {name: str(root / name) for name in ("pipeline", "clip", "lee", "pairwise", "monitor")}


@pytest.fixture
def refused_by_train(monkeypatch, capsys):
    """`python -m t2i_rl.train ARGS` in this process, for arguments its checks must refuse: a call
    returns (exit code, stderr lines), and a config the checks accept fails the test instead of
    training. In-process, so that each bad value costs milliseconds instead of an interpreter start."""
    from t2i_rl import train

    def call(args: list[str]) -> tuple[int, list[str]]:
        def accepted(validated=None):
            raise AssertionError(f"the checks accepted {args}")

        monkeypatch.setattr(sys, "argv", ["t2i_rl.train", *args])
        monkeypatch.setattr(train, "hydra_entry", accepted)
        with pytest.raises(SystemExit) as stop:
            train.main()
        return stop.value.code, capsys.readouterr().err.splitlines()

    return call
