"""benchmarks/ema_weights.py: the moving average by hand, and a tiny run's evaluations of both weights."""

import json

import pytest
import torch

from benchmarks.ema_weights import main, update_average
from tests.agents.test_train import tiny_overrides


def test_the_average_moves_by_one_minus_decay_towards_the_weights():
    average, params = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    update_average(average, params, 0.75)
    assert average[0].tolist() == [1.5, 1.0]  # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2
    assert params[0].tolist() == [3.0, -2.0]


def test_a_tiny_run_evaluates_live_and_averaged_weights_and_trains_the_live_ones(tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=2)
    extra = [o for o in overrides if not o.startswith("output_dir")]
    extra.append(f"env.reward={{name:textnorm,base:{{name:clip,path:'{tiny_assets['clip']}'}},tau:0.05}}")
    assert main(["--out", str(tmp_path / "run"), "--decays", "0.5", "--every", "1", "--", *extra]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "ema_weights.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["weights"]) for r in rows] == [(0, "live"), (1, "live"), (1, "ema 0.5"), (2, "live"),
                                                          (2, "ema 0.5")]
    saved = sorted(p.name for p in (tmp_path / "run" / "evals").glob("*.json"))
    assert saved == ["epoch0000.json", "epoch0001.json", "epoch0002.json", "epoch10001.json", "epoch10002.json"]
    trained = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in trained] == [0, 1] and "loss/policy" in trained[0]


def test_bad_decays_are_one_error_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--out", "x", "--decays", "1.0"])
    assert stop.value.code == 2 and "--decays must be in (0, 1)" in capsys.readouterr().err
