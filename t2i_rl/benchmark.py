"""Benchmarks of the package: `python -m t2i_rl.benchmark SUBCOMMAND ...`.

`rewards`: how well does each reward model agree with the "human"? TextNorm's TIA2 protocol
(prompts x images, binary human labels, reward models scored per prompt by AUROC, AUPRC, AP@k,
Spearman and Kendall, averaged over prompts) on ShapesWorld, where the exact judge is the human:

    python -m t2i_rl.benchmark rewards [--prompts 100] [--images 16] [--steps 20] [--guidance 5]
        [--seed 0] [--cache PATH.pt] [--json PATH] [--rewards NAME ...]

TIA2-shapes: the first `--prompts` distinct held-out prompts of a fixed draw (half single-object,
half two-object), `--images` images each from the base model (`load_pipeline("shapes")`, stochastic
DDIM, one seeded generator per image), the judge's all-correct verdict as the binary label and its
score (fraction of attributes right) as the graded one. Results per split: "counting" (one object
group whose count is not one), "composition" (two object groups) and "all".

TIA2 on real data: `--tia2 FOLDER` reads TextNorm's release as it is (human_annotations/,
prompts/, alignment_scores/, and images/<split>/ if downloaded; see `t2i_rl.tia2`) instead of
generating images, and reports the same metrics, as the release computes them, per split
(`--splits`, default all). The models: `--rewards` scored on the folder's images, `--scores FILE`
(any model's precomputed scores, named by the file's stem) and `--reference` (the release's own
per-prompt metrics of CLIP, BLIP-2, ImageReward, PickScore and TextNorm). `--contrastive SPEC`
sets the contrastive prompts of the TextNorm rewards that do not set their own: shapes, rules,
tia2 (the folder's prompts/, rules for prompts not in them; the default with --tia2) or a JSON spec.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .metrics import AP_KS, aggregate, prompt_metrics
from .rewards.base import score_images
from .world import ShapesWorld, parse_prompt

BENCHMARK = "TIA2-shapes"
CACHE_FORMAT = "t2i_rl.benchmark.rewards/1"
PROMPT_SEED = 2024  # the benchmark's prompt set is fixed; --seed only changes the images
TWO_OBJECT_PROB = 0.5
DEFAULT_GUIDANCE = 5.0
DEFAULT_ETA = 1.0  # stochastic DDIM, as the RL environment samples
SPLITS: tuple[str, ...] = ("counting", "composition", "all")
RAW_REWARDS: tuple[str, ...] = ("clip", "lee", "pairwise")
REGISTRY_NAMES: tuple[str, ...] = RAW_REWARDS + ("gold",)
# TextNorm temperatures per raw model. CLIP scores are cosine similarities that differ by a few
# hundredths between a prompt and its contrastive prompts; the Lee-style and pairwise models give
# unbounded scalars whose prompt-to-prompt differences are of order 0.1-1.
DEFAULT_TAU: dict[str, float] = {"clip": 0.02, "lee": 0.1, "pairwise": 0.1}


def _ensemble(mode: str) -> dict:
    return {"name": "ensemble", "members": list(RAW_REWARDS), "mode": mode}


def with_assets(spec, folder: Path):
    """`spec` with each learned proxy (clip, lee, pairwise) loaded from `folder/<name>` instead of the
    shipped weights, however deep it sits (a TextNorm's base, an ensemble's members)."""
    if isinstance(spec, str):
        return {"name": spec, "path": str(folder / spec)} if spec in RAW_REWARDS else spec
    if isinstance(spec, list):
        return [with_assets(s, folder) for s in spec]
    if not isinstance(spec, dict):
        return spec
    out = {k: with_assets(v, folder) if k in ("base", "members") else v for k, v in spec.items()}
    if out.get("name") in RAW_REWARDS and "path" not in out:
        out["path"] = str(folder / out["name"])
    return out


def default_reward_specs() -> dict[str, str | dict]:
    """The rewards benchmarked by default: {display name: spec for `make_reward`}."""
    specs: dict[str, str | dict] = {name: name for name in RAW_REWARDS}
    for name in RAW_REWARDS:
        specs[f"textnorm({name})"] = {"name": "textnorm", "base": name, "tau": DEFAULT_TAU[name]}
    specs["ensemble(mean)"] = _ensemble("mean")
    specs["ensemble(mean-std)"] = _ensemble("mean_minus_std")
    for mode, label in (("mean", "mean"), ("mean_minus_std", "mean-std")):
        specs[f"textnorm(ensemble({label}))"] = {
            "name": "textnorm", "base": _ensemble(mode), "tau": dict(DEFAULT_TAU),
        }
    return specs


# ----------------------------------------------------------------------------------------------
# The benchmark's data: prompts, splits, images


def benchmark_prompts(n: int, seed: int = PROMPT_SEED) -> list[str]:
    """The first `n` distinct prompts of a fixed draw from the held-out split (one or two object
    groups with equal probability). A prefix of the list for a larger `n`."""
    world = ShapesWorld(two_object_prob=TWO_OBJECT_PROB)
    available = len(world.prompts("heldout"))
    if not 1 <= n <= available:
        raise ValueError(f"the number of prompts must be in 1..{available} (the held-out split), got {n}")
    out: dict[str, None] = {}
    chunk, offset = max(4 * n, 256), 0
    while len(out) < n:
        # Draw a longer stream each round; the stream for a seed is a prefix of any longer one.
        for p in world.sample_prompts(offset + chunk, seed=seed, split="heldout")[offset:]:
            out.setdefault(p, None)
            if len(out) == n:
                break
        offset += chunk
    return list(out)


def prompt_category(prompt: str) -> str:
    """"counting" (one object group, count != 1), "composition" (two groups) or "single" (one object)."""
    scene = parse_prompt(prompt)
    if len(scene.groups) == 2:
        return "composition"
    return "counting" if scene.groups[0].count != 1 else "single"


def split_masks(prompts: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks [P] of the prompts in each split of `SPLITS`."""
    cats = np.array([prompt_category(p) for p in prompts])
    return {"counting": cats == "counting", "composition": cats == "composition",
            "all": np.ones(len(prompts), dtype=bool)}


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The generator seed of image j of prompt i: independent of batching and of how many prompts
    or images a run asks for, so a smaller run is a slice of a larger one."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    images_per_prompt: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 32,
    eta: float = DEFAULT_ETA,
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Images [P, M, 3, H, W] in [0, 1] from a diffusers pipeline, one seeded generator per image."""
    pipe.set_progress_bar_config(disable=True)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(images_per_prompt)]
    chunks = []
    t0 = time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        gens = [torch.Generator().manual_seed(image_seed(seed, i, j)) for i, j in batch]
        out = pipe([prompts[i] for i, _ in batch], num_inference_steps=steps, guidance_scale=guidance,
                   eta=eta, output_type="pt", generator=gens).images
        chunks.append(out.detach().float().cpu().clamp(0, 1))
        if progress is not None:
            done = start + len(batch)
            progress(f"generated {done}/{len(jobs)} images ({time.perf_counter() - t0:.0f} s)")
    images = torch.cat(chunks)
    return images.reshape(len(prompts), images_per_prompt, *images.shape[1:])


def model_fingerprint(name_or_path: str) -> str:
    """A hash of a local pipeline folder's weights (a cache made with other weights is stale),
    or the name itself for a hub id."""
    from .models import SHIPPED_PIPELINES

    path = Path(SHIPPED_PIPELINES.get(name_or_path, name_or_path))
    if not path.is_dir():
        return str(name_or_path)
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class CacheMismatch(ValueError):
    pass


def load_cached_images(path: str | Path, settings: dict, prompts: list[str], images_per_prompt: int) -> torch.Tensor | None:
    """Images [P, M, ...] from a cache made with the same settings (None if there is no file).

    A cache made with more prompts or images than asked for is sliced (prompts and image seeds are
    prefix-stable); anything else that differs raises `CacheMismatch`, naming the setting."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad cache
        raise CacheMismatch(f"cannot read the image cache {path}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        raise CacheMismatch(f"{path} is not an image cache of this benchmark (format {CACHE_FORMAT})")
    cached = blob["settings"]
    for key, value in settings.items():
        if cached.get(key) != value:
            raise CacheMismatch(
                f"the image cache {path} was made with {key}={cached.get(key)!r}, this run has {value!r}; "
                "delete it or pass another --cache"
            )
    images, cached_prompts = blob["images"], blob["prompts"]
    if cached_prompts[:len(prompts)] != prompts or images.shape[1] < images_per_prompt:
        raise CacheMismatch(
            f"the image cache {path} holds {len(cached_prompts)} prompts x {images.shape[1]} images, "
            f"which do not cover {len(prompts)} x {images_per_prompt}; delete it or pass another --cache"
        )
    return images[:len(prompts), :images_per_prompt].float()


def save_cached_images(path: str | Path, settings: dict, prompts: list[str], images: torch.Tensor) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CACHE_FORMAT, "settings": settings, "prompts": list(prompts),
                "images": images.detach().float().cpu().contiguous()}, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Scoring and metrics


