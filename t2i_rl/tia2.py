"""TIA2 on TextNorm's release: read its files as they are and compute its metrics as its numbers are.

The release (github.com/kykim0/TextNorm, Kim et al., ICLR 2024, Apache-2.0) holds, per split
("counting", "composition", "comprehensive": 150, 300 and 100 prompts x 50 images):

    human_annotations/human_labels_<split>.json
        {"image_0_0_0.jpg": {"image": "image_0_0_0.jpg", "caption": PROMPT,
                             "human_labels": [0, 1, 1]}, ...}   three raters' votes: 1, 0 or -1
    prompts/prompt_set_<split>.json
        {PROMPT: [contrastive prompt, ...], ...}                the sets TextNorm normalizes over
    alignment_scores/alignment_scores_<split>.json
        {PROMPT: {"human": 0.76, "clip": {"auroc": ..., "auprc": ..., "ap5": ..., "ap10": ...,
                  "ap25": ..., "spearman": ..., "kendall": ...}, ...}, ...}
                                                                the released models' per-prompt metrics

The images (Stable Diffusion 2.1) are a separate download. Their names repeat across splits, so
an image is looked up in `images/<split>/<name>`, then `<split>/<name>`. Only rewards scored on
images need them: precomputed scores (`read_scores`) and the release's own models
(`read_reference`) do not.

The evaluation code is not released; the rules are inferred from alignment_scores. The first two
reproduce its "human" value and its choice of prompts for every prompt of every split (the tests
check this on the shipped copy of the release); the others are the ones its per-prompt metric
values agree with, which cannot be recomputed without the per-image scores:

* An image is aligned when more than half of its votes are 1 (2 of 3; a -1 is never a 1). The
  share of aligned images is the release's "human" value, prompt by prompt.
* A prompt whose images are all aligned or all not aligned counts for no metric (the release
  leaves out 4, 5 and 16 such prompts), Spearman and Kendall included.
* The metrics are `t2i_rl.metrics.prompt_metrics`' (AUROC with ties as one half, step-wise AUPRC,
  AP@5/10/25 averaged over the hits in the top k, Kendall's tau-b), averaged over the prompts that
  count.
* Spearman and Kendall rank against a graded target in which each vote pattern with a -1 is a
  level of its own. The release fixes the grouping, not the placement; here a -1 is half a vote,
  so the target is (#1 + #(-1) / 2) / #votes: 1/6, 1/2 and 5/6 for the three patterns with one -1.
  No image of the release has two, so any weight in (0, 1) would rank the same. The grouping
  shows in the release's Kendall values: tau-b's numerator C - D is an integer for 2,098 of the
  2,100 per-prompt values of the models whose scores have no ties with this target's ties, and for
  few with a -1 merged into another level.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .metrics import AP_KS, aggregate, prompt_metrics
from .rewards.base import score_images

BENCHMARK = "TIA2"
RELEASE_SPLITS: tuple[str, ...] = ("counting", "composition", "comprehensive")
LABELS_DIR = "human_annotations"
PROMPTS_DIR = "prompts"
REFERENCE_DIR = "alignment_scores"
LABELS_PREFIX = "human_labels_"
PROMPTS_PREFIX = "prompt_set_"
REFERENCE_PREFIX = "alignment_scores_"
VOTES = (1, 0, -1)

PerPrompt = dict[str, np.ndarray]
"""{metric: [P]} for the prompts of one split, NaN where a prompt does not count."""


@dataclass
class TIA2Prompt:
    """One prompt of one split: its images' names, binary labels and graded labels (in file order)."""

    split: str
    prompt: str
    names: list[str] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    graded: list[float] = field(default_factory=list)

    @property
    def human(self) -> float:
        """The share of aligned images: the release's per-prompt "human" value."""
        return sum(self.labels) / len(self.labels)

    @property
    def counts(self) -> bool:
        """Whether the prompt counts for the metrics (its images are neither all aligned nor none)."""
        return 0 < sum(self.labels) < len(self.labels)


