import torch

from t2i_rl.rewards import GoldReward
from t2i_rl.world import ATTRIBUTES


def test_gold_is_one_on_ground_truth_images(world):
    prompts = world.sample_prompts(12, seed=5)
    images = world.render(prompts, seed=5)
    gold = GoldReward(world)
    out = gold(images, prompts)
    assert not gold.differentiable and gold.name == "gold"
    torch.testing.assert_close(out.scores, torch.ones(12))
    assert set(out.components) == {"gold/score", "gold/correct", "gold/unsure"} | {f"gold/{a}" for a in ATTRIBUTES}
    torch.testing.assert_close(out.components.pop("gold/unsure"), torch.zeros(12))
    for v in out.components.values():
        torch.testing.assert_close(v, torch.ones(12))


def test_gold_sees_a_wrong_background(world):
    prompt = "two red circles on a white background"
    image = world.render([prompt], seed=0)
    out = GoldReward(world)(image, ["two red circles on a black background"])
    assert out.components["gold/background"].item() == 0.0
    assert out.components["gold/correct"].item() == 0.0
    assert out.components["gold/count"].item() == 1.0
    assert out.scores.item() == 0.75  # 3 of the 4 attributes hold
