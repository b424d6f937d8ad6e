"""The evaluation images a run saves, and the sheet that shows them with the judge's verdicts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_rl import audit
from t2i_rl.train import Trainer
from t2i_rl.world import ATTRIBUTES, ShapesWorld
from tests.agents.test_train import compose_cfg, record_eval_images, tiny_overrides

SETS = ("train", "heldout")


@pytest.fixture(scope="module")
def tiny_run(tiny_assets, tmp_path_factory):
    """One tiny run (evaluations at epochs 0 and 1): its folder, its evaluation prompts and the float
    images each evaluation judged, {(epoch, set): [N, 3, H, W]}."""
    run_dir = tmp_path_factory.mktemp("audit") / "run"
    trainer = Trainer(compose_cfg(tiny_overrides(tiny_assets, run_dir, epochs=1)))
    judged = record_eval_images(trainer)
    trainer.fit()
    keys = [(epoch, name) for epoch in (0, 1) for name in trainer.eval_sets]
    assert len(judged) == len(keys)
    return run_dir, {name: prompts for name, (prompts, _, _) in trainer.eval_sets.items()}, dict(zip(keys, judged))


def saved(run_dir, epoch):
    record = json.loads((run_dir / "evals" / f"epoch{epoch:04d}.json").read_text())
    with np.load(run_dir / "evals" / f"epoch{epoch:04d}.npz") as f:
        return record, {k: f[k] for k in f.files}


def test_saved_images_are_the_judged_ones(tiny_run):
    run_dir, prompts, judged = tiny_run
    agree = total = 0
    for epoch in (0, 1):
        record, images = saved(run_dir, epoch)
        assert set(images) == set(SETS)
        for name in SETS:
            assert images[name].dtype == np.uint8 and images[name].shape == (4, 32, 32, 3)
            assert record[name]["prompts"] == prompts[name]
            floats = torch.from_numpy(images[name]).permute(0, 3, 1, 2).float() / 255
            assert (floats - judged[epoch, name].clamp(0, 1)).abs().max() <= 1 / 255
            # uint8 rounding may flip a borderline verdict, hardly more
            again = ShapesWorld().judge(floats, prompts[name]).correct.float().tolist()
            agree += sum(a == b for a, b in zip(again, record[name]["gold_correct"]))
            total += len(again)
    assert agree >= 0.9 * total
    assert not list((run_dir / "evals").glob(".*"))  # no temporary file left


def test_rows_are_the_judge_now_on_the_saved_images(tiny_run):
    run_dir, prompts, _ = tiny_run
    result = audit.audit(run_dir, ["last", "0"], "heldout", num=3)
    assert result.epochs == [1, 0] and result.set_name == "heldout" and len(result.rows) == 3
    for epoch, summary in zip(result.epochs, result.summaries):
        record, images = saved(run_dir, epoch)
        direct = ShapesWorld().judge(torch.from_numpy(images["heldout"]).permute(0, 3, 1, 2).float() / 255,
                                     prompts["heldout"])
        unsure = getattr(direct, "unsure", None) or {}
        sure = [not any(bool(unsure[a][i]) for a in unsure) for i in range(4)]
        assert summary.images == 4 and summary.unsure == 4 - sum(sure)
        assert summary.correct == sum(bool(direct.correct[i]) for i in range(4) if sure[i])
        for row in result.rows:
            cell = row.cells[result.epochs.index(epoch)]
            assert row.prompt == prompts["heldout"][row.index] and cell.epoch == epoch
            assert np.array_equal(cell.image, images["heldout"][row.index])
            assert cell.verdicts == {a: None if a in unsure and bool(unsure[a][row.index])
                                     else bool(direct.attributes[a][row.index]) for a in ATTRIBUTES}
            assert cell.score == pytest.approx(float(direct.score[row.index]))
            assert cell.proxy == record["heldout"]["proxy"][row.index]
            assert cell.run_gold == record["heldout"]["gold"][row.index]


def test_an_unsure_judge_is_a_question_mark_and_left_out_of_the_rate(tiny_run, monkeypatch):
    judge = ShapesWorld.judge

    def hesitating(self, images, prompts):
        result = judge(self, images, prompts)
        result.unsure = {"shape": torch.arange(len(prompts)) % 2 == 0}
        return result
    monkeypatch.setattr(ShapesWorld, "judge", hesitating)
    result = audit.audit(tiny_run[0], ["0"], "train", num=4)
    assert [row.cells[0].verdicts["shape"] is None for row in result.rows] == [True, False, True, False]
    assert result.summaries[0].unsure == 2
    assert "shape ?" in "".join(text for text, _ in audit.caption(result.rows[0].cells[0])[1])


def test_rows_spread_across_the_prompts():
    prompts = ["a", "b", "c", "d"] * 4
    assert audit.pick_indices(prompts, 2) == [0, 3]
    assert audit.pick_indices(prompts, 4) == [0, 1, 2, 3]
    assert audit.pick_indices(prompts, 6) == [0, 1, 2, 3, 4, 7]
    assert audit.pick_indices(prompts, 99) == list(range(16))


def test_sheet_shows_each_image_upscaled_in_its_cell(tiny_run, capsys):
    run_dir = tiny_run[0]
    assert audit.main([str(run_dir), "--num", "3", "--scale", "2"]) == 0
    out = run_dir / "audit" / "audit_train_epochs_0-1.png"
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == str(out) and [line.split(" (")[0] for line in lines[:-1]] == ["epoch 0", "epoch 1"]
    layout = audit.SheetLayout(rows=3, cols=2, height=32, width=32, scale=2)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (layout.size[1], layout.size[0], 3)
    assert layout.size[0] >= 2 * 32 * 2 and layout.size[1] >= 3 * 32 * 2
    row = audit.audit(run_dir, ["0", "last"], "train", num=3).rows[2]
    x, y = layout.image_origin(2, 1)
    assert np.array_equal(sheet[y:y + 64, x:x + 64], row.cells[1].image.repeat(2, axis=0).repeat(2, axis=1))


@pytest.fixture
def bad_runs(tiny_run, tmp_path):
    """Run folders the audit cannot use: none, one that never evaluated, one from before image saving."""
    (tmp_path / "fresh").mkdir()
    old = tmp_path / "old" / "evals"
    old.mkdir(parents=True)
    shutil.copy(tiny_run[0] / "evals" / "epoch0000.json", old)
    return {"good": tiny_run[0], "missing": tmp_path / "missing", "fresh": tmp_path / "fresh",
            "old": tmp_path / "old"}


@pytest.mark.parametrize("run, args, message", [
    ("missing", [], "no run folder"),
    ("fresh", [], "has not evaluated yet"),
    ("old", [], "predates image saving"),
    ("good", ["--epochs", "0", "7"], "evaluated: 0, 1"),
    ("good", ["--epochs", "first"], "'last'"),
    ("good", ["--set", "test"], "sets: train, heldout"),
    ("good", ["--num", "0"], "--num = 0"),
    ("good", ["--scale", "0"], "--scale = 0"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(bad_runs, tmp_path, capsys, run, args, message):
    out = tmp_path / "sheet" / "audit.png"
    assert audit.main([str(bad_runs[run]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "sheet").exists()


def test_command_line_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        audit.main([str(tmp_path), "--num", "many"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument --num")
    done = subprocess.run([sys.executable, "-m", "t2i_rl.audit", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: no run folder")
