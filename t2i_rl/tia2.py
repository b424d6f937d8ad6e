"""TIA2 on real data: read a folder laid out like the public release of TextNorm's benchmark.

The release (github.com/kykim0/TextNorm, Kim et al., ICLR 2024) holds, per split ("counting",
"composition", "comprehensive"):

    human_annotations/human_labels_<split>.json
        {"image_0_0_0.jpg": {"image": "image_0_0_0.jpg", "caption": PROMPT,
                             "human_labels": [0, 1, 1]}, ...}   three raters' 0/1 votes per image
    prompts/prompt_set_<split>.json
        {PROMPT: [contrastive prompt, ...], ...}                the sets TextNorm normalizes over
    alignment_scores/alignment_scores_<split>.json              the paper's per-prompt metrics (not read)

and the images (Stable Diffusion 2.1, 50 per prompt) as a separate download whose folder layout
the repository does not document. An image is looked up by its file name, first in
`images/<split>/`, then `<split>/`, then `images/`.

A prompt's images are the entries with its caption, in file order. The binary label of an image
is the raters' majority vote (more than half said aligned: in the release this reproduces the
"human" rate of alignment_scores, e.g. 0.76 for "a realistic photo of an airplane"); the graded
label, for Spearman and Kendall, is the fraction of raters who said aligned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .metrics import aggregate, prompt_metrics

BENCHMARK = "TIA2"
LABELS_DIR = "human_annotations"
PROMPTS_DIR = "prompts"
LABELS_PREFIX = "human_labels_"
PROMPTS_PREFIX = "prompt_set_"


@dataclass
class TIA2Prompt:
    """One prompt of one split: its image files, binary labels and graded labels (in file order)."""

    split: str
    prompt: str
    images: list[Path] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    graded: list[float] = field(default_factory=list)


@dataclass
class TIA2Data:
    """A TIA2 folder, read and checked: prompts by split, and each split's contrastive-set file."""

    root: Path
    splits: list[str]
    prompts: list[TIA2Prompt]
    prompt_sets: dict[str, Path | None]

    def contrastive_spec(self, fallback="rules") -> dict:
        """A `make_contrastive` spec for the folder's prompt sets (`prompts/`), `fallback` for the rest."""
        missing = [s for s in self.splits if self.prompt_sets[s] is None]
        if missing:
            expected = ", ".join(str(self.root / PROMPTS_DIR / f"{PROMPTS_PREFIX}{s}.json") for s in missing)
            raise FileNotFoundError(f"the TIA2 folder has no contrastive prompt sets for {missing}: expected {expected}")
        return {"name": "json", "path": [str(self.prompt_sets[s]) for s in self.splits], "fallback": fallback}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def _find_image(root: Path, split: str, name: str, labels_file: Path) -> Path:
    candidates = [root / "images" / split / name, root / split / name, root / "images" / name]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"{labels_file}: image {name!r} not found (looked for {tried})")


def _votes(value, where: str) -> list[int]:
    ok = isinstance(value, list) and value and all(isinstance(v, int) and v in (0, 1) for v in value)
    if not ok:
        raise ValueError(f"{where}: 'human_labels' must be a non-empty list of 0/1 votes, got {value!r}")
    return [int(v) for v in value]


