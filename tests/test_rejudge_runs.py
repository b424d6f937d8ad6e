"""benchmarks/rejudge_runs.py: a run's saved evaluation images judged again, its other scores kept."""

import json

import numpy as np

from benchmarks.rejudge_runs import main
from t2i_rl.world import ShapesWorld

PROMPTS = ["one red circle on a white background", "two blue squares on a black background"]


def write_run(run, images: np.ndarray, prompts: list[str]) -> None:
    """A run folder whose epoch-0 evaluation stored stale verdicts: every image wrong, none unsure."""
    (run / "evals").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    split = {"prompts": prompts, "proxy": [0.25, 0.75], "gold": [0.0, 0.0], "gold_correct": [0.0, 0.0],
             "gold_unsure": [0.0, 0.0]}
    (run / "evals" / "epoch0000.json").write_text(json.dumps({"train": split}))
    np.savez(run / "evals" / "epoch0000.npz", train=images)


def test_saved_images_are_judged_again_and_the_proxy_is_kept(tmp_path, capsys):
    world = ShapesWorld()
    # the first image drawn for its prompt, the second for the first prompt: right, then wrong
    images = world.render([PROMPTS[0], PROMPTS[0]], seed=3)
    pixels = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    run = tmp_path / "runs" / "seed0"
    write_run(run, pixels, PROMPTS)
    assert main([str(run), "--out", str(tmp_path / "now")]) == 0
    record = json.loads((tmp_path / "now" / "seed0" / "evals" / "epoch0000.json").read_text())["train"]
    assert record["gold_correct"] == [1.0, 0.0] and record["gold_unsure"] == [0.0, 0.0]
    assert record["proxy"] == [0.25, 0.75] and record["prompts"] == PROMPTS
    assert record["gold"][0] == 1.0 and record["gold"][1] < 1.0
    assert (tmp_path / "now" / "seed0" / "config.yaml").read_text() == "seed: 0\n"
    assert "train 0.0% of 2 -> 50.0% of 2" in capsys.readouterr().out


def test_runs_without_images_or_with_one_name_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "bare" / "evals").mkdir(parents=True)
    assert main([str(tmp_path / "bare"), "--out", str(tmp_path / "now")]) == 2
    assert "holds no saved evaluation images" in capsys.readouterr().err
    (tmp_path / "a" / "seed0").mkdir(parents=True)
    (tmp_path / "b" / "seed0").mkdir(parents=True)
    assert main([str(tmp_path / "a" / "seed0"), str(tmp_path / "b" / "seed0"), "--out", str(tmp_path / "now")]) == 2
    assert "two runs share a folder name" in capsys.readouterr().err
