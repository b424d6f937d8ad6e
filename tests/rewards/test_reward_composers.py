import math

import pytest
import torch

from t2i_rl.rewards import Ensemble, GoldReward, RawReward, TextNorm


class TableReward(RawReward):
    """r(x, y) = a * mean(x) + table[y]: known scores, differentiable in x."""

    differentiable = True

    def __init__(self, name, table, a=1.0, default_tau=1.0):
        self.name, self.table, self.a, self.default_tau = name, table, a, default_tau

    def score_prompts(self, images, prompt_sets):
        base = self.a * images.mean((1, 2, 3))
        return base[:, None] + torch.tensor([[self.table[p] for p in s] for s in prompt_sets])


PROMPTS = ["p", "q"]
ALTS = {"p": ["p1", "p2", "p"], "q": ["q1"]}  # ragged; "p" itself is dropped from its own set
R1 = TableReward("r1", {"p": 1.0, "p1": 0.5, "p2": -1.0, "q": 0.0, "q1": 2.0}, a=2.0)
R2 = TableReward("r2", {"p": 0.2, "p1": 0.4, "p2": 0.0, "q": 1.0, "q1": -1.0}, a=0.0)
IMAGES = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])


def softmax_first(values, tau):
    z = [math.exp(v / tau) for v in values]
    return z[0] / sum(z)


def test_textnorm_single_model_by_hand():
    tn = TextNorm(R1, contrastive=ALTS.__getitem__, tau=0.5)
    out = tn(IMAGES, PROMPTS)
    # image 0: mean 0.25 -> offset 0.5; image 1: mean 0.75 -> offset 1.5 (the offset cancels)
    expected = [softmax_first([1.5, 1.0, -0.5], 0.5), softmax_first([1.5, 3.5], 0.5)]
    torch.testing.assert_close(out.scores, torch.tensor(expected))
    torch.testing.assert_close(out.components["textnorm/confidence"], out.scores)
    torch.testing.assert_close(out.components["textnorm/r1"], out.scores)
    torch.testing.assert_close(out.components["rm/r1"], torch.tensor([1.5, 1.5]))
    assert tn.contrastive_prompts("p") == ["p1", "p2"]


def test_textnorm_of_an_ensemble_normalizes_then_combines():
    ens = Ensemble([R1, R2], mode="mean_minus_std", lam=0.5)
    tn = TextNorm(ens, contrastive=ALTS.__getitem__, tau={"r1": 0.5, "r2": 2.0})
    out = tn(IMAGES, PROMPTS)
    c1 = torch.tensor([softmax_first([1.5, 1.0, -0.5], 0.5), softmax_first([1.5, 3.5], 0.5)])
    c2 = torch.tensor([softmax_first([0.2, 0.4, 0.0], 2.0), softmax_first([1.0, -1.0], 2.0)])
    mean, std = (c1 + c2) / 2, (c1 - c2).abs() / 2  # population std of two values
    torch.testing.assert_close(out.scores, mean - 0.5 * std)
    torch.testing.assert_close(out.components["textnorm/r1"], c1)
    torch.testing.assert_close(out.components["textnorm/r2"], c2)
    torch.testing.assert_close(out.components["rm/r2"], torch.tensor([0.2, 1.0]))
    # a tau missing from the dict falls back to the model's default_tau
    assert TextNorm(ens, contrastive=ALTS.__getitem__, tau={"r1": 0.5}).taus == {"r1": 0.5, "r2": 1.0}


def test_textnorm_on_clip_equals_softmax_of_score_prompts(clip, batch, world):
    images, prompts = batch
    tn = TextNorm(clip, tau=0.1, k=5, seed=3)
    sets = [[p] + world.contrastive(p, k=5, seed=3) for p in prompts]
    assert [tn.contrastive_prompts(p) for p in prompts] == [s[1:] for s in sets]
    expected = torch.softmax(clip.score_prompts(images, sets) / 0.1, dim=1)[:, 0]
    out = tn(images, prompts)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-6)
    assert ((out.scores > 0) & (out.scores < 1)).all()
    assert tn.differentiable
    x = images.clone().requires_grad_(True)
    tn(x, prompts).scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_textnorm_confidence_is_uniform_when_all_scores_are_equal():
    flat = TableReward("flat", {p: 0.3 for p in ["p", "p1", "p2", "q", "q1"]})
    out = TextNorm(flat, contrastive=ALTS.__getitem__, tau=0.7)(IMAGES, PROMPTS)
    torch.testing.assert_close(out.scores, torch.tensor([1 / 3, 1 / 2]))  # 1 / (K + 1), K = 2 and 1


