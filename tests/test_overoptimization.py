"""benchmarks/overoptimization.py end to end on the tiny pipeline: the grid trains one folder per
cell, skips finished cells, resumes unfinished ones, and writes its table and plots."""

import json

import pytest

from benchmarks.overoptimization import cell, cell_summary, curve, head_to_head, main, read_metrics


def tiny(assets) -> list[str]:
    return [f"model.pipeline={assets['pipeline']}", "env.batch_size=2", "env.num_steps=2",
            "agent.samples_per_epoch=4", "agent.train_batch_size=2", "agent.group_size=2", "agent.train_steps=1",
            "agent.lora_rank=4", "eval.num_prompts=4", "eval.train_images=4", "eval.batch_size=4",
            "diagnostics.kl_samples=2"]


def test_the_grid_trains_each_cell_once_resumes_and_writes_its_table(tiny_assets, tmp_path, capsys):
    out, doc = tmp_path / "runs", tmp_path / "doc" / "overopt.md"
    args = ["--agents", "ddpo", "--rewards", "raw", "textnorm", "--seeds", "0", "--every", "1",
            "--out", str(out), "--doc", str(doc)]
    assert main([*args, "--epochs", "1", "--", *tiny(tiny_assets)]) == 0
    cells = [out / "ddpo-raw-seed0", out / "ddpo-textnorm-seed0"]
    for run in cells:
        assert [row["epoch"] for row in read_metrics(run)] == [0, 1]
    before = [(run / "metrics.jsonl").read_text() for run in cells]
    capsys.readouterr()
    assert main([*args, "--epochs", "1", "--", *tiny(tiny_assets)]) == 0  # finished: nothing runs again
    assert "0 of 2 cells to run" in capsys.readouterr().out
    assert [(run / "metrics.jsonl").read_text() for run in cells] == before
    assert main([*args, "--epochs", "2", "--", *tiny(tiny_assets)]) == 0  # longer: each cell resumes
    for run in cells:
        assert [row["epoch"] for row in read_metrics(run)] == [0, 1, 2]
    text = doc.read_text()
    assert "| ddpo | raw | 1 |" in text and "| ddpo | textnorm | 1 |" in text
    assert "| agent | reward vs raw |" in text and "| ddpo | textnorm | 1 | 4 |" in text  # 4 held-out images
    assert doc.with_suffix(".png").stat().st_size > 10_000  # one agent: the doc's name


def test_cell_summary_finds_the_peak_and_the_end():
    points = [{"epoch": e, "kl": kl, "train_gold": g, "heldout_gold": h, "proxy": r}
              for e, kl, g, h, r in [(0, 0.0, 0.5, 0.4, 0.2), (25, 30.0, 0.7, 0.38, 0.3), (50, 90.0, 0.6, 0.3, 0.4)]]
    s = cell_summary(points)
    assert (s["peak_gold"], s["peak_epoch"], s["peak_kl"], s["peak_heldout"]) == (0.7, 25, 30.0, 0.38)
    assert (s["end_gold"], s["end_proxy"], s["end_kl"], s["base_gold"]) == (0.6, 0.4, 90.0, 0.5)
    assert json.dumps(s)  # plain numbers, as the table prints them


def test_a_cell_continued_past_the_grid_is_summarized_up_to_the_grids_epochs(tmp_path):
    run = tmp_path / "cell"
    run.mkdir()
    rows = [{"epoch": e, "eval/train/gold_correct": g, "eval/heldout/gold_correct": g, "eval/train/proxy": e / 100}
            for e, g in [(0, 0.5), (10, 0.6), (20, 0.4)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["epoch"] for p in curve(run)] == [0, 10, 20]
    assert [p["epoch"] for p in curve(run, 10)] == [0, 10]
    assert cell_summary(curve(run, 10))["end_gold"] == 0.6


def test_bad_arguments_get_one_error_line_and_run_nothing(tmp_path, capsys):
    for args, message in ([["--parallel", "0"], "--parallel must be in [1, "], [["--parallel", "x"], "not an int: 'x'"],
                          [["--epochs", "0"], "--epochs must be >= 1, got 0"]):
        with pytest.raises(SystemExit) as stop:
            main([*args, "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "doc.md")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "doc.md").exists()


def write_eval(out, agent, reward, seed, epoch, prompts, gold):
    folder = cell(out, agent, reward, seed) / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"prompts": prompts, "gold": gold, "proxy": [0.0] * len(gold)}
    (folder / f"epoch{epoch:04d}.json").write_text(json.dumps({"train": record, "heldout": record}))


def test_head_to_head_counts_wins_ties_and_losses_image_by_image(tmp_path):
    prompts = ["p0", "p1", "p2", "p3"]
    write_eval(tmp_path, "ddpo", "raw", 0, 5, prompts, [0.5, 0.5, 1.0, 0.25])
    write_eval(tmp_path, "ddpo", "textnorm", 0, 5, prompts, [0.75, 0.5, 0.5, 1.0])  # win, tie, loss, win
    write_eval(tmp_path, "ddpo", "raw", 1, 5, ["q0", "q1"], [0.0, 1.0])
    write_eval(tmp_path, "ddpo", "textnorm", 1, 5, ["q0", "q1"], [1.0, 1.0])  # win, tie
    r = head_to_head(tmp_path, "ddpo", "textnorm", "raw", [0, 1, 2], 5)  # seed 2 has no runs: left out
    assert (r["n"], r["seeds"]) == (6, 2)
    assert (r["win"], r["tie"], r["loss"]) == pytest.approx((3 / 6, 2 / 6, 1 / 6))
    assert r["net"] == pytest.approx(2 / 6) and r["net_per_seed"] == pytest.approx([1 / 4, 1 / 2])
    for key in ("win", "tie", "loss", "net"):
        low, high = r[f"{key}_ci"]
        assert low <= r[key] <= high
    assert head_to_head(tmp_path, "ddpo", "textnorm", "raw", [2], 5) is None
    write_eval(tmp_path, "ddpo", "raw", 3, 5, ["a"], [0.0])
    write_eval(tmp_path, "ddpo", "textnorm", 3, 5, ["b"], [0.0])
    with pytest.raises(ValueError, match="seed 3: textnorm and raw were evaluated on other prompts"):
        head_to_head(tmp_path, "ddpo", "textnorm", "raw", [3], 5)