@dataclass
class TIA2Data:
    """A TIA2 folder, read and checked: the chosen splits' prompts, and the splits the folder has."""

    root: Path
    splits: list[str]
    available: list[str]
    prompts: list[TIA2Prompt]
    prompt_sets: dict[str, Path | None]

    def of_split(self, split: str) -> list[TIA2Prompt]:
        return [p for p in self.prompts if p.split == split]

    def image_paths(self, item: TIA2Prompt) -> list[Path]:
        """The files of a prompt's images; FileNotFoundError naming the first that is not there."""
        out = []
        for name in item.names:
            candidates = [self.root / "images" / item.split / name, self.root / item.split / name]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise FileNotFoundError(f"image {name!r} of split {item.split!r} not found "
                                        f"(looked for {', '.join(map(str, candidates))})")
            out.append(path)
        return out

    def contrastive_spec(self, fallback="rules") -> dict:
        """A `make_contrastive` spec for the folder's prompt sets (`prompts/`), `fallback` for the rest."""
        missing = [s for s in self.splits if self.prompt_sets[s] is None]
        if missing:
            expected = ", ".join(str(self.root / PROMPTS_DIR / f"{PROMPTS_PREFIX}{s}.json") for s in missing)
            raise FileNotFoundError(f"the TIA2 folder has no contrastive prompt sets for {missing}: "
                                    f"expected {expected}")
        return {"name": "json", "path": [str(self.prompt_sets[s]) for s in self.splits], "fallback": fallback}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _votes(value, where: str) -> list[int]:
    ok = isinstance(value, list) and value and all(type(v) is int and v in VOTES for v in value)
    if not ok:
        raise ValueError(f"{where}: 'human_labels' must be a non-empty list of votes 1, 0 or -1, got {value!r}")
    return value


def _split_order(split: str) -> tuple[int, str]:
    return (RELEASE_SPLITS.index(split) if split in RELEASE_SPLITS else len(RELEASE_SPLITS), split)


def load_tia2(root: str | Path, splits: list[str] | None = None) -> TIA2Data:
    """Read and check a TIA2 folder (see the module docstring). Errors name the bad file and entry.

    `splits`: which splits to read (default: every human_labels_<split>.json, the release's first)."""
    root = Path(root).expanduser()
    labels_dir = root / LABELS_DIR
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a TIA2 folder: {labels_dir} does not exist")
    found = sorted((p.name[len(LABELS_PREFIX):-len(".json")] for p in labels_dir.glob(f"{LABELS_PREFIX}*.json")),
                   key=_split_order)
    if not found:
        raise FileNotFoundError(f"{labels_dir} holds no {LABELS_PREFIX}<split>.json file")
    splits = found if splits is None else list(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in found]
    if unknown:
        raise ValueError(f"unknown TIA2 split {unknown[0]!r}; {labels_dir} has: {', '.join(found)}")

    prompts: list[TIA2Prompt] = []
    prompt_sets: dict[str, Path | None] = {}
    for split in splits:
        labels_file = labels_dir / f"{LABELS_PREFIX}{split}.json"
        entries = _read_json(labels_file)
        if not isinstance(entries, dict) or not entries:
            raise ValueError(f"{labels_file}: expected a non-empty object {{image file: {{caption, human_labels}}}}")
        by_prompt: dict[str, TIA2Prompt] = {}
        for key, entry in entries.items():
            where = f"{labels_file}: entry {key!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object with 'caption' and 'human_labels', got {entry!r}")
            missing = [f for f in ("caption", "human_labels") if f not in entry]
            if missing:
                raise ValueError(f"{where}: missing {missing}")
            caption, name = entry["caption"], entry.get("image", key)
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{where}: 'caption' must be a non-empty string, got {caption!r}")
            if name != key:
                raise ValueError(f"{where}: its 'image' is {name!r}, not the key")
            votes = _votes(entry["human_labels"], where)
            item = by_prompt.setdefault(caption, TIA2Prompt(split, caption))
            item.names.append(key)
            item.labels.append(votes.count(1) * 2 > len(votes))
            item.graded.append((votes.count(1) + votes.count(-1) / 2) / len(votes))
        for item in by_prompt.values():
            if len(item.names) < 2:
                raise ValueError(f"{labels_file}: prompt {item.prompt!r} has {len(item.names)} image; "
                                 "a ranking needs at least 2")
        prompts.extend(by_prompt.values())
        sets_file = root / PROMPTS_DIR / f"{PROMPTS_PREFIX}{split}.json"
        prompt_sets[split] = sets_file if sets_file.is_file() else None
    return TIA2Data(root, splits, found, prompts, prompt_sets)


# ----------------------------------------------------------------------------------------------
# Scores: precomputed, or of rewards on the images


def _score_table(path: Path) -> dict[str, dict[str, float]]:
    """{split: {image name: score}} from a JSON or CSV scores file, checked for form only."""
    if path.suffix not in (".json", ".csv"):
        raise ValueError(f"{path}: a scores file must be .json ({{split: {{image: score}}}}) or .csv "
                         "(columns split, image, score)")
    if not path.is_file():
        raise FileNotFoundError(f"scores file {path} does not exist")
    if path.suffix == ".json":
        table = _read_json(path)
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{path}: expected {{split: {{image name: score}}}}")
        return {split: {name: _number(v, f"{path}: the score of image {name!r} of split {split!r}")
                        for name, v in scores.items()}
                for split, scores in table.items()}
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"split", "image", "score"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: the header must name the columns split, image and score, "
                             f"got {reader.fieldnames}")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            scores = out.setdefault(row["split"], {})
            if row["image"] in scores:
                raise ValueError(f"{where}: a second score for image {row['image']!r} of split {row['split']!r}")
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                score = row["score"]
            scores[row["image"]] = _number(score, f"{where}: the score")
    return out