def run_reward_benchmark(
    images: torch.Tensor,
    prompts: list[str],
    rewards: dict[str, Callable],
    k: int = 4,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    world: ShapesWorld | None = None,
) -> dict:
    """Score every image with every reward and compare, prompt by prompt, with the judge.

    Args:
        images: [P, M, 3, H, W] in [0, 1], M images of each of the P prompts.
        prompts: the P prompts.
        rewards: {display name: reward}, each a callable `reward(images [B,3,H,W], prompts [B])`
            returning a `RewardOutput` (or a tensor of scores [B]).
        k: the k of AP@k.

    Returns a JSON-ready dict (NaN where nothing counted):
        "benchmark", "k", "n_prompts", "images_per_prompt";
        "splits": {split: {"n_prompts", "n_images", "base_rate" (judge all-correct rate),
                   "n_mixed" (prompts with both labels: they count for AUROC/AUPRC/AP@k),
                   "n_graded" (prompts whose graded labels vary: they count for Spearman/Kendall)}};
        "results": {reward: {split: {metric: {"mean", "n"}}}}, "n" = prompts that counted;
        "per_prompt": {"prompts", "category", "n_correct", "rewards": {reward: {metric: [P]}}}.
    """
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"images must have shape [P, M, 3, H, W], got {tuple(images.shape)}")
    n_prompts, per_prompt = images.shape[:2]
    if len(prompts) != n_prompts:
        raise ValueError(f"got {n_prompts} prompts' images for {len(prompts)} prompts")
    if per_prompt < 2:
        raise ValueError(f"ranking needs at least 2 images per prompt, got {per_prompt}")
    if not rewards:
        raise ValueError("no rewards to benchmark")
    world = world or ShapesWorld()
    flat = images.reshape(n_prompts * per_prompt, *images.shape[2:]).float()
    flat_prompts = [p for p in prompts for _ in range(per_prompt)]
    verdict = world.judge(flat, flat_prompts)
    labels = verdict.correct.numpy().reshape(n_prompts, per_prompt)
    graded = verdict.score.numpy().astype(np.float64).reshape(n_prompts, per_prompt)
    masks = split_masks(prompts)
    mixed = labels.any(axis=1) & ~labels.all(axis=1)
    varied = graded.max(axis=1) > graded.min(axis=1)
    splits = {
        name: {
            "n_prompts": int(m.sum()),
            "n_images": int(m.sum()) * per_prompt,
            "base_rate": float(labels[m].mean()) if m.any() else math.nan,
            "n_mixed": int((m & mixed).sum()),
            "n_graded": int((m & varied).sum()),
        }
        for name, m in masks.items()
    }
    results, per_prompt_out = {}, {}
    for name, reward in rewards.items():
        if hasattr(reward, "to"):
            reward = reward.to(device)
        try:
            scores = score_images(reward, flat, flat_prompts, batch_size, device)
        except ValueError as err:
            raise ValueError(f"reward {name!r}: {err}") from err
        metrics = prompt_metrics(scores.reshape(n_prompts, per_prompt), labels, graded, k)
        results[name] = {split: aggregate(metrics, m) for split, m in masks.items()}
        per_prompt_out[name] = {metric: values.tolist() for metric, values in metrics.items()}
    return {
        "benchmark": BENCHMARK,
        "k": k,
        "n_prompts": int(n_prompts),
        "images_per_prompt": int(per_prompt),
        "splits": splits,
        "results": results,
        "per_prompt": {
            "prompts": list(prompts),
            "category": [prompt_category(p) for p in prompts],
            "n_correct": labels.sum(axis=1).astype(int).tolist(),
            "rewards": per_prompt_out,
        },
    }


