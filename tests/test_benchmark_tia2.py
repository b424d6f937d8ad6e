"""`benchmark rewards --tia2 FOLDER`: a synthetic folder in the layout of TextNorm's TIA2 release
(human_annotations/human_labels_<split>.json, prompts/prompt_set_<split>.json, images), rendered
with ShapesWorld so that scores mean something, labelled from the judge."""

import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from t2i_rl.benchmark import main
from t2i_rl.metrics import prompt_metrics
from t2i_rl.rewards import ShapesCLIP, TextNorm, make_reward
from t2i_rl.rewards.contrastive import JsonContrastive, RuleContrastive
from t2i_rl.tia2 import load_images, load_tia2, run_tia2_benchmark
from t2i_rl.world import ShapesWorld

P1 = "two red circles on a white background"
P2 = "three blue squares on a black background"
P3 = "one red circle and two blue squares on a pink background"
# Per prompt: what each image renders, and the three raters' votes. Renders of a prompt with one
# attribute swapped (count or shape) get the judge's score 0.75; the votes are the judge's verdict
# with raters disagreeing, and for P2 the raters reject a correct render (image 1).
LAYOUT = {
    "counting": {
        P1: ([P1, "three red circles on a white background", P1, "two red squares on a white background"],
             [[1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]),
        P2: ([P2, P2, "two blue squares on a black background", "three blue circles on a black background"],
             [[1, 1, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]),
    },
    "composition": {P3: ([P3] * 4, [[1, 1, 1]] * 4)},  # all labels equal: counts for no metric
}
GOLD = {P1: [1, 0.75, 1, 0.75], P2: [1, 1, 0.75, 0.75], P3: [1, 1, 1, 1]}


def build_folder(root):
    world = ShapesWorld()
    (root / "human_annotations").mkdir(parents=True)
    (root / "prompts").mkdir()
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
        (root / "human_annotations" / f"human_labels_{split}.json").write_text(json.dumps(labels, indent=1))
        (root / "prompts" / f"prompt_set_{split}.json").write_text(json.dumps(sets, indent=1))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("tia2") / "TIA2")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip"
    ShapesCLIP.build(seed=0).save_pretrained(path)
    return str(path)


def test_the_folder_is_read_with_majority_and_fraction_labels(folder):
    data = load_tia2(folder)
    assert data.splits == ["composition", "counting"]
    by_prompt = {p.prompt: p for p in data.prompts}
    assert [p.prompt for p in data.prompts] == [P3, P1, P2]
    assert by_prompt[P1].labels == [True, False, True, False]
    assert by_prompt[P1].graded == pytest.approx([1, 1 / 3, 2 / 3, 0])
    assert by_prompt[P2].images[1] == folder / "images" / "counting" / "image_1_0_1.png"
    # the renders are what the layout says: the judge's scores of the saved PNGs
    world = ShapesWorld()
    for prompt, item in by_prompt.items():
        score = world.judge(load_images(item.images), [prompt] * 4).score.tolist()
        assert score == pytest.approx(GOLD[prompt])


def test_metrics_of_the_judge_score_match_hand_computed_values(folder):
    result = run_tia2_benchmark(load_tia2(folder), {"gold": make_reward("gold")}, k=2)
    per = result["per_prompt"]
    assert per["prompts"] == [P3, P1, P2] and per["category"] == ["composition", "counting", "counting"]
    assert per["n_correct"] == [4, 2, 2]
    m = per["rewards"]["gold"]
    # P1: both positives score 1, both negatives 0.75 -> a perfect ranking. Spearman of
    # [1, .75, 1, .75] with [1, 1/3, 2/3, 0]: ranks [3.5, 1.5, 3.5, 1.5] and [4, 2, 3, 1] give
    # 4 / sqrt(4 * 5); Kendall: 4 concordant pairs, 2 tied in the scores: 4 / sqrt(4 * 6).
    # P2: scores [1, 1, .75, .75], labels [1, 0, 1, 0]: AUROC (0.5 + 1 + 0 + 0.5) / 4; AUPRC
    # 1/2 * 1/2 + 1/2 * 2/4; AP@2 over the tied top pair (one positive): 1/2 * (1/2 + 1/2 * 1/2);
    # Spearman 2 / sqrt(4 * 5); Kendall (3 - 1) / sqrt(4 * 6).
    expected = {
        "auroc": [1.0, 0.5], "auprc": [1.0, 0.5], "ap@2": [1.0, 0.375],
        "spearman": [4 / math.sqrt(20), 2 / math.sqrt(20)], "kendall": [4 / math.sqrt(24), 2 / math.sqrt(24)],
    }
    for metric, values in expected.items():
        assert math.isnan(m[metric][0]), metric  # P3: every label equal
        assert m[metric][1:] == pytest.approx(values), metric
    assert result["splits"] == {
        "composition": {"n_prompts": 1, "n_images": 4, "base_rate": 1.0, "n_mixed": 0, "n_graded": 0},
        "counting": {"n_prompts": 2, "n_images": 8, "base_rate": 0.5, "n_mixed": 2, "n_graded": 2},
        "all": {"n_prompts": 3, "n_images": 12, "base_rate": pytest.approx(8 / 12), "n_mixed": 2, "n_graded": 2},
    }
    gold = result["results"]["gold"]
    assert gold["counting"]["auroc"] == {"mean": 0.75, "n": 2}
    assert gold["all"]["spearman"]["mean"] == pytest.approx(3 / math.sqrt(20)) and gold["all"]["spearman"]["n"] == 2
    assert gold["composition"]["auroc"]["n"] == 0 and math.isnan(gold["composition"]["auroc"]["mean"])
    assert result["images_per_prompt"] == 4 and result["benchmark"] == "TIA2"


def test_cli_scores_textnorm_over_the_folders_prompt_sets(folder, clip_dir, tmp_path, capsys):
    spec = {"name": "textnorm", "base": {"name": "clip", "path": clip_dir}, "tau": 0.05}
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--rewards", "gold", json.dumps(spec), "--k", "2",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "TIA2: 3 prompts x 4 images" in table and "| gold | " in table and "cnt ROC" in table and "comp ROC" in table
    report = json.loads(out.read_text())
    files = [str(folder / "prompts" / f"prompt_set_{s}.json") for s in ("composition", "counting")]
    assert report["settings"]["contrastive"] == {"name": "json", "path": files, "fallback": "rules"}
    assert report["per_prompt"]["rewards"]["gold"]["ap@2"][1:] == [1.0, 0.375]
    assert report["results"]["gold"]["composition"]["auroc"] == {"mean": None, "n": 0}

    # the TextNorm numbers are those of the same model normalized over the files' sets, by hand
    data = load_tia2(folder)
    reward = TextNorm(ShapesCLIP.from_pretrained(clip_dir), contrastive=JsonContrastive(files, RuleContrastive()),
                      tau=0.05)
    assert reward.contrastive_prompts(P1) == json.loads((folder / "prompts/prompt_set_counting.json").read_text())[P1]
    name = next(n for n in report["results"] if n != "gold")
    for i, item in enumerate(data.prompts):
        scores = reward(load_images(item.images), [item.prompt] * 4).scores.detach().numpy()
        want = prompt_metrics(scores[None], np.array(item.labels)[None], np.array(item.graded)[None], 2)
        got = report["per_prompt"]["rewards"][name]
        for metric, values in want.items():
            if math.isnan(values[0]):
                assert got[metric][i] is None
            else:
                assert got[metric][i] == pytest.approx(values[0], abs=1e-6), (item.prompt, metric)


def test_contrastive_rules_replaces_the_folders_sets(folder, clip_dir, tmp_path):
    spec = {"name": "textnorm", "base": {"name": "clip", "path": clip_dir}}
    out = tmp_path / "report.json"
    assert main(["rewards", "--tia2", str(folder), "--rewards", json.dumps(spec), "--contrastive", "rules",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["rewards"][json.dumps(spec, separators=(",", ":"))][
        "contrastive"] == "rules"


def test_images_may_sit_in_a_split_folder_at_the_top(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "TIA2")
    shutil.move(copy / "images" / "counting", copy / "counting")
    data = load_tia2(copy, splits=["counting"])
    assert data.prompts[0].images[0] == copy / "counting" / "image_0_0_0.png"


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
     "entry 'image_0_0_1.png': 'human_labels' must be a non-empty list of 0/1 votes, got \\[1, 2\\]"),
    (_edit_labels(_set("image_1_0_0.png", "caption", "")), "entry 'image_1_0_0.png': 'caption' must be"),
    (_edit_labels(_set("image_1_0_0.png", "image", "other.png")), "its 'image' is 'other.png', not the key"),
    (lambda r: (r / "images" / "counting" / "image_1_0_2.png").unlink(),
     r"human_labels_counting.json: image 'image_1_0_2.png' not found \(looked for .*images/counting/image_1_0_2.png"),
    (_edit_labels(lambda labels: labels.__setitem__("image_0_0_1.png", {**labels["image_0_0_1.png"],
                                                                         "caption": "a lone prompt"})),
     "prompt 'a lone prompt' has 1 image; a ranking needs at least 2"),
    (lambda r: (r / "images" / "counting" / "image_1_0_2.png").write_bytes(b"not a png"),
     "cannot read image .*image_1_0_2.png"),
])
def test_a_malformed_folder_is_one_error_line_naming_the_bad_file(folder, tmp_path, capsys, edit, match):
    broken = _broken(folder, tmp_path, edit)
    assert main(["rewards", "--tia2", str(broken), "--rewards", "gold"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]  # after any progress lines
    assert re.search(match, errors[0]), errors[0]


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