def read_scores(path: str | Path, data: TIA2Data) -> dict[str, list[np.ndarray]]:
    """A reward's precomputed scores of the images of `data`: {split: [scores of each prompt]}.

    `path`: JSON {split: {image name: score}}, or CSV with the columns split, image and score.
    Every image of every split read needs a score; the file's other splits of the folder are
    ignored. A split or an image the folder does not have is an error."""
    path = Path(path)
    table = _score_table(path)
    unknown = [s for s in table if s not in data.available]
    if unknown:
        raise ValueError(f"{path}: unknown split {unknown[0]!r}; the TIA2 folder has: {', '.join(data.available)}")
    out = {}
    for split in data.splits:
        items = data.of_split(split)
        scores = table.get(split, {})
        names = {n for item in items for n in item.names}
        extra = [n for n in scores if n not in names]
        if extra:
            raise ValueError(f"{path}: split {split!r} has no image {extra[0]!r} (its {len(names)} images are "
                             f"the keys of {LABELS_DIR}/{LABELS_PREFIX}{split}.json, e.g. {items[0].names[0]!r})")
        missing = [n for n in sorted(names) if n not in scores]
        if missing:
            raise ValueError(f"{path}: no score for {len(missing)} of the {len(names)} images of split {split!r}, "
                             f"e.g. {missing[0]!r}; score them all or leave the split out (--splits)")
        out[split] = [np.array([scores[n] for n in item.names]) for item in items]
    return out


def load_images(paths: list[Path]) -> torch.Tensor:
    """Images [M, 3, H, W] in [0, 1] from image files of one size (RGB)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        if out and array.shape != out[0].shape:
            raise ValueError(f"image {path} is {array.shape[1]}x{array.shape[0]}, the prompt's first image "
                             f"{paths[0]} is {out[0].shape[1]}x{out[0].shape[0]}; a prompt's images must share a size")
        out.append(array)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def score_folder_images(
    data: TIA2Data,
    rewards: dict[str, Callable],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[np.ndarray]]]:
    """Every reward's scores of the folder's images: {reward: {split: [scores of each prompt]}}.
    A prompt's images are loaded once for all rewards."""
    if not rewards:
        raise ValueError("no rewards to score")
    rewards = {name: r.to(device) if hasattr(r, "to") else r for name, r in rewards.items()}
    out: dict[str, dict[str, list[np.ndarray]]] = {name: {s: [] for s in data.splits} for name in rewards}
    for i, item in enumerate(data.prompts):
        images = load_images(data.image_paths(item))
        for name, reward in rewards.items():
            try:
                scores = score_images(reward, images, [item.prompt] * len(item.names), batch_size, device)
            except ValueError as err:
                raise ValueError(f"reward {name!r} on {item.prompt!r}: {err}") from err
            out[name][item.split].append(scores)
        if progress is not None and ((i + 1) % 25 == 0 or i + 1 == len(data.prompts)):
            progress(f"scored {i + 1}/{len(data.prompts)} prompts")
    return out


# ----------------------------------------------------------------------------------------------
# Metrics: of scores, or the release's own


def score_metrics(data: TIA2Data, scores: dict[str, list[np.ndarray]],
                  k: Iterable[int] = AP_KS) -> dict[str, PerPrompt]:
    """Per-prompt metrics {split: {metric: [P]}} of one model's scores {split: [scores of each prompt]}."""
    out = {}
    for split in data.splits:
        rows = [prompt_metrics(s[None], np.array(item.labels)[None], np.array(item.graded)[None], k)
                for item, s in zip(data.of_split(split), scores[split], strict=True)]
        out[split] = {m: np.concatenate([row[m] for row in rows]) for m in rows[0]}
    return out