_SPLIT_SHORT = {"counting": "cnt", "composition": "comp", "all": "all"}


def _metric_short(metric: str) -> str:
    return {"auroc": "ROC", "auprc": "PRC", "spearman": "rho", "kendall": "tau"}.get(metric, metric.upper())


def format_table(result: dict) -> str:
    """A compact markdown table: rows = rewards, columns = split x metric (means over prompts)."""
    lines = [
        f"{result['benchmark']}: {result['n_prompts']} prompts x {result['images_per_prompt']} images, k={result['k']}. "
        + "; ".join(
            f"{name}: {s['n_prompts']} prompts, {s['n_mixed']} with both labels, base rate {s['base_rate']:.2f}"
            for name, s in result["splits"].items()
        ),
        "",
    ]
    metrics = next(iter(next(iter(result["results"].values())).values())).keys()
    cols = [(split, m) for split in result["splits"] for m in metrics]
    lines.append("| reward | " + " | ".join(f"{_SPLIT_SHORT.get(s, s)} {_metric_short(m)}" for s, m in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for name, by_split in result["results"].items():
        cells = []
        for split, m in cols:
            v = by_split[split][m]["mean"]
            cells.append("-" if v is None or math.isnan(v) else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_ready(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """A bad command line: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, no SystemExit
        raise UsageError(message)


def _reward_specs(args) -> dict[str, str | dict]:
    """--rewards as specs, their learned proxies from --assets where it is given."""
    specs = _parse_reward_names(args.rewards)
    if args.assets is None:
        return specs
    if not Path(args.assets).is_dir():
        raise UsageError(f"--assets {args.assets} is not a folder")
    return {name: with_assets(spec, Path(args.assets)) for name, spec in specs.items()}


def _parse_reward_names(names: list[str] | None) -> dict[str, str | dict]:
    defaults = default_reward_specs()
    if not names:
        return defaults
    out: dict[str, str | dict] = {}
    for name in names:
        if name.lstrip().startswith("{"):
            try:
                spec = json.loads(name)
            except json.JSONDecodeError as err:
                raise UsageError(f"--rewards: {name!r} is not valid JSON: {err}") from err
            out[json.dumps(spec, separators=(",", ":"))] = spec
        elif name in defaults:
            out[name] = defaults[name]
        elif name in REGISTRY_NAMES:
            out[name] = name
        else:
            allowed = ", ".join(list(defaults) + [n for n in REGISTRY_NAMES if n not in defaults])
            raise UsageError(f"--rewards: unknown reward {name!r}; allowed: {allowed}, or a JSON spec")
    return out


def _contrastive_arg(value: str | None, tia2=None) -> str | dict | None:
    """The --contrastive spec (None: leave the rewards' own, ShapesWorld's grammar by default)."""
    if value is None:
        value = "tia2" if tia2 is not None else None
    if value is None or value in ("shapes", "rules"):
        return value
    if value == "tia2":
        if tia2 is None:
            raise UsageError("--contrastive tia2 needs --tia2 FOLDER")
        try:
            return tia2.contrastive_spec()
        except FileNotFoundError as err:
            raise UsageError(f"{err}; pass --contrastive rules") from err
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UsageError(f"--contrastive: {value!r} is not valid JSON: {err}") from err
    raise UsageError(f"--contrastive: unknown {value!r}; allowed: shapes, rules, tia2, or a JSON spec")


def _open_textnorm(spec) -> bool:
    """A TextNorm spec that leaves its contrastive prompts to the command line."""
    return isinstance(spec, dict) and spec.get("name") == "textnorm" and "contrastive" not in spec


def with_contrastive(specs: dict[str, str | dict], contrastive: str | dict | None) -> dict[str, str | dict]:
    """The specs with `contrastive` set on every TextNorm spec that does not set its own."""
    if contrastive is None:
        return specs
    return {name: {**spec, "contrastive": contrastive} if _open_textnorm(spec) else spec
            for name, spec in specs.items()}


def _build_rewards(specs: dict[str, str | dict], device: str) -> dict:
    from .rewards import make_reward

    rewards = {}
    for name, spec in specs.items():
        try:
            rewards[name] = make_reward(spec, device=device)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            raise UsageError(f"--rewards: cannot build {name!r}: {err}") from err
    return rewards


def _tia2_models(args, data) -> tuple[dict, dict]:
    """The models of `rewards --tia2`, as per-prompt metrics {model: {split: {metric: [P]}}}: the
    --rewards on the folder's images, the --scores files, the release's own (--reference). Also
    the settings that say where each came from."""
    from .tia2 import read_reference, read_scores, score_folder_images, score_metrics

    metrics: dict = {}
    settings: dict = {"rewards": None, "contrastive": None, "scores": {}, "reference": args.reference}

    def add(name: str, per_prompt: dict, source: str) -> None:
        if name in metrics:
            raise UsageError(f"two models are named {name!r} (the second from {source}); names must differ: "
                             "rename a --scores file (its stem is the model's name)")
        metrics[name] = per_prompt

    if args.rewards:
        specs = _reward_specs(args)
        # the folder's prompt sets are only read (and need to exist) when a TextNorm reward uses them
        contrastive = _contrastive_arg(args.contrastive, data) if any(map(_open_textnorm, specs.values())) else None
        specs = with_contrastive(specs, contrastive)
        rewards = _build_rewards(specs, args.device)
        t0 = time.perf_counter()
        try:
            scores = score_folder_images(data, rewards, batch_size=args.batch_size, device=args.device, progress=_log)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
        _log(f"scored {len(rewards)} rewards in {time.perf_counter() - t0:.1f} s")
        for name, by_split in scores.items():
            add(name, score_metrics(data, by_split, args.k), "--rewards")
        settings.update(rewards=specs, contrastive=contrastive)
    for path in args.scores or ():
        try:
            scores = read_scores(path, data)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(f"--scores: {err}") from err
        add(Path(path).stem, score_metrics(data, scores, args.k), f"--scores {path}")
        settings["scores"][Path(path).stem] = str(path)
    if args.reference:
        try:
            reference = read_reference(data, args.k)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(f"--reference: {err}") from err
        for name, by_split in reference.items():
            add(name, by_split, "--reference")
    return metrics, settings


def cmd_tia2(args) -> int:
    """`rewards --tia2 FOLDER`: reward models against a TIA2 folder's human labels, from its images
    (--rewards), precomputed scores (--scores) or the release's own per-prompt metrics (--reference)."""
    from .tia2 import BENCHMARK as TIA2, format_tia2_table, load_tia2, tia2_report

    if min(args.k) < 1:
        raise UsageError(f"--k must be >= 1, got {min(args.k)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.rewards or args.scores or args.reference):
        raise UsageError("--tia2 needs models to compare: --rewards NAME ... (scored on images/<split>/), "
                         "--scores FILE ... or --reference")
    try:
        data = load_tia2(args.tia2, args.splits)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--tia2: {err}") from err
    _log(f"{TIA2}: {len(data.prompts)} prompts in {', '.join(data.splits)} from {data.root}")
    metrics, sources = _tia2_models(args, data)
    settings = {"benchmark": TIA2, "folder": str(data.root), "splits": data.splits, "k": list(args.k), **sources}
    report = tia2_report(data, metrics, settings)
    print(format_tia2_table(report))
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_ready(report), indent=1) + "\n")
        _log(f"wrote {path}")
    return 0


def _check_args(args) -> None:
    available = len(ShapesWorld().prompts("heldout"))
    if not 1 <= args.prompts <= available:
        raise UsageError(f"--prompts must be in 1..{available} (the held-out split), got {args.prompts}")
    if args.images < 2:
        raise UsageError(f"--images must be >= 2 (a ranking needs two images), got {args.images}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if min(args.k) < 1:
        raise UsageError(f"--k must be >= 1, got {min(args.k)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cache is not None and Path(args.cache).suffix != ".pt":
        raise UsageError(f"--cache must be a .pt file, got {args.cache}")
    if args.cache is not None and Path(args.cache).is_dir():
        raise UsageError(f"--cache must be a file, {args.cache} is a folder")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_rewards(args) -> int:
    if args.tia2 is not None:
        return cmd_tia2(args)
    for flag, value in (("--splits", args.splits), ("--scores", args.scores), ("--reference", args.reference)):
        if value:
            raise UsageError(f"{flag} needs --tia2 FOLDER")
    _check_args(args)
    specs = with_contrastive(_reward_specs(args), _contrastive_arg(args.contrastive))
    prompts = benchmark_prompts(args.prompts)
    settings = {
        "benchmark": BENCHMARK, "prompt_seed": PROMPT_SEED, "two_object_prob": TWO_OBJECT_PROB,
        "model": args.model, "model_fingerprint": model_fingerprint(args.model),
        "steps": args.steps, "guidance": float(args.guidance), "eta": DEFAULT_ETA, "seed": args.seed,
    }
    images = None
    if args.cache is not None:
        try:
            images = load_cached_images(args.cache, settings, prompts, args.images)
        except CacheMismatch as err:
            raise UsageError(str(err)) from err

    rewards = _build_rewards(specs, args.device)

    if images is None:
        from .models import load_pipeline

        _log(f"generating {args.prompts} x {args.images} images with {args.model} "
             f"({args.steps} steps, guidance {args.guidance}, seed {args.seed})")
        pipe = load_pipeline(args.model, device=args.device)
        images = generate_images(pipe, prompts, args.images, args.steps, args.guidance, args.seed,
                                 batch_size=args.batch_size, progress=_log)
        del pipe
        if args.cache is not None:
            save_cached_images(args.cache, settings, prompts, images)
            _log(f"cached the images in {args.cache}")
    else:
        _log(f"loaded {args.prompts} x {args.images} images from {args.cache}")

    t0 = time.perf_counter()
    result = run_reward_benchmark(images, prompts, rewards, k=args.k, batch_size=args.batch_size,
                                  device=args.device)
    _log(f"scored {len(rewards)} rewards in {time.perf_counter() - t0:.1f} s")
    print(format_table(result))
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "settings": {**settings, "prompts": args.prompts, "images": args.images, "k": args.k,
                         "rewards": specs},
            **result,
        }
        path.write_text(json.dumps(_json_ready(report), indent=1) + "\n")
        _log(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m t2i_rl.benchmark", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    r = sub.add_parser("rewards", help=f"{BENCHMARK}: reward models against the judge, per prompt",
                       description=f"{BENCHMARK}: AUROC, AUPRC, AP@k, Spearman and Kendall of reward "
                                   "models against ShapesWorld's judge, averaged over prompts.")
    r.add_argument("--prompts", type=int, default=100, help="held-out prompts (default 100)")
    r.add_argument("--images", type=int, default=16, help="images per prompt (default 16)")
    r.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    r.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    r.add_argument("--seed", type=int, default=0, help="seed of the images (the prompts are fixed)")
    r.add_argument("--k", type=int, nargs="+", default=list(AP_KS), metavar="K",
                   help=f"the k's of AP@k (default {' '.join(map(str, AP_KS))}, as TextNorm's release)")
    r.add_argument("--cache", default=None, metavar="PATH.pt", help="image cache: reused when it matches")
    r.add_argument("--json", default=None, metavar="PATH", help="write the full report here")
    r.add_argument("--rewards", nargs="+", default=None, metavar="NAME",
                   help="rewards to score (default: all of " + ", ".join(default_reward_specs())
                        + "); also 'gold' or a JSON spec for make_reward")
    r.add_argument("--model", default="shapes", help="pipeline: 'shapes' (shipped) or a folder")
    r.add_argument("--assets", default=None, metavar="FOLDER",
                   help="load clip, lee and pairwise from FOLDER/<name> (the output_dir of `python -m "
                        "t2i_rl.pretrain --stage rewards`) instead of the shipped t2i_rl/assets/rewards")
    r.add_argument("--batch-size", type=int, default=32, help="images per generation/scoring batch")
    r.add_argument("--device", default="cpu", help="torch device (default cpu)")
    r.add_argument("--tia2", default=None, metavar="FOLDER",
                   help="compare models on a TIA2 folder (TextNorm's release: human_annotations/, prompts/, "
                        "alignment_scores/, images/<split>/) instead of generating TIA2-shapes: the --rewards on "
                        "its images (none by default), --scores files, --reference; --prompts, --images, --steps, "
                        "--guidance, --seed, --model, --cache do not apply")
    r.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="with --tia2: the splits to read (default all: counting, composition, comprehensive)")
    r.add_argument("--scores", nargs="+", default=None, metavar="FILE",
                   help="with --tia2: a model's precomputed scores, JSON {split: {image: score}} or CSV with the "
                        "columns split, image, score; the model is named by the file's stem")
    r.add_argument("--reference", action="store_true",
                   help="with --tia2: add the release's own models (alignment_scores/) as rows")
    r.add_argument("--contrastive", default=None, metavar="SPEC",
                   help="contrastive prompts of TextNorm rewards that set none: shapes, rules, tia2 (the "
                        "folder's prompts/, rules for the rest) or a JSON spec (default: tia2 with --tia2, else "
                        "each reward's own, ShapesWorld's grammar)")
    r.set_defaults(func=cmd_rewards)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except FileNotFoundError as err:  # e.g. the shipped pipeline is not trained yet
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
