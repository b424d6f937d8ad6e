"""The judge is the gold reward: its agreement with the ground truth is the base of every figure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2i_rl.world import ShapesWorld, parse_prompt, verdict

N = 300  # the full 2,000-image check is the slow test below


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    x = torch.arange(-1, 2, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def agreement(world: ShapesWorld, n: int, corrupt, seed: int) -> float:
    """Fraction of (image, prompt) pairs on which the judge's all-correct equals the truth's.

    Each image is judged against its own prompt (truth: correct) and against a random
    contrastive prompt (truth: computed from the layout), so both kinds of error count.
    """
    rng = np.random.default_rng(seed)
    prompts = world.sample_prompts(n, seed=seed)
    images, layouts = world.render_with_layouts(prompts, seed=seed)
    images = corrupt(images, torch.Generator().manual_seed(seed))
    others = [str(rng.choice(world.contrastive(p))) for p in prompts]
    hits = []
    for asked in (prompts, others):
        result = world.judge(images, asked)
        for i, lay in enumerate(layouts):
            groups, bg = verdict(world.truth(lay), parse_prompt(asked[i]))
            truth = bg and all(all(g.values()) for g in groups)
            hits.append(bool(result.correct[i]) == truth)
    return float(np.mean(hits))


CORRUPTIONS = {
    "clean": (lambda x, g: x, 0.99),
    "noise": (lambda x, g: (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1), 0.95),
    "blur": (lambda x, g: gaussian_blur(x), 0.95),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_judge_agrees_with_ground_truth(name):
    corrupt, floor = CORRUPTIONS[name]
    assert agreement(ShapesWorld(), N, corrupt, seed=1234) >= floor


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_judge_agrees_on_2000_unseen_images(name):
    corrupt, floor = CORRUPTIONS[name]
    assert agreement(ShapesWorld(), 2000, corrupt, seed=98765) >= floor


def test_attribute_verdicts_on_a_known_mismatch():
    w = ShapesWorld()
    images = w.render(["two red circles on a white background"], seed=0)
    r = w.judge(images, ["three red squares on a pink background"])
    assert not r.attributes["count"][0] and not r.attributes["shape"][0]
    assert not r.attributes["background"][0] and r.attributes["color"][0]
    assert r.score[0].item() == pytest.approx(1 / 4)
    assert not r.correct[0]


def test_two_object_prompts_get_per_group_verdicts():
    w = ShapesWorld()
    images = w.render(["one red circle and two blue squares on a gray background"], seed=2)
    r = w.judge(images, ["one red circle and three blue squares on a gray background"])
    assert r.groups[0] == [
        {"count": True, "color": True, "shape": True},
        {"count": False, "color": True, "shape": True},
    ]
    assert r.score[0].item() == pytest.approx(6 / 7)


def test_blank_and_random_images_are_judged_without_error():
    w = ShapesWorld()
    prompts = ["one red circle on a white background"] * 3
    images = torch.stack([torch.ones(3, 32, 32), torch.zeros(3, 32, 32), torch.rand(3, 32, 32)])
    r = w.judge(images, prompts)
    assert not r.correct.any()
    assert ((r.score >= 0) & (r.score <= 1)).all()


def test_larger_images_are_read_at_the_world_resolution():
    w = ShapesWorld()
    prompts = w.sample_prompts(16, seed=5)
    big = F.interpolate(w.render(prompts, seed=5), scale_factor=2, mode="nearest")
    assert w.judge(big, prompts).correct.float().mean() >= 0.9


@pytest.mark.parametrize("images, match", [
    (torch.rand(2, 32, 32), "shape"),
    (torch.rand(2, 1, 32, 32), "shape"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.rand(3, 3, 32, 32), "3 images for 2 prompts"),
])
def test_bad_images_raise_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        ShapesWorld().judge(images, ["one red circle on a white background"] * 2)