def load_tia2(root: str | Path, splits: list[str] | None = None) -> TIA2Data:
    """Read and check a TIA2 folder (see the module docstring). Errors name the bad file and entry.

    `splits`: which splits to read (default: every human_labels_<split>.json, sorted)."""
    root = Path(root).expanduser()
    labels_dir = root / LABELS_DIR
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a TIA2 folder: {labels_dir} does not exist")
    found = sorted(p.name[len(LABELS_PREFIX):-len(".json")] for p in labels_dir.glob(f"{LABELS_PREFIX}*.json"))
    if not found:
        raise FileNotFoundError(f"{labels_dir} holds no {LABELS_PREFIX}<split>.json file")
    if splits is None:
        splits = found
    unknown = [s for s in splits if s not in found]
    if unknown or not splits:
        raise ValueError(f"unknown TIA2 splits {unknown or splits!r}; {labels_dir} has: {', '.join(found)}")

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
            item.images.append(_find_image(root, split, key, labels_file))
            item.labels.append(sum(votes) * 2 > len(votes))
            item.graded.append(sum(votes) / len(votes))
        for item in by_prompt.values():
            if len(item.images) < 2:
                raise ValueError(f"{labels_file}: prompt {item.prompt!r} has {len(item.images)} image; "
                                 "a ranking needs at least 2")
        prompts.extend(by_prompt.values())
        sets_file = root / PROMPTS_DIR / f"{PROMPTS_PREFIX}{split}.json"
        prompt_sets[split] = sets_file if sets_file.is_file() else None
    return TIA2Data(root, list(splits), prompts, prompt_sets)


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


def run_tia2_benchmark(
    data: TIA2Data,
    rewards: dict[str, Callable],
    k: int = 4,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Score every image of `data` with every reward and compare, prompt by prompt, with the
    human labels: the metrics and report of `benchmark.run_reward_benchmark`, with the folder's
    splits (and "all") as the splits. A prompt's images are loaded once for all rewards."""
    from .benchmark import score_images

    if not rewards:
        raise ValueError("no rewards to benchmark")
    rewards = {name: r.to(device) if hasattr(r, "to") else r for name, r in rewards.items()}
    per_reward: dict[str, list[dict[str, float]]] = {name: [] for name in rewards}
    for i, item in enumerate(data.prompts):
        images = load_images(item.images)
        labels = np.array(item.labels)[None]
        graded = np.array(item.graded)[None]
        for name, reward in rewards.items():
            try:
                scores = score_images(reward, images, [item.prompt] * len(item.images), batch_size, device)
            except ValueError as err:
                raise ValueError(f"reward {name!r} on {item.prompt!r}: {err}") from err
            metrics = prompt_metrics(scores[None], labels, graded, k)
            per_reward[name].append({m: float(v[0]) for m, v in metrics.items()})
        if progress is not None and ((i + 1) % 25 == 0 or i + 1 == len(data.prompts)):
            progress(f"scored {i + 1}/{len(data.prompts)} prompts")

    split_of = np.array([p.split for p in data.prompts])
    masks = {s: split_of == s for s in data.splits}
    masks["all"] = np.ones(len(data.prompts), dtype=bool)
    mixed = np.array([0 < sum(p.labels) < len(p.labels) for p in data.prompts])
    varied = np.array([max(p.graded) > min(p.graded) for p in data.prompts])
    counts = np.array([len(p.images) for p in data.prompts])
    splits = {
        name: {
            "n_prompts": int(m.sum()),
            "n_images": int(counts[m].sum()),
            "base_rate": float(sum(sum(p.labels) for p, s in zip(data.prompts, m) if s) / counts[m].sum())
            if m.any() else math.nan,
            "n_mixed": int((m & mixed).sum()),
            "n_graded": int((m & varied).sum()),
        }
        for name, m in masks.items()
    }
    results, per_prompt_out = {}, {}
    for name, rows in per_reward.items():
        metrics = {m: np.array([row[m] for row in rows]) for m in rows[0]}
        results[name] = {split: aggregate(metrics, m) for split, m in masks.items()}
        per_prompt_out[name] = {m: v.tolist() for m, v in metrics.items()}
    lo, hi = int(counts.min()), int(counts.max())
    return {
        "benchmark": BENCHMARK,
        "k": k,
        "n_prompts": len(data.prompts),
        "images_per_prompt": lo if lo == hi else f"{lo}-{hi}",
        "splits": splits,
        "results": results,
        "per_prompt": {
            "prompts": [p.prompt for p in data.prompts],
            "category": [p.split for p in data.prompts],
            "n_correct": [int(sum(p.labels)) for p in data.prompts],
            "rewards": per_prompt_out,
        },
    }
