"""benchmarks/pooled_paired_change.py: runs' paired changes pooled image by image, against a hand computation."""

import json

import pytest

from benchmarks.pooled_paired_change import main, pooled_change


def write_evals(run, epoch, gold, proxy, prompts=("a", "b")):
    (run / "evals").mkdir(parents=True, exist_ok=True)
    split = {"prompts": list(prompts), "gold_correct": gold, "proxy": proxy, "gold": gold, "gold_unsure": [0.0] * 2}
    (run / "evals" / f"epoch{epoch:04d}.json").write_text(json.dumps({"train": split, "heldout": split}))


def test_changes_are_pooled_over_runs_and_bad_runs_are_named(tmp_path, capsys):
    one, two = tmp_path / "seed0", tmp_path / "seed1"
    write_evals(one, 0, [0.0, 1.0], [0.1, 0.2])
    write_evals(one, 50, [1.0, 1.0], [0.3, 0.2])
    write_evals(two, 0, [0.0, 0.0], [0.5, 0.5])
    write_evals(two, 50, [0.0, 1.0], [0.4, 0.9])
    change, low, high = pooled_change([one, two], 0, 50, "train", "gold_correct")
    assert change == pytest.approx((1 + 0 + 0 + 1) / 4)  # four images, each its own (run, prompt) cluster
    assert 0 <= low <= change <= high <= 1
    assert pooled_change([one, two], 0, 50, "train", "proxy")[0] == pytest.approx((0.2 + 0.0 - 0.1 + 0.4) / 4)
    assert main([str(one), str(two), "--epochs", "50"]) == 0
    assert "| 50 | train | all-correct (points) | +50.0 [" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([str(one), "--epochs", "100"])
    assert stop.value.code == 2 and "has no evaluation at epoch 100" in capsys.readouterr().err
    write_evals(two, 100, [0.0, 0.0], [0.5, 0.5], prompts=("a", "c"))
    write_evals(two, 150, [0.0, 0.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="the evaluations at epochs 100 and 150 are of other prompts"):
        pooled_change([two], 100, 150, "train", "proxy")