def test_ensemble_modes_by_hand():
    prompts = ["p", "q"]
    s1, s2 = torch.tensor([1.5, 1.5]), torch.tensor([0.2, 1.0])  # R1 and R2 on (IMAGES, prompts)
    cases = {
        "mean": (s1 + s2) / 2,
        "mean_minus_std": (s1 + s2) / 2 - 0.3 * (s1 - s2).abs() / 2,
        "min": torch.minimum(s1, s2),
        "weighted": 0.25 * s1 + 0.75 * s2,
    }
    for mode, expected in cases.items():
        weights = {"r1": 1.0, "r2": 3.0} if mode == "weighted" else None
        out = Ensemble([R1, R2], mode=mode, lam=0.3, weights=weights)(IMAGES, prompts)
        torch.testing.assert_close(out.scores, expected, msg=mode)
        torch.testing.assert_close(out.components["rm/r1"], s1)
        torch.testing.assert_close(out.components["rm/r2"], s2)
    listed = Ensemble([R1, R2], mode="weighted", weights=[1.0, 3.0])(IMAGES, prompts)
    torch.testing.assert_close(listed.scores, cases["weighted"])


def test_ensemble_keeps_member_components_and_gradients(clip, lee, batch):
    images, prompts = batch
    ens = Ensemble([clip, lee, GoldReward()], mode="mean")
    out = ens(images, prompts)
    assert {"rm/clip", "rm/lee", "rm/gold", "gold/score", "gold/count"} <= set(out.components)
    assert not ens.differentiable  # gold is not
    ens = Ensemble([clip, lee], mode="mean_minus_std")
    assert ens.differentiable
    x = images.clone().requires_grad_(True)
    ens(x, prompts).scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_std_of_identical_members_has_a_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    Ensemble([R1, R2], mode="mean_minus_std").combine(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="median"), "unknown ensemble mode 'median'; allowed: mean, mean_minus_std, min, weighted"),
    (dict(lam=-1), "lam must be a finite number >= 0, got -1"),
    (dict(mode="weighted"), "mode='weighted' needs weights"),
    (dict(mode="weighted", weights={"r1": 1, "r3": 1}), r"unknown: \['r3'\], missing: \['r2'\]"),
    (dict(mode="weighted", weights=[1.0]), "weights must be 2 numbers"),
    (dict(mode="weighted", weights=[0, 0]), "must not all be 0"),
    (dict(mode="weighted", weights=[1, -1]), "weight of 'r2' must be a finite number >= 0"),
    (dict(weights=[1, 1]), "weights are only used with mode='weighted'"),
])
def test_ensemble_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Ensemble([R1, R2], **kwargs)


def test_ensemble_rejects_bad_members():
    with pytest.raises(ValueError, match=r"unique.*\['r1'\]"):
        Ensemble([R1, R1])
    with pytest.raises(ValueError, match="non-empty list"):
        Ensemble([])
    with pytest.raises(ValueError, match="must be a RewardFunction, got str"):
        Ensemble(["clip"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau must be a finite number > 0, got 0.0"),
    (dict(tau=float("nan")), "tau must be a finite number > 0"),
    (dict(tau="big"), "tau must be a finite number > 0, got 'big'"),
    (dict(tau={"r9": 1.0}), r"tau names unknown reward models \['r9'\]; allowed: \['r1'\]"),
    (dict(tau={"r1": -2}), r"tau\['r1'\] must be a finite number > 0, got -2"),
    (dict(k=-1), "k must be an integer >= 0 or None"),
    (dict(k=1.5), "k must be an integer >= 0 or None"),
    (dict(contrastive="p1"), "contrastive must be a callable"),
    (dict(seed="x"), "seed must be an integer"),
])
def test_textnorm_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextNorm(R1, **kwargs)


def test_textnorm_needs_raw_rewards():
    with pytest.raises(ValueError, match="must be a RawReward or an Ensemble of RawRewards, got GoldReward"):
        TextNorm(GoldReward())
    with pytest.raises(ValueError, match="ensemble member 'gold'"):
        TextNorm(Ensemble([R1, GoldReward()]))
    bad = TextNorm(R1, contrastive=lambda p: "p1")
    with pytest.raises(ValueError, match="must return a list of strings"):
        bad(IMAGES, PROMPTS)
