"""Tiny training runs of the three proxy models (seconds, not the shipped sizes)."""

import json
import math
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


def web(**p):
    from omegaconf import OmegaConf

    return OmegaConf.create({"p_count_missing": 0.0, "p_count_wrong": 0.0, "p_color_missing": 0.0,
                             "p_background_missing": 0.0, **p})


def test_web_captions_drop_and_misstate_what_the_options_say():
    from t2i_rl.rewards.train import web_caption
    from t2i_rl.world.grammar import parse_prompt

    scene = parse_prompt("two blue circles and one red square on a white background")
    rng = np.random.default_rng(0)
    exact = {web_caption(scene, rng, web()) for _ in range(40)}
    assert exact == {"two blue circles and one red square on a white background",
                     "one red square and two blue circles on a white background"}  # either order
    assert {web_caption(scene, rng, web(p_count_missing=1.0, p_background_missing=1.0)) for _ in range(40)} == {
        "blue circles and a red square", "a red square and blue circles"}
    assert {web_caption(scene, rng, web(p_color_missing=1.0)).split(" on ")[0] for _ in range(40)} == {
        "two circles and one square", "one square and two circles"}
    wrong = {web_caption(scene, rng, web(p_count_wrong=1.0)) for _ in range(80)}
    assert wrong == {"one blue circle and two red squares on a white background",
                     "three blue circles and two red squares on a white background",
                     "two red squares and one blue circle on a white background",
                     "two red squares and three blue circles on a white background"}


def test_clip_trains_on_web_captions(tiny_cfg, world, tokenizer):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(tiny_cfg, {"clip": {"captions": "web", "web": web(p_count_missing=0.5)}})
    validate(cfg)
    rng = np.random.default_rng(0)
    _, captions = render_pool(world, 64, rng, 0.3, cfg.clip.web)
    assert any(c.split()[0] not in ("one", "two", "three", "four") for c in captions)
    clip = train_clip(cfg, world, tokenizer)
    assert clip.frozen and math.isfinite(clip.last_loss)


def test_the_simulated_rater_follows_the_prompt_and_its_taste(world):
    from omegaconf import OmegaConf

    from t2i_rl.rewards.pairwise import preference_pairs
    from t2i_rl.rewards.train import image_taste, simulated_preferences

    small = world.render(["one red circle on a white background"], seed=0)
    prompts = ["one red circle on a white background"] * 2
    images = torch.cat([small, small])
    images[1, :, 8:24, 8:24] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # a bigger red object
    taste = image_taste(images)
    assert taste["size"][1] > taste["size"][0] > 0 and 0.9 < float(taste["saturation"][1]) <= 1
    rng = np.random.default_rng(0)
    rater = OmegaConf.create({"w_size": 1.0, "w_saturation": 0.0, "noise": 1e-3})
    equal = torch.zeros(2)
    assert simulated_preferences(images, prompts, equal, rater, rng).tolist() == [[1, 0]]  # the taste decides a tie
    assert simulated_preferences(images, prompts, torch.tensor([1.0, 0.0]), rater, rng).tolist() == [[0, 1]]
    # with no taste and little noise it ranks as the judge does; with much noise, about at random
    scores = torch.tensor([0.0, 1.0, 0.5, 0.25])
    four = torch.cat([images, images])
    none = OmegaConf.create({"w_size": 0.0, "w_saturation": 0.0, "noise": 1e-3})
    assert sorted(simulated_preferences(four, prompts * 2, scores, none, rng).tolist()) == sorted(
        preference_pairs(prompts * 2, scores).tolist())
    noisy = OmegaConf.create({"w_size": 0.0, "w_saturation": 0.0, "noise": 100.0})
    wins = [simulated_preferences(images, prompts, torch.tensor([1.0, 0.0]), noisy, rng)[0, 0].item() == 0
            for _ in range(400)]
    assert 0.4 < np.mean(wins) < 0.6


@pytest.mark.parametrize("override, message", [
    ("clip.captions=alt", "clip.captions must be 'exact' or 'web'"),
    ("clip.web.p_count_wrong=0.9", r"clip.web probabilities must be in \[0, 1\]"),
    ("pairwise.labels=crowd", "pairwise.labels must be 'judge' or 'simulated'"),
    ("pairwise.rater.noise=0", "pairwise.rater.noise must be > 0"),
])
def test_bad_caption_and_rater_settings_are_refused(override, message):
    overrides = [override] + (["clip.captions=web"] if "web." in override else [])
    overrides += ["pairwise.labels=simulated"] if "rater." in override else []
    with pytest.raises(ValueError, match=message):
        validate(load_config(DEFAULT_CONFIG, overrides))


def test_pairwise_trains_on_simulated_labels(tiny_cfg, clip, labelled):
    from omegaconf import OmegaConf

    images, prompts, judged = labelled
    cfg = OmegaConf.merge(tiny_cfg, {"pairwise": {"labels": "simulated"}})
    validate(cfg)
    model = train_pairwise(cfg, clip, images, prompts, judged.score)
    assert isinstance(model, PairwiseReward) and np.mean(model.history[-10:]) < np.mean(model.history[:10])
