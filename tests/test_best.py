"""`checkpoints/best` holds the very weights its recorded score was measured on, best on the score
that early stopping watches (`early_stop.watch`)."""

import json

import pytest

from t2i_rl.checkpoint import load_checkpoint
from t2i_rl.train import WATCHED, Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides


@pytest.mark.parametrize("watch", sorted(WATCHED))
def test_best_rescored_gives_its_recorded_score_and_epoch(tiny_assets, tmp_path, watch):
    key = WATCHED[watch]

    def config(run: str, epochs: int):
        overrides, reward = tiny_overrides(tiny_assets, tmp_path / run, epochs=epochs)
        return compose_cfg(([*overrides, f"early_stop.watch={watch}"], reward))

    trainer = Trainer(config("run", 3))
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [x[key] for x in lines]  # epochs 0, 1, 2 and the final evaluation, 3
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best", trainer.policy)
    assert state["epoch"] == scores.index(max(scores))  # the first evaluation of the best score
    assert state["scores"][key] == max(scores)
    # the same evaluation sets with their fixed noise, in a run of its own, on best's weights
    fresh = Trainer(config("rescore", 3))
    load_checkpoint(tmp_path / "run" / "checkpoints" / "best", fresh.policy)
    assert json.dumps(fresh.evaluate(state["epoch"]), sort_keys=True) == json.dumps(state["scores"], sort_keys=True)
    # a resumed run knows the best score so far, so that a worse one never replaces best
    resumed = Trainer(config("run", 4))
    assert resumed.start_epoch == 3 and resumed.best_score == max(scores)