def read_reference(data: TIA2Data, k: Iterable[int] = AP_KS) -> dict[str, dict[str, PerPrompt]]:
    """The release's own models' per-prompt metrics (alignment_scores): {model: {split: {metric: [P]}}},
    with AP@K for each K in `k` (the release has 5, 10 and 25).

    Checked against the labels: the release must score exactly the prompts that count, and its
    "human" value of each must be the share of aligned images, so that its rows and those of
    `score_metrics` average over the same prompts with the same labels."""
    other = sorted(set(k) - set(AP_KS))
    if other:
        raise ValueError(f"the release has AP@k for k = {', '.join(map(str, AP_KS))} only, not {other}")
    # alignment_scores' metric names -> prompt_metrics'
    wanted = {"auroc": "auroc", "auprc": "auprc", **{f"ap{j}": f"ap@{j}" for j in k},
              "spearman": "spearman", "kendall": "kendall"}
    out: dict[str, dict[str, PerPrompt]] = {}
    for split in data.splits:
        path = data.root / REFERENCE_DIR / f"{REFERENCE_PREFIX}{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"the TIA2 folder has no reference scores for split {split!r}: expected {path}")
        entries = _read_json(path)
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise ValueError(f"{path}: expected {{prompt: {{'human': share, model: {{metric: value}}}}}}")
        items = data.of_split(split)
        index = {item.prompt: i for i, item in enumerate(items)}
        unknown = [p for p in entries if p not in index]
        if unknown:
            raise ValueError(f"{path}: prompt {unknown[0]!r} is not in {LABELS_PREFIX}{split}.json")
        counted = {item.prompt for item in items if item.counts}
        constant = [p for p in entries if p not in counted]
        if constant:
            raise ValueError(f"{path}: scores prompt {constant[0]!r}, whose images the labels make all aligned "
                             "or all not (such a prompt counts for no metric)")
        unscored = [p for p in counted if p not in entries]
        if unscored:
            raise ValueError(f"{path}: does not score prompt {unscored[0]!r}, which counts (the labels make some "
                             "of its images aligned and some not)")
        for prompt, entry in entries.items():
            where = f"{path}: prompt {prompt!r}"
            i = index[prompt]
            human = _number(entry.get("human"), f"{where}: 'human'")
            if not math.isclose(human, items[i].human, abs_tol=1e-9):
                raise ValueError(f"{where}: 'human' is {human}, the share of aligned images in the labels is "
                                 f"{items[i].human}")
            for model, values in entry.items():
                if model == "human":
                    continue
                if not isinstance(values, dict) or not set(wanted) <= set(values):
                    raise ValueError(f"{where}: model {model!r} must have the metrics {', '.join(wanted)}")
                row = out.setdefault(model, {}).setdefault(split, {m: np.full(len(items), np.nan)
                                                                    for m in wanted.values()})
                for key, metric in wanted.items():
                    row[metric][i] = _number(values[key], f"{where}: {model!r} {key!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Report


def tia2_report(data: TIA2Data, metrics: dict[str, dict[str, PerPrompt]], settings: dict) -> dict:
    """The JSON-ready report of per-prompt metrics {model: {split: {metric: [P]}}} (a model may
    miss a split): "settings"; "data": {split: {"prompts", "images", "aligned" (share of images),
    "counted" (prompts that count)}}; "splits": {split: {model: {metric: per-prompt mean,
    "prompts": how many counted}}}; "per_prompt": {split: {"prompts", "human", "models": {model:
    {metric: [P]}}}} (NaN where a prompt does not count)."""
    report: dict = {"benchmark": BENCHMARK, "settings": settings, "data": {}, "splits": {}, "per_prompt": {}}
    for split in data.splits:
        items = data.of_split(split)
        n_images = sum(len(p.names) for p in items)
        report["data"][split] = {
            "prompts": len(items), "images": n_images,
            "aligned": sum(sum(p.labels) for p in items) / n_images,
            "counted": sum(p.counts for p in items),
        }
        rows = {model: by_split[split] for model, by_split in metrics.items() if split in by_split}
        table = {}
        for model, per_prompt in rows.items():
            means = aggregate(per_prompt)
            table[model] = {m: v["mean"] for m, v in means.items()} | {"prompts": means["auroc"]["n"]}
        report["splits"][split] = table
        report["per_prompt"][split] = {
            "prompts": [p.prompt for p in items],
            "human": [p.human for p in items],
            "models": {model: {m: v.tolist() for m, v in per_prompt.items()} for model, per_prompt in rows.items()},
        }
    return report


_HEADERS = {"auroc": "AUROC", "auprc": "AUPRC", "spearman": "Spearman", "kendall": "Kendall", "prompts": "prompts"}


def format_tia2_table(report: dict) -> str:
    """One markdown table per split: rows = models, columns = per-prompt mean of each metric."""
    lines = []
    for split, table in report["splits"].items():
        d = report["data"][split]
        lines += [f"**{split}**: {d['prompts']} prompts, {d['images']} images, {100 * d['aligned']:.1f}% of them "
                  f"aligned; prompts counted: {d['counted']}", ""]
        if not table:
            continue
        columns = list(next(iter(table.values())))
        lines.append("| model | " + " | ".join(_HEADERS.get(c, c.upper()) for c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for model, row in table.items():
            cells = [str(v) if c == "prompts" else "-" if v is None or math.isnan(v) else f"{v:.3f}"
                     for c, v in ((c, row.get(c)) for c in columns)]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
