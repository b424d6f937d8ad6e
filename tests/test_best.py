"""`checkpoints/best` holds the very weights its recorded score was measured on."""

import json

from t2i_rl.checkpoint import load_checkpoint
from t2i_rl.train import Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides


def test_best_rescored_gives_its_recorded_score_and_epoch(tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=3)
    trainer = Trainer(compose_cfg((overrides, reward)))
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gold = [x["eval/heldout/gold_correct"] for x in lines]  # epochs 0, 1, 2 and the final evaluation, 3
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best", trainer.policy)
    assert state["epoch"] == gold.index(max(gold))  # the first evaluation of the best score
    assert state["scores"]["eval/heldout/gold_correct"] == max(gold)
    # the same evaluation sets with their fixed noise, in a run of its own, on best's weights
    fresh = Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "rescore", epochs=3)))
    load_checkpoint(tmp_path / "run" / "checkpoints" / "best", fresh.policy)
    assert json.dumps(fresh.evaluate(state["epoch"]), sort_keys=True) == json.dumps(state["scores"], sort_keys=True)
    # a resumed run knows the best score so far, so that a worse one never replaces best
    resumed = Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", epochs=4)))
    assert resumed.start_epoch == 3 and resumed.best_gold == max(gold)
