"""benchmarks/reward_controls.py: the Trainer's run with the judge (or its negation) as the reward."""

import json

import pytest

from benchmarks.reward_controls import JudgeReward, main
from t2i_rl.rewards import GoldReward
from tests.agents.test_train import tiny_overrides


@pytest.mark.parametrize("control", ["oracle", "anti"])
def test_a_control_run_optimizes_the_judge_or_its_negation(tiny_assets, tmp_path, control):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", env="raw")
    main(["--control", control, *overrides, f"env.reward={{name:clip,path:'{reward['path']}'}}", "samples.every=0"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:  # the proxy the run optimized and was evaluated on is the judge's score (or 1 minus it)
        gold, proxy = row["eval/train/gold"], row["eval/train/proxy"]
        assert proxy == pytest.approx(gold if control == "oracle" else 1 - gold, abs=1e-6)
    trained = [r for r in rows if "reward/proxy" in r]  # the epochs' own samples (epoch 0 only evaluates)
    assert trained and all(r["reward/proxy"] == pytest.approx(r["reward/gold"] if control == "oracle"
                                                              else 1 - r["reward/gold"], abs=1e-6) for r in trained)


def test_a_control_names_itself_in_the_config_and_refuses_agents_that_would_not_optimize_it(tiny_assets, tmp_path,
                                                                                            capsys):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", env="raw")
    clip = f"env.reward={{name:clip,path:'{reward['path']}'}}"
    main(["--control", "anti", *overrides, clip, "samples.every=0"])
    assert "control: anti" in (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()  # the first run's progress bars
    with pytest.raises(SystemExit) as stop:
        main(["--control", "oracle", *overrides, clip, "samples.every=0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output_dir = ") and "holds a run of another config (control: anti -> oracle" in err
    assert err.count("\n") == 1  # one line, no traceback
    refl, _ = tiny_overrides(tiny_assets, tmp_path / "refl", agent="refl", env="raw")
    with pytest.raises(SystemExit) as stop:
        main(["--control", "oracle", *refl, clip])
    assert stop.value.code == 2 and "agent=refl is invalid for a reward control" in capsys.readouterr().err


def test_the_judge_reward_is_the_gold_score_and_refuses_other_controls():
    import torch

    from t2i_rl.world import ShapesWorld

    world = ShapesWorld()
    prompts = ["one red circle on a white background", "two blue squares on a black background"]
    images = world.render(prompts, seed=0)
    gold = GoldReward(world)(images, prompts).scores
    assert torch.allclose(JudgeReward("oracle")(images, prompts).scores, gold)
    assert torch.allclose(JudgeReward("anti")(images, prompts).scores, 1 - gold)
    with pytest.raises(ValueError, match=r"control must be one of \('oracle', 'anti'\), got 'gold'"):
        JudgeReward("gold")
