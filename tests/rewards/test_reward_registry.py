import pytest
import torch
from omegaconf import OmegaConf

from t2i_rl.rewards import (
    Ensemble, GoldReward, LeeReward, PairwiseReward, ShapesCLIP, TextNorm, make_reward, registry,
    reward_names,
)


@pytest.fixture
def assets(tmp_path, monkeypatch, clip, lee, pairwise):
    """Tiny models saved where the shipped ones live."""
    for name, model in {"clip": clip, "lee": lee, "pairwise": pairwise}.items():
        model.save_pretrained(tmp_path / name)
    monkeypatch.setattr(registry, "REWARD_ASSETS", tmp_path)
    return tmp_path


def test_names():
    assert reward_names() == ["clip", "lee", "pairwise", "gold", "ensemble", "textnorm",
                              "clipscore", "pickscore", "hpsv2", "imagereward", "blip2", "aesthetic"]


def test_every_name_builds(assets, batch, clip, lee, pairwise):
    images, prompts = batch
    expected = {"clip": (ShapesCLIP, clip), "lee": (LeeReward, lee), "pairwise": (PairwiseReward, pairwise)}
    for name, (cls, model) in expected.items():
        built = make_reward(name)
        assert isinstance(built, cls) and built.name == name
        assert torch.equal(built(images, prompts).scores, model(images, prompts).scores)
        by_path = make_reward({"name": name, "path": str(assets / name)})
        assert torch.equal(by_path(images, prompts).scores, model(images, prompts).scores)
    assert isinstance(make_reward("gold"), GoldReward)


def test_composite_specs_build_from_dicts_and_omegaconf(assets, batch, clip, lee):
    images, prompts = batch
    spec = OmegaConf.create({
        "name": "textnorm", "tau": {"clip": 0.05, "lee": 2.0}, "k": 4,
        "base": {"name": "ensemble", "members": ["clip", {"name": "lee"}], "mode": "mean_minus_std", "lam": 0.3},
    })
    tn = make_reward(spec)
    assert isinstance(tn, TextNorm) and isinstance(tn.reward, Ensemble)
    assert tn.reward.mode == "mean_minus_std" and tn.reward.lam == 0.3
    assert tn.taus == {"clip": 0.05, "lee": 2.0} and tn.k == 4
    by_hand = TextNorm(Ensemble([clip, lee], mode="mean_minus_std", lam=0.3), tau={"clip": 0.05, "lee": 2.0}, k=4)
    torch.testing.assert_close(tn(images, prompts).scores, by_hand(images, prompts).scores)

    ens = make_reward({"name": "ensemble", "members": ["clip", "lee", "gold"], "mode": "weighted",
                       "weights": {"clip": 1, "lee": 1, "gold": 2}})
    assert ens.member_names == ["clip", "lee", "gold"]
    torch.testing.assert_close(ens.weights.float(), torch.tensor([0.25, 0.25, 0.5]))
    # default tau: each model's own training temperature
    single = make_reward({"name": "textnorm", "base": "lee"})
    assert single.taus == {"lee": lee.temperature}


@pytest.mark.parametrize("spec, match", [
    ("blip", "unknown reward 'blip'; allowed names: clip, lee, pairwise, gold, ensemble, textnorm"),
    ({"name": "nope"}, "unknown reward 'nope'; allowed names: clip, lee"),
    ({"path": "x"}, "has no 'name'"),
    (3, "a reward spec must be a name or a mapping"),
    ({"name": "clip", "tau": 1}, r"unknown keys \['tau'\] for reward 'clip'; allowed keys: \['path'\]"),
    ({"name": "ensemble"}, "an ensemble needs 'members'"),
    ({"name": "ensemble", "members": ["clip", "lee"], "mode": "avg"}, "unknown ensemble mode 'avg'"),
    ({"name": "textnorm"}, "textnorm needs 'base'"),
    ({"name": "textnorm", "base": "clip", "tau": -1.0}, "tau must be a finite number > 0, got -1.0"),
    ({"name": "textnorm", "base": "clip", "tau": {"lee": 1.0}}, r"tau names unknown reward models \['lee'\]"),
    ({"name": "textnorm", "base": "gold"}, "must be a RawReward"),
    ({"name": "ensemble", "members": ["textnorm"]}, "textnorm needs 'base'"),
])
def test_bad_specs_give_clear_errors(assets, spec, match):
    with pytest.raises(ValueError, match=match):
        make_reward(spec)


def test_missing_shipped_weights_say_how_to_train_them(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "REWARD_ASSETS", tmp_path / "none")
    for name in ("clip", "lee", "pairwise"):
        with pytest.raises(FileNotFoundError, match=r"python -m t2i_rl.pretrain --stage rewards"):
            make_reward(name)
    with pytest.raises(FileNotFoundError, match="no lee reward model"):
        make_reward({"name": "lee", "path": str(tmp_path / "elsewhere")})


def test_shipped_asset_folder():
    assert registry.REWARD_ASSETS.parts[-3:] == ("t2i_rl", "assets", "rewards")


def test_the_shipped_web_trained_proxies_load_and_score(batch):
    """t2i_rl/assets/rewards-web: the proxies trained on web-style captions and a simulated rater's
    pairs (`clip.captions=web pairwise.labels=simulated`), loaded by path as any trained folder."""
    images, prompts = batch
    web = registry.REWARD_ASSETS.parent / "rewards-web"
    for name, cls in (("clip", ShapesCLIP), ("lee", LeeReward), ("pairwise", PairwiseReward)):
        reward = make_reward({"name": name, "path": str(web / name)})
        scores = reward(images, prompts).scores
        assert isinstance(reward, cls) and scores.shape == (len(prompts),) and torch.isfinite(scores).all()
    trained = OmegaConf.load(web / "rewards_config.yaml")
    assert trained.clip.captions == "web" and trained.pairwise.labels == "simulated"


def test_a_relative_path_not_found_here_is_looked_up_under_the_assets(batch, tmp_path, monkeypatch):
    """"rewards-web/clip" names the shipped web-caption model from any working folder; a folder of
    that name here is taken first, and a path found in neither place is named in the error."""
    images, prompts = batch
    monkeypatch.chdir(tmp_path)
    web = make_reward({"name": "clip", "path": "rewards-web/clip"})
    same = make_reward({"name": "clip", "path": str(registry.REWARD_ASSETS.parent / "rewards-web" / "clip")})
    assert torch.equal(web(images, prompts).scores, same(images, prompts).scores)
    make_reward("clip").save_pretrained(tmp_path / "rewards-web" / "clip")  # the shipped default model, here
    here = make_reward({"name": "clip", "path": "rewards-web/clip"})
    assert torch.equal(here(images, prompts).scores, make_reward("clip")(images, prompts).scores)
    with pytest.raises(FileNotFoundError, match="nowhere/clip"):
        make_reward({"name": "clip", "path": "nowhere/clip"})
