"""`benchmark rewards --tia2 FOLDER`: TextNorm's TIA2 release, read as it is.

A synthetic folder in the release's layout (human_annotations/human_labels_<split>.json,
prompts/prompt_set_<split>.json, alignment_scores/alignment_scores_<split>.json, images/<split>/),
rendered with ShapesWorld so that scores mean something, with -1 votes, a prompt whose labels are
all equal and image names that repeat across splits; and the release's own annotation files,
shipped in tests/data/tia2."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_rl.benchmark import main
from t2i_rl.metrics import prompt_metrics
from t2i_rl.rewards import ShapesCLIP, TextNorm, make_reward
from t2i_rl.rewards.contrastive import JsonContrastive, RuleContrastive
from t2i_rl.tia2 import (
    format_tia2_table,
    load_images,
    load_tia2,
    read_reference,
    read_scores,
    score_folder_images,
    score_metrics,
    tia2_report,
)
from t2i_rl.world import ShapesWorld

RELEASE = Path(__file__).parent / "data" / "tia2"
DOC = Path(__file__).parents[1] / "docs" / "results" / "tia2_release.md"

P1 = "two red circles on a white background"
P2 = "three blue squares on a black background"
P3 = "one red circle and two blue squares on a pink background"
P4 = "two yellow triangles and one purple circle on a white background"
# Per split and prompt: what each image renders, and the three raters' votes. A render with an
# attribute swapped is not aligned; the raters disagree, abstain (-1) and, for P2, reject a
# correct render (image 1). P3's images are all aligned: it counts for no metric, although its
# graded target varies. The images of the k-th prompt of each split are image_<k>_0_<j>.png.
LAYOUT = {
    "counting": {
        P1: ([P1, "three red circles on a white background", P1, "two red squares on a white background"],
             [[1, 1, 1], [0, -1, 1], [1, 1, -1], [0, 0, 0]]),
        P2: ([P2, P2, "two blue squares on a black background", "three blue circles on a black background"],
             [[1, 1, 1], [0, 1, 0], [1, 1, 0], [-1, 0, 0]]),
    },
    "composition": {
        P3: ([P3] * 4, [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, -1]]),
        P4: ([P4, "two yellow circles and one purple circle on a white background", P4,
              "two purple triangles and one yellow circle on a white background"],
             [[-1, 1, 1], [0, 0, 1], [1, 0, 1], [0, -1, 0]]),
    },
}
GRADED = {P1: [1, 1 / 2, 5 / 6, 0], P2: [1, 1 / 3, 2 / 3, 1 / 6], P3: [1, 1, 1, 5 / 6],
          P4: [5 / 6, 1 / 3, 2 / 3, 1 / 6]}
GOLD = {P1: [1, 0.75, 1, 0.75], P2: [1, 1, 0.75, 0.75], P3: [1, 1, 1, 1], P4: [1, 6 / 7, 1, 3 / 7]}
# Precomputed scores by split and image: ties in P1, a constant reward on P2, a reversed ranking
# on P4, under the same names as P1's and P2's.
SCORES = {
    "counting": {**{f"image_0_0_{j}.png": s for j, s in enumerate([0.5, 0.5, 0.9, 0.1])},
                 **{f"image_1_0_{j}.png": 2.0 for j in range(4)}},
    "composition": {**{f"image_0_0_{j}.png": 1.0 for j in range(4)},
                    **{f"image_1_0_{j}.png": s for j, s in enumerate([0.1, 0.9, 0.2, 0.8])}},
}
# The release's own metrics (as alignment_scores holds them) of two made-up models.
REFERENCE = {
    "counting": {P1: {"human": 0.5, "m": {"auroc": 0.9, "auprc": 0.8, "ap5": 0.7, "ap10": 0.6, "ap25": 0.5,
                                          "spearman": 0.4, "kendall": 0.3, "scale": 2.0}},
                 P2: {"human": 0.5, "m": {"auroc": 0.7, "auprc": 0.6, "ap5": 0.5, "ap10": 0.4, "ap25": 0.3,
                                          "spearman": 0.2, "kendall": 0.1}}},
    "composition": {P4: {"human": 0.5,
                         "m": {"auroc": 0.2, "auprc": 0.3, "ap5": 0.4, "ap10": 0.5, "ap25": 0.6,
                               "spearman": -0.1, "kendall": -0.2},
                         "only_here": {"auroc": 1.0, "auprc": 1.0, "ap5": 1.0, "ap10": 1.0, "ap25": 1.0,
                                       "spearman": 1.0, "kendall": 1.0}}},
}


def build_folder(root):
    world = ShapesWorld()
    for sub in ("human_annotations", "prompts", "alignment_scores"):
        (root / sub).mkdir(parents=True)
    for split, prompts in LAYOUT.items():
        labels, sets = {}, {}
        (root / "images" / split).mkdir(parents=True)
        for p_idx, (prompt, (renders, votes)) in enumerate(prompts.items()):
            images = world.render(renders, seed=p_idx)
            for j, (image, vote) in enumerate(zip(images, votes)):
                name = f"image_{p_idx}_0_{j}.png"
                array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(array).save(root / "images" / split / name)
                labels[name] = {"image": name, "caption": prompt, "human_labels": vote}
            sets[prompt] = world.contrastive(prompt, k=3, seed=p_idx)
        (root / "human_annotations" / f"human_labels_{split}.json").write_text(json.dumps(labels, indent=4))
        (root / "prompts" / f"prompt_set_{split}.json").write_text(json.dumps(sets, indent=4))
        (root / "alignment_scores" / f"alignment_scores_{split}.json").write_text(json.dumps(REFERENCE[split]))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("tia2") / "TIA2")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip"
    ShapesCLIP.build(seed=0).save_pretrained(path)
    return str(path)


def _write_scores(path, table=SCORES):
    path.write_text(json.dumps(table))
    return path


def _errors(capsys) -> list[str]:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one error, after any progress lines
    return errors


# --- reading -------------------------------------------------------------------------------------

def test_votes_give_majority_labels_and_a_graded_target_with_abstentions_as_half_votes(folder):
    data = load_tia2(folder)
    assert data.splits == ["counting", "composition"] == data.available
    assert [p.prompt for p in data.prompts] == [P1, P2, P3, P4]
    by_prompt = {p.prompt: p for p in data.prompts}
    assert by_prompt[P1].labels == [True, False, True, False]  # [1, 1, -1]: two of three votes are 1
    assert by_prompt[P2].labels == [True, False, True, False]
    assert by_prompt[P3].labels == [True] * 4 and not by_prompt[P3].counts and by_prompt[P3].human == 1.0
    for prompt, graded in GRADED.items():
        assert by_prompt[prompt].graded == pytest.approx(graded), prompt
    # the same names in both splits, each in its split's folder
    assert by_prompt[P4].names == by_prompt[P2].names == [f"image_1_0_{j}.png" for j in range(4)]
    assert data.image_paths(by_prompt[P4])[0] == folder / "images" / "composition" / "image_1_0_0.png"
    assert data.image_paths(by_prompt[P2])[0] == folder / "images" / "counting" / "image_1_0_0.png"
    # the renders are what the layout says: the judge's scores of the saved PNGs
    world = ShapesWorld()
    for prompt, item in by_prompt.items():
        score = world.judge(load_images(data.image_paths(item)), [prompt] * 4).score.tolist()
        assert score == pytest.approx(GOLD[prompt], abs=1e-6), prompt
    assert [p.prompt for p in load_tia2(folder, ["composition"]).prompts] == [P3, P4]


def test_images_may_sit_in_a_split_folder_at_the_top(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "TIA2")
    shutil.move(copy / "images" / "counting", copy / "counting")
    data = load_tia2(copy, splits=["counting"])
    assert data.image_paths(data.prompts[0])[0] == copy / "counting" / "image_0_0_0.png"


# --- metrics from scores, by hand ------------------------------------------------------------------

def test_precomputed_scores_match_hand_computed_metrics(folder):
    data = load_tia2(folder)
    scores = read_scores(_write_scores(folder.parent / "hand.json"), data)
    metrics = score_metrics(data, scores, (2, 5))
    counting, composition = metrics["counting"], metrics["composition"]
    # P1: scores [.5, .5, .9, .1], labels [1, 0, 1, 0], graded [1, 1/2, 5/6, 0]. AUROC: pairs
    # (.5,.5) = 1/2, the other three won: 3.5/4. AUPRC: 1/2 * 1 + 1/2 * 2/3. AP@2: the top image is
    # a hit and the second, tied, is a hit or not: 1 either way. AP@5 (all 4): orders + + - - and
    # + - + - give 1 and (1 + 2/3)/2. Spearman: ranks [2.5, 2.5, 4, 1] and [4, 2, 3, 1]:
    # 3 / sqrt(4.5 * 5). Kendall: 4 concordant, 1 discordant, 1 tied in the scores: 3 / sqrt(5 * 6).
    # P2: a constant reward: AUROC and AUPRC 1/2; AP@2 over the tie orders: 2/3 (1 hit in the top
    # two with probability 4/6, mean 3/4; 2 hits with 1/6); AP@5: the mean over the 6 orders,
    # 49/72; Spearman and Kendall 0.
    expected = {
        "auroc": [0.875, 0.5], "auprc": [5 / 6, 0.5], "ap@2": [1.0, 2 / 3], "ap@5": [11 / 12, 49 / 72],
        "spearman": [3 / math.sqrt(22.5), 0.0], "kendall": [3 / math.sqrt(30), 0.0],
    }
    assert set(counting) == set(expected)
    for metric, values in expected.items():
        assert counting[metric] == pytest.approx(values), metric
    # P3 counts for nothing; P4 (the same names as P2's, other scores) is ranked backwards: no hit in
    # the top 2, hits at 3 and 4; Spearman 1 - 6 * 18 / (4 * 15); Kendall (1 - 5) / 6.
    want = {"auroc": 0.0, "auprc": 5 / 12, "ap@2": 0.0, "ap@5": 5 / 12, "spearman": -0.8, "kendall": -2 / 3}
    for metric, value in want.items():
        assert math.isnan(composition[metric][0]), metric
        assert composition[metric][1] == pytest.approx(value), metric

    report = tia2_report(data, {"hand": metrics}, {})
    assert report["data"] == {
        "counting": {"prompts": 2, "images": 8, "aligned": 0.5, "counted": 2},
        "composition": {"prompts": 2, "images": 8, "aligned": 0.75, "counted": 1},
    }
    assert report["splits"]["counting"]["hand"]["auroc"] == pytest.approx(0.6875)
    assert report["splits"]["counting"]["hand"]["prompts"] == 2
    assert report["splits"]["composition"]["hand"]["prompts"] == 1
    assert report["per_prompt"]["composition"]["human"] == [1.0, 0.5]


def test_json_and_csv_scores_give_the_same_report_named_by_the_file_stem(folder, tmp_path, capsys):
    json_file = _write_scores(tmp_path / "mine.json")
    csv_file = tmp_path / "also_mine.csv"
    with open(csv_file, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "image", "score"])
        writer.writerows([split, name, score] for split, scores in SCORES.items() for name, score in scores.items())
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--scores", str(json_file), str(csv_file), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| model | AUROC | AUPRC | AP@5 | AP@10 | AP@25 | Spearman | Kendall | prompts |" in table
    assert "| mine | 0.688 | 0.667 |" in table
    assert "**composition**: 2 prompts, 8 images, 75.0% of them aligned; prompts counted: 1" in table
    report = json.loads(out.read_text())
    assert report["settings"]["k"] == [5, 10, 25]
    assert report["settings"]["scores"] == {"mine": str(json_file), "also_mine": str(csv_file)}
    for split in ("counting", "composition"):
        assert report["splits"][split]["mine"] == report["splits"][split]["also_mine"]
    assert report["splits"]["composition"]["mine"] == {
        "auroc": 0.0, "auprc": pytest.approx(5 / 12), "ap@5": pytest.approx(5 / 12), "ap@10": pytest.approx(5 / 12),
        "ap@25": pytest.approx(5 / 12), "spearman": pytest.approx(-0.8), "kendall": pytest.approx(-2 / 3), "prompts": 1,
    }
    assert report["per_prompt"]["composition"]["models"]["mine"]["auroc"] == [None, 0.0]


def test_a_scores_file_for_more_splits_than_read_serves_the_splits_read(folder, tmp_path):
    data = load_tia2(folder, ["composition"])
    assert list(read_scores(_write_scores(tmp_path / "s.json"), data)) == ["composition"]


# --- the release's own models ----------------------------------------------------------------------

def test_reference_rows_are_the_releases_per_prompt_means(folder, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--reference", "--scores", str(_write_scores(tmp_path / "x.json")),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())["splits"]
    assert list(report["counting"]) == ["x", "m"] and list(report["composition"]) == ["x", "m", "only_here"]
    assert report["counting"]["m"] == pytest.approx({"auroc": 0.8, "auprc": 0.7, "ap@5": 0.6, "ap@10": 0.5,
                                                     "ap@25": 0.4, "spearman": 0.3, "kendall": 0.2, "prompts": 2})
    assert report["composition"]["only_here"]["prompts"] == 1
    reference = read_reference(load_tia2(folder), k=[10])
    assert set(reference["m"]["counting"]) == {"auroc", "auprc", "ap@10", "spearman", "kendall"}
    assert np.isnan(reference["m"]["composition"]["auroc"][0])  # P3 counts for no metric


def _edit_reference(split, change):
    def edit(root):
        path = root / "alignment_scores" / f"alignment_scores_{split}.json"
        entries = json.loads(path.read_text())
        change(entries)
        path.write_text(json.dumps(entries))
    return edit


@pytest.mark.parametrize("edit, match", [
    (_edit_reference("counting", lambda e: e[P1].__setitem__("human", 0.75)),
     r"alignment_scores_counting.json: prompt 'two red circles.*': 'human' is 0.75, the share of aligned images "
     r"in the labels is 0.5"),
    (_edit_reference("composition", lambda e: e.__setitem__(P3, {"human": 1.0})),
     r"scores prompt 'one red circle and two blue squares.*', whose images the labels make all aligned or all not"),
    (_edit_reference("counting", lambda e: e.pop(P2)), r"does not score prompt 'three blue squares.*', which counts"),
    (_edit_reference("counting", lambda e: e.__setitem__("a prompt of no split", {})),
     r"prompt 'a prompt of no split' is not in human_labels_counting.json"),
    (_edit_reference("counting", lambda e: e[P1]["m"].pop("ap10")),
     r"model 'm' must have the metrics auroc, auprc, ap5, ap10, ap25, spearman, kendall"),
    (_edit_reference("counting", lambda e: e[P1]["m"].__setitem__("kendall", "high")),
     r"'m' 'kendall' must be a finite number, got 'high'"),
    (lambda r: (r / "alignment_scores" / "alignment_scores_composition.json").unlink(),
     r"no reference scores for split 'composition': expected .*alignment_scores_composition.json"),
])
def test_bad_reference_files_are_one_error_naming_the_bad_value(folder, tmp_path, capsys, edit, match):
    broken = _broken(folder, tmp_path, edit)
    assert main(["rewards", "--tia2", str(broken), "--reference"]) == 2
    error = _errors(capsys)[0]
    assert error.startswith("error: --reference: ") and re.search(match, error), error


# --- rewards on the images ---------------------------------------------------------------------------

def test_the_judge_on_the_images_matches_hand_computed_metrics(folder):
    data = load_tia2(folder)
    scores = score_folder_images(data, {"gold": make_reward("gold")})
    np.testing.assert_allclose(scores["gold"]["counting"], [GOLD[P1], GOLD[P2]], atol=1e-6)
    counting = score_metrics(data, scores["gold"], (2,))["counting"]
    # P1: both positives score 1, both negatives 0.75: a perfect ranking; Spearman of ranks
    # [3.5, 1.5, 3.5, 1.5] and [4, 2, 3, 1]: 4 / sqrt(4 * 5); Kendall 4 / sqrt(4 * 6). P2: scores
    # [1, 1, .75, .75], labels [1, 0, 1, 0]: AUROC (1/2 + 1 + 0 + 1/2) / 4; AUPRC 1/2 * 1/2 + 1/2 * 2/4;
    # AP@2 over the tied top pair (one positive): (1 + 1/2) / 2; Spearman 2 / sqrt(4 * 5);
    # Kendall (3 - 1) / sqrt(4 * 6).
    expected = {
        "auroc": [1.0, 0.5], "auprc": [1.0, 0.5], "ap@2": [1.0, 0.75],
        "spearman": [4 / math.sqrt(20), 2 / math.sqrt(20)], "kendall": [4 / math.sqrt(24), 2 / math.sqrt(24)],
    }
    for metric, values in expected.items():
        assert counting[metric] == pytest.approx(values, abs=1e-6), metric


def test_cli_scores_textnorm_over_the_folders_prompt_sets(folder, clip_dir, tmp_path, capsys):
    spec = {"name": "textnorm", "base": {"name": "clip", "path": clip_dir}, "tau": 0.05}
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--splits", "counting", "--rewards", "gold", json.dumps(spec),
                 "--k", "2", "--json", str(out)]) == 0
    assert "| gold | 0.750 | 0.750 | 0.875 |" in capsys.readouterr().out  # the hand values below
    report = json.loads(out.read_text())
    files = [str(folder / "prompts" / "prompt_set_counting.json")]
    assert report["settings"]["contrastive"] == {"name": "json", "path": files, "fallback": "rules"}
    assert list(report["splits"]) == ["counting"]

    # the TextNorm numbers are those of the same model normalized over the file's sets, by hand
    data = load_tia2(folder, ["counting"])
    reward = TextNorm(ShapesCLIP.from_pretrained(clip_dir), contrastive=JsonContrastive(files, RuleContrastive()),
                      tau=0.05)
    assert reward.contrastive_prompts(P1) == json.loads((folder / "prompts/prompt_set_counting.json").read_text())[P1]
    name = next(n for n in report["splits"]["counting"] if n != "gold")
    got = report["per_prompt"]["counting"]["models"][name]
    for i, item in enumerate(data.prompts):
        scores = reward(load_images(data.image_paths(item)), [item.prompt] * 4).scores.detach().numpy()
        want = prompt_metrics(scores[None], np.array(item.labels)[None], np.array(item.graded)[None], 2)
        for metric, values in want.items():
            assert got[metric][i] == pytest.approx(values[0], abs=1e-6), (item.prompt, metric)


def test_contrastive_rules_replaces_the_folders_sets(folder, clip_dir, tmp_path):
    spec = {"name": "textnorm", "base": {"name": "clip", "path": clip_dir}}
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--splits", "composition", "--rewards", json.dumps(spec),
                 "--contrastive", "rules", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["rewards"][json.dumps(spec, separators=(",", ":"))][
        "contrastive"] == "rules"


# --- bad input: one error line naming the bad value --------------------------------------------------

def _broken(folder, tmp_path, edit):
    copy = shutil.copytree(folder, tmp_path / "TIA2")
    edit(copy)
    return copy


def _edit_labels(change):
    def edit(root):
        path = root / "human_annotations" / "human_labels_counting.json"
        labels = json.loads(path.read_text())
        change(labels)
        path.write_text(json.dumps(labels))
    return edit


def _set(key, field, value):
    def change(labels):
        if value is None:
            del labels[key][field]
        else:
            labels[key][field] = value
    return change


@pytest.mark.parametrize("edit, match", [
    (lambda r: shutil.rmtree(r / "human_annotations"), r"is not a TIA2 folder: .*human_annotations does not exist"),
    (lambda r: [p.unlink() for p in (r / "human_annotations").iterdir()], "holds no human_labels_<split>.json"),
    (lambda r: (r / "human_annotations" / "human_labels_counting.json").write_text("{oops"),
     "human_labels_counting.json: not valid JSON"),
    (_edit_labels(_set("image_0_0_1.png", "human_labels", None)),
     r"human_labels_counting.json: entry 'image_0_0_1.png': missing \['human_labels'\]"),
    (_edit_labels(_set("image_0_0_1.png", "human_labels", [1, 2])),
     r"entry 'image_0_0_1.png': 'human_labels' must be a non-empty list of votes 1, 0 or -1, got \[1, 2\]"),
    (_edit_labels(_set("image_0_0_1.png", "human_labels", [True, False])), r"votes 1, 0 or -1, got \[True, False\]"),
    (_edit_labels(_set("image_1_0_0.png", "caption", "")), "entry 'image_1_0_0.png': 'caption' must be"),
    (_edit_labels(_set("image_1_0_0.png", "image", "other.png")), "its 'image' is 'other.png', not the key"),
    (lambda r: (r / "images" / "counting" / "image_1_0_2.png").unlink(),
     r"image 'image_1_0_2.png' of split 'counting' not found \(looked for .*images/counting/image_1_0_2.png"),
    (_edit_labels(lambda labels: labels.__setitem__("image_0_0_1.png", {**labels["image_0_0_1.png"],
                                                                         "caption": "a lone prompt"})),
     "prompt 'a lone prompt' has 1 image; a ranking needs at least 2"),
    (lambda r: (r / "images" / "counting" / "image_1_0_2.png").write_bytes(b"not a png"),
     "cannot read image .*image_1_0_2.png"),
])
def test_a_malformed_folder_is_one_error_line_naming_the_bad_file(folder, tmp_path, capsys, edit, match):
    broken = _broken(folder, tmp_path, edit)
    assert main(["rewards", "--tia2", str(broken), "--rewards", "gold"]) == 2
    error = _errors(capsys)[0]
    assert re.search(match, error), error


def _scores_with(change):
    table = json.loads(json.dumps(SCORES))
    change(table)
    return table


@pytest.mark.parametrize("name, content, match", [
    ("s.json", "{oops", r"s.json: not valid JSON"),
    ("s.json", json.dumps([1, 2]), r"s.json: expected \{split: \{image name: score\}\}"),
    ("s.json", _scores_with(lambda t: t.__setitem__("colour", {})),
     r"unknown split 'colour'; the TIA2 folder has: counting, composition"),
    ("s.json", _scores_with(lambda t: t["counting"].__setitem__("image_9_0_0.png", 1.0)),
     r"split 'counting' has no image 'image_9_0_0.png' \(its 8 images are the keys of "
     r"human_annotations/human_labels_counting.json, e.g. 'image_0_0_0.png'\)"),
    ("s.json", _scores_with(lambda t: t["composition"].pop("image_1_0_3.png")),
     r"no score for 1 of the 8 images of split 'composition', e.g. 'image_1_0_3.png'"),
    ("s.json", _scores_with(lambda t: t["counting"].__setitem__("image_0_0_0.png", "0.5")),
     r"the score of image 'image_0_0_0.png' of split 'counting' must be a finite number, got '0.5'"),
    ("s.csv", "split,image,value\ncounting,image_0_0_0.png,1\n",
     r"s.csv: the header must name the columns split, image and score, got \['split', 'image', 'value'\]"),
    ("s.csv", "split,image,score\ncounting,image_0_0_0.png,nan\n", r"s.csv: line 2: the score must be a finite number"),
    ("s.csv", "split,image,score\ncounting,image_0_0_0.png,1\ncounting,image_0_0_0.png,2\n",
     r"s.csv: line 3: a second score for image 'image_0_0_0.png' of split 'counting'"),
    ("s.txt", "", r"s.txt: a scores file must be .json .* or .csv \(columns split, image, score\)"),
])
def test_a_bad_scores_file_is_one_error_naming_the_bad_value(folder, tmp_path, capsys, name, content, match):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["rewards", "--tia2", str(folder), "--scores", str(path)]) == 2
    error = _errors(capsys)[0]
    assert error.startswith("error: --scores: ") and re.search(match, error), error


@pytest.mark.parametrize("argv, match", [
    (["--reference", "--splits", "counting", "colour"],
     r"--tia2: unknown TIA2 split 'colour'; .* has: counting, composition"),
    ([], r"--tia2 needs models to compare: --rewards NAME \.\.\. .*, --scores FILE \.\.\. or --reference"),
    (["--reference", "--k", "4"], r"--reference: the release has AP@k for k = 5, 10, 25 only, not \[4\]"),
    (["--k", "0", "--reference"], r"--k must be >= 1, got 0"),
    (["--scores", "missing.json"], r"--scores: scores file missing.json does not exist"),
    (["--reference", "--scores", "m.json"], r"two models are named 'm' \(the second from --reference\)"),
])
def test_bad_command_lines_are_one_error_naming_the_bad_value(folder, tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _write_scores(tmp_path / "m.json")
    assert main(["rewards", "--tia2", str(folder), *argv]) == 2
    error = _errors(capsys)[0]
    assert re.search(match, error), error


@pytest.mark.parametrize("flag", [["--splits", "counting"], ["--scores", "s.json"], ["--reference"]])
def test_tia2_options_need_tia2(flag, capsys):
    assert main(["rewards", *flag]) == 2
    assert f"{flag[0]} needs --tia2 FOLDER" in capsys.readouterr().err


def test_bad_or_missing_prompt_sets_are_named_when_textnorm_needs_them(folder, clip_dir, tmp_path, capsys):
    spec = json.dumps({"name": "textnorm", "base": {"name": "clip", "path": clip_dir}})
    broken = _broken(folder, tmp_path, lambda r: (r / "prompts" / "prompt_set_counting.json").write_text(
        json.dumps({P1: ["a fine prompt", 5]})))
    assert main(["rewards", "--tia2", str(broken), "--rewards", spec]) == 2
    assert "prompt_set_counting.json: entry 'two red circles on a white background': alternative #1" in \
        capsys.readouterr().err
    (broken / "prompts" / "prompt_set_counting.json").unlink()
    assert main(["rewards", "--tia2", str(broken), "--rewards", spec]) == 2
    err = capsys.readouterr().err
    assert "no contrastive prompt sets for ['counting']" in err and "--contrastive rules" in err
    assert main(["rewards", "--tia2", str(broken), "--rewards", "gold"]) == 0  # not needed: no error
    assert main(["rewards", "--rewards", "gold", "--contrastive", "tia2"]) == 2
    assert "--contrastive tia2 needs --tia2 FOLDER" in capsys.readouterr().err


# --- the real release ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release():
    return load_tia2(RELEASE)


def _release_json(kind: str, split: str):
    prefix = {"human_annotations": "human_labels", "alignment_scores": "alignment_scores"}[kind]
    return json.loads((RELEASE / kind / f"{prefix}_{split}.json").read_text())


def test_the_release_is_read_as_it_is(release):
    assert release.splits == ["counting", "composition", "comprehensive"]
    n = {s: len(release.of_split(s)) for s in release.splits}
    assert n == {"counting": 150, "composition": 300, "comprehensive": 100}
    assert all(len(p.names) == 50 for p in release.prompts)
    for split, with_abstention in (("counting", 0), ("composition", 1917), ("comprehensive", 133)):
        labels = _release_json("human_annotations", split)
        assert sum(-1 in e["human_labels"] for e in labels.values()) == with_abstention
        levels = {tuple(sorted(labels[name]["human_labels"])): g
                  for p in release.of_split(split) for name, g in zip(p.names, p.graded)}
        assert len(set(levels.values())) == len(levels)  # each vote pattern is a level of its own
    assert release.prompt_sets["comprehensive"] == RELEASE / "prompts" / "prompt_set_comprehensive.json"


def test_the_readers_human_share_is_the_releases_for_every_prompt(release):
    for split, left_out in (("counting", 4), ("composition", 5), ("comprehensive", 16)):
        released = _release_json("alignment_scores", split)
        items = release.of_split(split)
        for p in items:
            if p.prompt in released:
                assert released[p.prompt]["human"] == pytest.approx(p.human, abs=1e-12), p.prompt
        # the prompts left out are exactly those whose labels are all equal
        assert {p.prompt for p in items if p.counts} == set(released)
        assert len(items) - len(released) == left_out


def test_the_documented_table_is_what_reference_gives_on_the_shipped_release(release, tmp_path, capsys):
    out = tmp_path / "release.json"
    assert main(["rewards", "--tia2", str(RELEASE), "--reference", "--json", str(out)]) == 0
    table = capsys.readouterr().out.strip()
    report = json.loads(out.read_text())
    assert table == format_tia2_table(report) and table in DOC.read_text()
    counting = report["splits"]["counting"]
    assert list(counting) == ["clip", "blip2", "imagereward", "pickscore", "textnorm_ur"]
    assert list(report["splits"]["composition"])[-1] == "textnorm_mean"
    released = _release_json("alignment_scores", "counting")
    assert counting["pickscore"]["ap@10"] == pytest.approx(np.mean([v["pickscore"]["ap10"] for v in released.values()]))
    assert {s: next(iter(t.values()))["prompts"] for s, t in report["splits"].items()} == {
        "counting": 146, "composition": 295, "comprehensive": 84}


def test_the_graded_target_has_the_releases_ties(release):
    """Kendall's tau-b is (C - D) / sqrt(n0 (n0 - n2)), n0 the pairs and n2 those tied in the target,
    when the scores have no ties; C - D is an integer of the parity of n0 - n2. The release's Kendall
    values of the models other than CLIP (whose scores have ties) pass that test, prompt by prompt,
    with the ties of this graded target: the -1 patterns are levels of their own."""
    passed, total = 0, 0
    for split in release.splits:
        released = _release_json("alignment_scores", split)
        for item in release.of_split(split):
            if item.prompt not in released:
                continue
            n0 = len(item.graded) * (len(item.graded) - 1) // 2
            _, sizes = np.unique(item.graded, return_counts=True)
            untied = n0 - int((sizes * (sizes - 1) // 2).sum())
            for model, values in released[item.prompt].items():
                if model in ("human", "clip"):
                    continue
                c_minus_d = values["kendall"] * math.sqrt(n0 * untied)
                total += 1
                passed += abs(c_minus_d - round(c_minus_d)) < 1e-6 and (round(c_minus_d) - untied) % 2 == 0
    assert total == 4 * (146 + 295 + 84) and passed >= total - 2
