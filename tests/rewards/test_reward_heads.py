import json

import pytest
import torch
import torch.nn.functional as F

from t2i_rl.rewards import LeeReward, PairwiseReward, bradley_terry_loss, lee_loss, preference_pairs


@pytest.mark.parametrize("which", ["lee", "pairwise"])
def test_gradients_reach_the_image_only(which, request, batch):
    model = request.getfixturevalue(which)
    images, prompts = batch
    x = images.clone().requires_grad_(True)
    out = model(x, prompts)
    assert out.scores.shape == (4,) and set(out.components) == {f"rm/{which}"}
    out.scores.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.head.parameters())
    assert all(p.grad is None for p in model.clip.model.parameters())
    assert model.name == which and model.differentiable


@pytest.mark.parametrize("which", ["lee", "pairwise"])
def test_score_prompts_agrees_with_call(which, request, batch, world):
    model = request.getfixturevalue(which)
    images, prompts = batch
    sets = [[p] + world.contrastive(p, k=4) for p in prompts]
    scores = model.score_prompts(images, sets)
    assert scores.shape == (4, 5)
    torch.testing.assert_close(scores[:, 0], model(images, prompts).scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[:, 3], model(images, [s[3] for s in sets]).scores, rtol=1e-5, atol=1e-6)


def test_head_reads_image_text_and_product(lee, clip, batch):
    images, prompts = batch
    img, txt = clip.image_embeds(images), clip.text_embeds(prompts)
    d = clip.embed_dim
    feats = torch.cat([img * d**0.5, txt * d**0.5, img * txt * d], -1)
    torch.testing.assert_close(lee(images, prompts).scores, lee.head.mlp(feats).squeeze(-1))


def test_lee_loss_by_hand():
    scores = torch.tensor([[0.9, 0.1, -0.2], [0.2, 0.4, 0.0], [0.5, 0.3, 0.3]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    labels = torch.tensor([1.0, 0.0, 1.0])
    classify = labels > 0.5
    terms = lee_loss(scores, labels, mask, classify, temperature=2.0, lam=0.5)
    mse = ((0.9 - 1) ** 2 + 0.2**2 + (0.5 - 1) ** 2) / 3
    ce0 = -(0.45 - torch.logsumexp(torch.tensor([0.45, 0.05, -0.1]), 0))
    ce2 = -(0.25 - torch.logsumexp(torch.tensor([0.25, 0.15, 0.15]), 0))
    ce = (ce0 + ce2) / 2
    torch.testing.assert_close(terms["mse"], torch.tensor(mse))
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["loss"], mse + 0.5 * ce)
    # the padded prompt of row 1 is masked: with every row classified it must not count
    all_rows = lee_loss(scores, labels, mask, None, temperature=2.0, lam=0.5)
    ce1 = -(0.1 - torch.logsumexp(torch.tensor([0.1, 0.2]), 0))
    torch.testing.assert_close(all_rows["ce"], (ce0 + ce1 + ce2) / 3)


def test_bradley_terry_and_pairs():
    rw, rl = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(bradley_terry_loss(rw, rl), -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-2.0))) / 2)
    prompts = ["a", "a", "a", "b", "b", "c"]
    scores = torch.tensor([0.5, 1.0, 0.5, 0.25, 0.75, 1.0])
    pairs = preference_pairs(prompts, scores)
    # ties (0 vs 2) are skipped, pairs never cross prompts, the winner comes first
    assert pairs.tolist() == [[1, 0], [1, 2], [4, 3]]
    assert preference_pairs(["a"], torch.tensor([1.0])).shape == (0, 2)


@pytest.mark.parametrize("cls", [LeeReward, PairwiseReward])
def test_save_load_round_trip_is_exact(cls, request, batch, tmp_path):
    model = request.getfixturevalue(cls.name)
    images, prompts = batch
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["kind"] == cls.kind
    loaded = cls.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded(images, prompts).scores, model(images, prompts).scores)
    other = PairwiseReward if cls is LeeReward else LeeReward
    with pytest.raises(ValueError, match=f"not '{other.kind}'"):
        other.from_pretrained(tmp_path / "m")


def test_lee_keeps_its_training_constants(clip, tmp_path):
    lee = LeeReward.build(clip, hidden=8, temperature=3.0, lam=0.25)
    lee.save_pretrained(tmp_path / "lee")
    loaded = LeeReward.from_pretrained(tmp_path / "lee")
    assert (loaded.temperature, loaded.lam, loaded.default_tau) == (3.0, 0.25, 3.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1"):
        LeeReward.build(clip, temperature=-1)
