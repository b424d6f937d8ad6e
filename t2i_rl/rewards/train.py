"""Train ShapesWorld's proxy reward models: `python -m t2i_rl.rewards.train [key=value ...]`.

Config: configs/pretrain/rewards.yaml (every size, step count, learning rate and the seed).
Stages, in order (all of them deterministic from the seed):

1. clip: a CLIP-style dual encoder trained from scratch with the symmetric InfoNCE loss (learnable
   logit scale) on freshly rendered train-split images and their captions. Captions repeat within
   a batch (ShapesWorld has few one-object prompts), so every image with the same caption counts
   as a positive. Like real CLIP it is weak at what captions rarely contrast: counting.
2. samples: base-model images of train-split prompts (several per prompt), from the given
   pipeline with its default sampler settings, labelled by the ShapesWorld judge.
3. lee: Lee et al.'s MLP head on the frozen CLIP: MSE to the judge's binary label + lambda x
   prompt-classification cross-entropy over contrastive prompts (softmax of r / T).
4. pairwise: ImageReward-style MLP head: Bradley-Terry loss on pairs of images of the same prompt
   ranked by the judge's score (ties skipped).

A share of the sampled prompts (`val_fraction`) is held out to measure the heads; every model is
also measured on rendered held-out-split images against each contrastive prompt, per attribute.
All three are saved together, atomically, under the output folder, with the config and metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .. import CONFIG_DIR
from ..models import build_tokenizer
from ..recipe import load_checked, lr_lambda
from ..world import ShapesWorld
from ..world.grammar import COUNT_WORDS, MAX_COUNT, Scene, contrastive_scenes, parse_prompt, sample_scenes
from ..world.render import render_scenes
from ._common import pad_prompt_sets, prompt_index
from .base import RawReward
from .clip_style import ShapesCLIP
from .lee import LeeReward
from .pairwise import PairwiseReward, bradley_terry_loss, preference_pairs

DEFAULT_CONFIG = CONFIG_DIR / "pretrain" / "rewards.yaml"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learned temperature
CLIP_SIZES = ("image_size", "patch_size", "vision_hidden", "vision_layers", "text_hidden",
              "text_layers", "projection_dim", "heads")


# ------------------------------------------------------------------------------------ config
def validate(cfg: DictConfig) -> None:
    """Fail before any work on a config that cannot train."""
    for stage in ("clip", "lee", "pairwise"):
        for key in ("steps", "batch_size"):
            if int(cfg[stage][key]) < 1:
                raise ValueError(f"{stage}.{key} must be >= 1, got {cfg[stage][key]}")
        if float(cfg[stage].lr) <= 0:
            raise ValueError(f"{stage}.lr must be > 0, got {cfg[stage].lr}")
    for key in ("n", "per_prompt", "batch_size", "num_inference_steps"):
        if int(cfg.samples[key]) < 1:
            raise ValueError(f"samples.{key} must be >= 1, got {cfg.samples[key]}")
    if int(cfg.samples.per_prompt) < 2:
        raise ValueError(f"samples.per_prompt must be >= 2 (pairs need two images of a prompt), got {cfg.samples.per_prompt}")
    if not 0 <= float(cfg.val_fraction) < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if float(cfg.lee.temperature) <= 0 or float(cfg.lee.lam) < 0:
        raise ValueError(f"lee.temperature must be > 0 and lee.lam >= 0, got {cfg.lee.temperature}, {cfg.lee.lam}")
    if cfg.lee.ce_on not in ("positive", "all"):
        raise ValueError(f"lee.ce_on must be 'positive' or 'all', got {cfg.lee.ce_on!r}")
    if int(cfg.lee.n_contrastive) < 1:
        raise ValueError(f"lee.n_contrastive must be >= 1, got {cfg.lee.n_contrastive}")
    captions = cfg.clip.get("captions", "exact")
    if captions not in ("exact", "web"):
        raise ValueError(f"clip.captions must be 'exact' or 'web', got {captions!r}")
    if captions == "web":
        web = cfg.clip.web
        probs = [float(web[k]) for k in ("p_count_missing", "p_count_wrong", "p_color_missing", "p_background_missing")]
        if not all(0 <= p <= 1 for p in probs) or probs[0] + probs[1] > 1:
            raise ValueError(f"clip.web probabilities must be in [0, 1] (p_count_missing + p_count_wrong <= 1), "
                             f"got {OmegaConf.to_container(web)}")
    labels = cfg.pairwise.get("labels", "judge")
    if labels not in ("judge", "simulated"):
        raise ValueError(f"pairwise.labels must be 'judge' or 'simulated', got {labels!r}")
    if labels == "simulated" and float(cfg.pairwise.rater.noise) <= 0:
        raise ValueError(f"pairwise.rater.noise must be > 0, got {cfg.pairwise.rater.noise}")


def _optimizer(params, stage: DictConfig):
    opt = torch.optim.AdamW(params, lr=float(stage.lr), weight_decay=float(stage.get("weight_decay", 0.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(stage.get("warmup", 0)), int(stage.steps)))
    return opt, sched


def _generators(seed: int, stage: int) -> tuple[np.random.Generator, torch.Generator]:
    return np.random.default_rng([seed, stage]), torch.Generator().manual_seed(seed * 1000 + stage)


# ------------------------------------------------------------------------------------ clip
def web_caption(scene: Scene, rng: np.random.Generator, web: DictConfig) -> str:
    """A scene captioned as alt text on the web captions a picture, not as the grammar states it
    (`clip.captions: web`): the objects in either order; a group's count left out
    (`p_count_missing`: "blue circles", "a blue circle") or off by one (`p_count_wrong`, the noun
    agreeing with the stated count); its colour left out (`p_color_missing`); the background left
    out (`p_background_missing`). Web captions seldom count and often drop attributes, which is why
    CLIP-like models count poorly and bind colours to objects loosely (Paiss et al. 2023,
    Yuksekgonul et al. 2023); a proxy trained on exact captions is spared both."""
    groups = list(scene.groups)
    if len(groups) == 2 and rng.random() < 0.5:
        groups.reverse()
    phrases = []
    for g in groups:
        count, draw = g.count, rng.random()
        if draw < float(web.p_count_missing):
            count_word = None
        else:
            if draw < float(web.p_count_missing) + float(web.p_count_wrong):
                count = count + 1 if count == 1 or (count < MAX_COUNT and rng.random() < 0.5) else count - 1
            count_word = COUNT_WORDS[count - 1]
        noun = g.shape if count == 1 else g.shape + "s"
        words = [count_word or ("a" if count == 1 else None)]
        if rng.random() >= float(web.p_color_missing):
            words.append(g.color)
        phrases.append(" ".join(w for w in [*words, noun] if w))
    text = " and ".join(phrases)
    if rng.random() >= float(web.p_background_missing):
        text += f" on a {scene.background} background"
    return text


def render_pool(world: ShapesWorld, n: int, rng: np.random.Generator, two_object_prob: float,
                web: DictConfig | None = None):
    """`n` rendered train-split images and their captions: the grammar's prompts, or web-style
    captions (`web_caption`) when `web` is given."""
    scenes = sample_scenes(n, int(rng.integers(2**31)), "train", two_object_prob)
    images, _ = render_scenes(scenes, world.resolution, rng)
    return images, [s.text() if web is None else web_caption(s, rng, web) for s in scenes]


def info_nce(img: torch.Tensor, txt: torch.Tensor, captions: list[str], logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of normalized embeddings [B, D]; every pair whose captions are equal is a
    positive (the target spreads evenly over them)."""
    logits = logit_scale.exp() * img @ txt.T
    _, ids = prompt_index(captions)
    same = (ids[:, None] == ids[None, :]).to(logits.dtype).to(logits.device)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_clip(cfg: DictConfig, world: ShapesWorld | None = None, tokenizer=None) -> ShapesCLIP:
    """CLIP from scratch on rendered images and captions; returns it frozen."""
    c = cfg.clip
    world = world or ShapesWorld(cfg.resolution, cfg.two_object_prob)
    rng, gen = _generators(int(cfg.seed), 1)
    clip = ShapesCLIP.build(tokenizer, seed=int(cfg.seed), **{k: int(c[k]) for k in CLIP_SIZES})
    clip.unfreeze()
    opt, sched = _optimizer(clip.model.parameters(), c)
    bar = tqdm(range(int(c.steps)), desc="clip", dynamic_ncols=True)
    for step in bar:
        if step % int(c.pool_refresh) == 0:
            pool, captions = render_pool(world, int(c.pool_size), rng, float(cfg.two_object_prob),
                                         c.web if c.get("captions", "exact") == "web" else None)
        idx = torch.randint(len(captions), (int(c.batch_size),), generator=gen)
        texts = [captions[i] for i in idx.tolist()]
        loss = info_nce(clip.image_embeds(pool[idx]), clip.text_embeds(texts), texts, clip.model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{clip.model.logit_scale.exp().item():.1f}")
    clip.last_loss = float(loss.item())
    return clip.freeze()


# ------------------------------------------------------------------------------------ samples
@torch.no_grad()
def sample_base(pipe, cfg: DictConfig, world: ShapesWorld | None = None) -> tuple[torch.Tensor, list[str]]:
    """`samples.n` base-model images of train-split prompts, `samples.per_prompt` per prompt."""
    s = cfg.samples
    world = world or ShapesWorld(cfg.resolution, cfg.two_object_prob)
    per = int(s.per_prompt)
    unique = world.sample_prompts(math.ceil(int(s.n) / per), seed=int(cfg.seed) + 7, split="train")
    prompts = [p for p in unique for _ in range(per)][: int(s.n)]
    gen = torch.Generator().manual_seed(int(cfg.seed) + 2)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    images = []
    bs = int(s.batch_size)
    for start in tqdm(range(0, len(prompts), bs), desc="samples", dynamic_ncols=True):
        out = pipe(prompts[start:start + bs], num_inference_steps=int(s.num_inference_steps),
                   guidance_scale=float(s.guidance_scale), eta=float(s.eta), output_type="pt", generator=gen)
        images.append(out.images.float().clamp(0, 1).cpu())
    return torch.cat(images), prompts


def split_by_prompt(prompts: list[str], val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices, with every image of a prompt on the same side."""
    unique = sorted(set(prompts))
    rng = np.random.default_rng([seed, 9])
    n_val = int(round(len(unique) * val_fraction))
    val = set(rng.permutation(len(unique))[:n_val].tolist())
    val_prompts = {unique[i] for i in val}
    is_val = torch.tensor([p in val_prompts for p in prompts])
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


@torch.no_grad()
def _embed(clip: ShapesCLIP, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([clip.image_embeds(images[i:i + chunk]) for i in range(0, len(images), chunk)])


# ------------------------------------------------------------------------------------ lee
def train_lee(cfg: DictConfig, clip: ShapesCLIP, images: torch.Tensor, prompts: list[str],
              labels: torch.Tensor, world: ShapesWorld | None = None) -> LeeReward:
    """Lee et al.'s reward model on (image, prompt, binary label) triples; returns it frozen."""
    c = cfg.lee
    world = world or ShapesWorld(cfg.resolution, cfg.two_object_prob)
    rng, gen = _generators(int(cfg.seed), 3)
    lee = LeeReward.build(clip, int(c.hidden), int(c.layers), seed=int(cfg.seed) + 3,
                          temperature=float(c.temperature), lam=float(c.lam)).unfreeze()
    emb = _embed(clip, images)
    labels = labels.float()
    alts = {p: world.contrastive(p) for p in set(prompts)}
    k = int(c.n_contrastive)
    opt, sched = _optimizer(lee.head.parameters(), c)
    bar = tqdm(range(int(c.steps)), desc="lee", dynamic_ncols=True)
    history = []
    for _ in bar:
        idx = torch.randint(len(prompts), (int(c.batch_size),), generator=gen).tolist()
        sets = []
        for i in idx:
            a = alts[prompts[i]]
            pick = rng.choice(len(a), size=min(k, len(a)), replace=False)
            sets.append([prompts[i]] + [a[j] for j in pick])
        sets, mask = pad_prompt_sets(sets)
        txt = clip.text_embeds([p for s in sets for p in s]).view(len(sets), mask.shape[1], -1)
        scores = lee.score_embeds(emb[idx], txt)
        y = labels[idx]
        terms = lee.loss(scores, y, mask, classify=(y > 0.5) if c.ce_on == "positive" else None)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        sched.step()
        history.append(terms["loss"].item())
        bar.set_postfix(mse=f"{terms['mse'].item():.3f}", ce=f"{terms['ce'].item():.3f}")
    lee.history = history
    return lee.freeze()


# ------------------------------------------------------------------------------------ pairwise
def image_taste(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a rater may like in an image whatever the prompt, each [N] in [0, 1]: `size`, the share
    of pixels away from the background (the border's median colour), and `saturation`, the mean
    (max - min) over the channels of those pixels."""
    flat = images.flatten(2)  # [N, 3, HW]
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], 2)
    background = border.median(2).values[:, :, None]
    foreground = ((flat - background).norm(dim=1) > 0.22).float()  # [N, HW]
    chroma = flat.max(1).values - flat.min(1).values
    size = foreground.mean(1)
    return {"size": size, "saturation": (chroma * foreground).sum(1) / foreground.sum(1).clamp_min(1)}


def simulated_preferences(images: torch.Tensor, prompts: list[str], scores: torch.Tensor, rater: DictConfig,
                          rng: np.random.Generator) -> torch.Tensor:
    """(winner, loser) pairs [P, 2] as a simulated human labels every pair of images of one prompt
    (`pairwise.labels: simulated`): mostly by the prompt, the judge's score, but also by an image-only
    taste for larger objects (`w_size`) and more saturated colours (`w_saturation`), with rater noise:
    P(i over j) = sigmoid((u_i - u_j) / noise), u = score + w_size x size + w_saturation x saturation.
    Real preference data carry such prompt-free tastes (ImageReward's and PickScore's raters favour
    aesthetics, size, saturation), and a model trained on them rewards them."""
    taste = image_taste(images)
    utility = (scores.float() + float(rater.w_size) * taste["size"]
               + float(rater.w_saturation) * taste["saturation"]).numpy()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    pairs = []
    for idx in groups.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                p_i = 0.5 * (1.0 + math.tanh((utility[i] - utility[j]) / (2 * float(rater.noise))))  # the sigmoid
                pairs.append((i, j) if rng.random() < p_i else (j, i))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def train_pairwise(cfg: DictConfig, clip: ShapesCLIP, images: torch.Tensor, prompts: list[str],
                   scores: torch.Tensor) -> PairwiseReward:
    """ImageReward-style model on ranked pairs of images of the same prompt, ranked by the judge
    (`pairwise.labels: judge`, ties skipped) or by a simulated rater (`simulated`); returns it frozen."""
    c = cfg.pairwise
    rng, gen = _generators(int(cfg.seed), 4)
    model = PairwiseReward.build(clip, int(c.hidden), int(c.layers), seed=int(cfg.seed) + 4).unfreeze()
    if c.get("labels", "judge") == "simulated":
        pairs = simulated_preferences(images, prompts, scores, c.rater, rng)
    else:
        pairs = preference_pairs(prompts, scores)
    if len(pairs) == 0:
        raise ValueError("no preference pairs: every prompt's images have equal judge scores")
    emb = _embed(clip, images)
    uniq, inv = np.unique(np.asarray(prompts), return_inverse=True)
    txt = clip.text_embeds(list(uniq))[torch.as_tensor(inv)]
    opt, sched = _optimizer(model.head.parameters(), c)
    bar = tqdm(range(int(c.steps)), desc="pairwise", dynamic_ncols=True)
    history = []
    for _ in bar:
        w, l = pairs[torch.randint(len(pairs), (int(c.batch_size),), generator=gen)].T
        loss = bradley_terry_loss(model.head(emb[w], txt[w]), model.head(emb[l], txt[l]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.history = history
    return model.freeze()


# ------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def contrastive_accuracy(reward: RawReward, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per attribute, how often r(x, y) > r(x, y') for y' differing from y in that attribute."""
    sets, attrs = [], []
    for p in prompts:
        alts = contrastive_scenes(parse_prompt(p))
        sets.append([p] + [s.text() for _, s in alts])
        attrs.append([a for a, _ in alts])
    padded, mask = pad_prompt_sets(sets)
    scores = torch.cat([reward.score_prompts(images[i:i + 128], padded[i:i + 128])
                        for i in range(0, len(padded), 128)]).cpu()
    wins: dict[str, list[bool]] = {}
    for i, names in enumerate(attrs):
        for j, a in enumerate(names, start=1):
            wins.setdefault(a, []).append(bool(scores[i, 0] > scores[i, j]))
    return {a: float(np.mean(v)) for a, v in sorted(wins.items())}


@torch.no_grad()
def head_metrics(lee: LeeReward, pairwise: PairwiseReward, images, prompts, judged) -> dict:
    """Agreement of the heads with the judge on held-out base-model samples."""
    if len(prompts) == 0:
        return {}
    r_lee = torch.cat([lee(images[i:i + 256], prompts[i:i + 256]).scores for i in range(0, len(prompts), 256)])
    r_pw = torch.cat([pairwise(images[i:i + 256], prompts[i:i + 256]).scores for i in range(0, len(prompts), 256)])
    y = judged.correct.float()
    out = {"lee/mse": float(F.mse_loss(r_lee, y)), "lee/accuracy": float(((r_lee > 0.5).float() == y).float().mean())}
    pairs = preference_pairs(prompts, judged.score)
    if len(pairs):
        out["pairwise/pair_accuracy"] = float((r_pw[pairs[:, 0]] > r_pw[pairs[:, 1]]).float().mean())
        out["lee/pair_accuracy"] = float((r_lee[pairs[:, 0]] > r_lee[pairs[:, 1]]).float().mean())
    return out


# ------------------------------------------------------------------------------------ all
def save_atomically(models: dict[str, RawReward], out_dir: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Save every model into a temporary folder beside `out_dir`, then swap it in."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name, model in models.items():
            model.save_pretrained(staged / name)
        for fname, text in (extra or {}).items():
            (staged / fname).write_text(text)
        if out.exists():
            out.rename(Path(tmp) / "old")
        staged.rename(out)
    return out


def train_all(cfg: DictConfig, pipe, out_dir: str | Path | None = None) -> dict[str, RawReward]:
    """Train clip, sample and judge base-model images from `pipe`, train lee and pairwise on
    them, and save all three (atomically) under `out_dir` (default: cfg.output_dir)."""
    validate(cfg)
    torch.manual_seed(int(cfg.seed))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    start = time.time()
    world = ShapesWorld(cfg.resolution, cfg.two_object_prob)
    clip = train_clip(cfg, world, build_tokenizer())
    images, prompts = sample_base(pipe, cfg, world)
    judged = world.judge(images, prompts)
    tr, va = split_by_prompt(prompts, float(cfg.val_fraction), int(cfg.seed))
    tr_prompts, va_prompts = [prompts[i] for i in tr], [prompts[i] for i in va]
    lee = train_lee(cfg, clip, images[tr], tr_prompts, judged.correct[tr].float(), world)
    pairwise = train_pairwise(cfg, clip, images[tr], tr_prompts, judged.score[tr])
    models = {"clip": clip, "lee": lee, "pairwise": pairwise}

    metrics: dict = {"samples/n": len(prompts), "samples/gold_correct": float(judged.correct.float().mean()),
                     "samples/gold_score": float(judged.score.mean()),
                     "samples/pairs": int(len(preference_pairs(prompts, judged.score)))}
    va_judged = world.judge(images[va], va_prompts) if len(va) else None
    if va_judged is not None:
        metrics.update({f"val/{k}": v for k, v in head_metrics(lee, pairwise, images[va], va_prompts, va_judged).items()})
    eval_prompts = world.sample_prompts(int(cfg.eval.n_images), seed=int(cfg.seed) + 11, split="heldout")
    eval_images = world.render(eval_prompts, seed=int(cfg.seed) + 11)
    for name, model in models.items():
        for attr, acc in contrastive_accuracy(model, eval_images, eval_prompts).items():
            metrics[f"contrastive/{name}/{attr}"] = acc
    metrics["minutes"] = (time.time() - start) / 60
    tqdm.write(json.dumps(metrics, indent=1))
    save_atomically(models, out_dir or cfg.output_dir, {
        "rewards_config.yaml": OmegaConf.to_yaml(cfg), "metrics.json": json.dumps(metrics, indent=2) + "\n"})
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2i_rl.pretrain --stage rewards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. clip.steps=100")
    args = parser.parse_args(argv)
    cfg = load_checked(args.config, args.overrides, validate)
    if cfg is None:
        return 2
    from ..models import load_pipeline

    pipe = load_pipeline(str(cfg.pipeline))
    train_all(cfg, pipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
