"""Tiny training runs of the three proxy models (seconds, not the shipped sizes)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_rl.models import build_pipeline
from t2i_rl.recipe import load_config
from t2i_rl.rewards import LeeReward, PairwiseReward, ShapesCLIP, make_reward
from t2i_rl.rewards.train import (
    DEFAULT_CONFIG, info_nce, main, render_pool, sample_base, train_all, train_clip,
    train_lee, train_pairwise, validate,
)


class FakePipe:
    """Stands in for a base model: renders each prompt, or (half the time) a contrastive one, so
    the judge gives a mix of right and wrong images and pairs with different scores."""

    def __init__(self, world):
        self.world, self.calls = world, []

    def __call__(self, prompts, num_inference_steps, guidance_scale, eta, output_type, generator):
        self.calls.append(dict(n=len(prompts), steps=num_inference_steps, guidance=guidance_scale, eta=eta))
        seed = int(torch.randint(2**31, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        drawn = [p if rng.random() < 0.5 else self.world.contrastive(p, k=1, seed=int(rng.integers(99)))[0]
                 for p in prompts]
        return SimpleNamespace(images=self.world.render(drawn, seed=rng))


@pytest.fixture(scope="module")
def labelled(world):
    """Judge-labelled samples of the fake base model."""
    cfg = load_config(DEFAULT_CONFIG, ["samples.n=96", "samples.batch_size=48"])
    images, prompts = sample_base(FakePipe(world), cfg, world)
    return images, prompts, world.judge(images, prompts)


def test_shipped_config_is_valid_and_sized_as_documented():
    cfg = load_config(DEFAULT_CONFIG)
    validate(cfg)
    assert cfg.output_dir == "t2i_rl/assets/rewards"
    assert (cfg.clip.image_size, cfg.clip.patch_size, cfg.clip.projection_dim) == (32, 4, 64)
    assert (cfg.samples.num_inference_steps, cfg.samples.guidance_scale, cfg.samples.eta) == (20, 5.0, 1.0)
    assert (cfg.lee.temperature, cfg.lee.lam) == (2.0, 0.5)


def test_clip_training_lowers_the_contrastive_loss_and_is_reproducible(tiny_cfg, world, tokenizer):
    rng = np.random.default_rng(123)
    images, captions = render_pool(world, 64, rng, 0.3)

    def loss_of(clip):
        with torch.no_grad():
            return float(info_nce(clip.image_embeds(images), clip.text_embeds(captions), captions,
                                  clip.model.logit_scale))

    sizes = dict(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, projection_dim=16)
    before = loss_of(ShapesCLIP.build(tokenizer, seed=0, **sizes))
    clip = train_clip(tiny_cfg, world, tokenizer)
    assert clip.frozen
    assert loss_of(clip) < before - 0.3
    again = train_clip(tiny_cfg, world, tokenizer)
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_info_nce_treats_repeated_captions_as_positives():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(0.0)  # logits are the cosines
    loss = info_nce(img, img, ["a", "a", "b"], scale)
    # row "a": target (1/2, 1/2, 0) over logits (1, 1, 0)
    row_a = -torch.log_softmax(torch.tensor([1.0, 1.0, 0.0]), 0)[:2].mean()
    row_b = -torch.log_softmax(torch.tensor([0.0, 0.0, 1.0]), 0)[2]
    torch.testing.assert_close(loss, (2 * row_a + row_b) / 3)


def test_lee_training_lowers_its_loss(tiny_cfg, clip, labelled):
    images, prompts, judged = labelled
    assert 0.2 < judged.correct.float().mean() < 0.8
    lee = train_lee(tiny_cfg, clip, images, prompts, judged.correct.float())
    assert isinstance(lee, LeeReward) and not any(p.requires_grad for p in lee.head.parameters())
    h = lee.history
    assert len(h) == tiny_cfg.lee.steps
    assert np.mean(h[-10:]) < np.mean(h[:10])


def test_pairwise_training_lowers_its_loss(tiny_cfg, clip, labelled):
    images, prompts, judged = labelled
    model = train_pairwise(tiny_cfg, clip, images, prompts, judged.score)
    assert isinstance(model, PairwiseReward)
    h = model.history
    assert np.mean(h[-10:]) < np.mean(h[:10])
    assert np.mean(h[:10]) == pytest.approx(np.log(2), abs=0.1)  # untrained: r_w ~ r_l


def test_train_all_saves_three_loadable_models_atomically(tiny_cfg, world, tmp_path, batch):
    out = tmp_path / "rewards"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    pipe = FakePipe(world)
    models = train_all(tiny_cfg, pipe, out)
    assert sorted(models) == ["clip", "lee", "pairwise"]
    assert sorted(p.name for p in out.iterdir()) == ["clip", "lee", "metrics.json", "pairwise", "rewards_config.yaml"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert [c["n"] for c in pipe.calls] == [12, 12]
    assert all((c["steps"], c["guidance"], c["eta"]) == (2, 5.0, 1.0) for c in pipe.calls)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples/n"] == 24 and "contrastive/clip/count" in metrics
    images, prompts = batch
    for name, model in models.items():
        loaded = make_reward({"name": name, "path": str(out / name)})
        assert torch.equal(loaded(images, prompts).scores, model(images, prompts).scores), name


def test_sample_base_drives_a_real_pipeline(tiny_cfg, world):
    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    cfg = load_config(DEFAULT_CONFIG, ["samples.n=4", "samples.per_prompt=2", "samples.batch_size=4",
                                       "samples.num_inference_steps=2"])
    images, prompts = sample_base(pipe, cfg, world)
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]
    train = set(world.prompts("train"))
    assert all(p in train for p in prompts)


def test_bad_config_fails_before_any_work(capsys):
    assert main(["clip.lr=0"]) == 2
    assert "clip.lr must be > 0" in capsys.readouterr().err
    assert main(["samples.per_prompt=1"]) == 2
    assert "samples.per_prompt must be >= 2" in capsys.readouterr().err
