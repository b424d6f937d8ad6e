"""benchmarks/overoptimization_detectors.py: the damage, the detectors' epochs and lead times, and
monitor scores recomputed from a run's saved evaluation images."""

import json

import pytest

from benchmarks import overoptimization_detectors as D
from t2i_rl.train import Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides


def test_damage_is_the_first_evaluation_after_the_peak_that_far_below_it():
    epochs = [0, 10, 20, 30, 40]
    assert D.damage(epochs, [0.50, 0.60, 0.57, 0.54, 0.40], 0.05) == D.Damage(10, 0.60, 30)
    assert D.damage(epochs, [0.50, 0.60, 0.57, 0.56, 0.58], 0.05) == D.Damage(10, 0.60, None)
    assert D.damage(epochs, [0.6, 0.3, 0.6, 0.3, 0.3], 0.05) == D.Damage(0, 0.6, 10)  # the first peak


def test_hacked_rise_compares_a_trailing_mean_with_the_first_epochs():
    rows = [{"epoch": e, "overopt/hacked_frac": 0.1} for e in range(10)]
    rows += [{"epoch": 10 + e, "overopt/hacked_frac": 0.1 + 0.04 * (e + 1)} for e in range(6)]
    # trailing 5-epoch means from epoch 10: 0.108, 0.124, 0.148, 0.180, 0.220 (> 0.1 + 0.05 first at 13)
    assert D.hacked_rise(rows) == 13
    assert D.hacked_rise(rows[:10]) is None
    assert D.hacked_rise([{"epoch": 0, "overopt/hacked_frac": float("nan")}] * 20) is None


def test_replay_stopper_stops_where_the_trainer_would_and_keeps_the_best_so_far():
    epochs = [0, 10, 20, 30, 40]
    watched, proxy = [0.3, 0.5, 0.4, 0.3, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5]
    assert D.replay_stopper(epochs, watched, proxy, 2) == (30, 10)  # fell at 20 and 30 while the proxy rose
    assert D.replay_stopper(epochs, watched, proxy, 3) == (None, 40)
    assert D.replay_stopper(epochs, watched, [0.5, 0.4, 0.3, 0.2, 0.1], 1) == (None, 40)  # the proxy fell too
    assert D.lead(30, 40) == "+10" and D.lead(None, 40) == "missed" and D.lead(30, None) == "false alarm"
    assert D.lead(None, None) == "–"


def test_a_run_is_measured_from_its_saved_images(tiny_assets, tmp_path, monkeypatch, capsys):
    """The monitor's scores recomputed from the saved uint8 images agree with what the run recorded
    from its float images, and the tables name every detector; the run's own reward model is not a
    held-out monitor."""
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=3)
    Trainer(compose_cfg((overrides, reward))).fit()
    monitor = {"name": "clip", "path": tiny_assets["monitor"]}
    monkeypatch.setattr(D, "MONITORS", {"tiny": monitor, "own": reward["base"]})
    assert D.held_out_monitors(tmp_path / "run") == ["tiny"]
    from t2i_rl.rewards import make_reward

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recorded = [r["eval/heldout/monitor"] for r in rows]
    model = make_reward(monitor)
    again = [D.mean_score(model, *D.saved_images(tmp_path / "run", e)) for e in range(4)]
    assert again == pytest.approx(recorded, abs=0.02)  # uint8 rounding of the images only
    doc = tmp_path / "doc.md"
    assert D.main([str(tmp_path / "run"), "--patience", "1", "--doc", str(doc)]) == 0
    text = doc.read_text()
    for name in ("hacked_frac", "gold, patience 1", "monitor: tiny, patience 1"):
        assert f"| {name} | 1 |" in text
    assert "monitor: own" not in text and "| run |" in text


def test_bad_arguments_get_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        D.main([str(tmp_path)])
    assert stop.value.code == 2 and "not a run folder" in capsys.readouterr().err


def test_the_final_evaluation_is_not_given_to_the_stopper_but_can_be_kept():
    epochs, watched, proxy = [0, 10, 20], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]
    assert D.replay_stopper(epochs, watched, proxy, 2) == (20, 0)
    assert D.replay_stopper(epochs, watched, proxy, 2, final=True) == (None, 0)  # fell only once before the end
    assert D.replay_stopper(epochs, [0.5, 0.4, 0.9], proxy, 2, final=True) == (None, 20)
