"""Build rewards from names or specs (dicts or OmegaConf configs, as Hydra gives them).

    make_reward("clip")
    make_reward({"name": "lee", "path": "runs/rm/lee"})
    make_reward({"name": "ensemble", "members": ["clip", "lee"], "mode": "mean_minus_std", "lam": 0.5})
    make_reward({"name": "textnorm", "base": {"name": "ensemble", "members": ["clip", "pairwise"]},
                 "tau": {"clip": 0.02, "pairwise": 1.0}, "k": 8})
    make_reward({"name": "textnorm", "base": "clip", "contrastive": "rules"})   # free-text prompts
    make_reward({"name": "pickscore", "path": "/models/PickScore_v1", "processor": "/models/CLIP-H",
                 "dtype": "float16"})

The learned models load from `path` (a folder; a relative one not found from here is looked up under
the package's assets, so "rewards-web/clip" names the shipped web-caption model), or from the shipped
weights in `REWARD_ASSETS/<name>/`; the
published ones (`PRETRAINED`: clipscore, pickscore, imagereward, hpsv2, blip2, aesthetic) from `path`
(a local folder or a hub id; default their canonical hub id) in `dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ._common import positive_float
from .base import RewardFunction
from .clip_style import ShapesCLIP
from .composers import Ensemble, TextNorm
from .contrastive import make_contrastive
from .gold import GoldReward
from .lee import LeeReward
from .pairwise import PairwiseReward
from .pretrained import PRETRAINED

REWARD_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "rewards"
LEARNED = {"clip": ShapesCLIP, "lee": LeeReward, "pairwise": PairwiseReward}
_KEYS = {
    "clip": {"path"}, "lee": {"path"}, "pairwise": {"path"}, "gold": set(),
    "ensemble": {"members", "mode", "lam", "weights"},
    "textnorm": {"base", "tau", "k", "seed", "contrastive"},
    "clipscore": {"path", "processor", "dtype"}, "pickscore": {"path", "processor", "dtype"},
    "hpsv2": {"path", "processor", "dtype"}, "imagereward": {"path", "tokenizer", "dtype"},
    "blip2": {"path", "mode", "dtype"}, "aesthetic": {"path", "head", "dtype"},
}


def reward_names() -> list[str]:
    """Every name `make_reward` accepts."""
    return list(_KEYS)


def _shipped(name: str) -> Path:
    path = REWARD_ASSETS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped {name!r} reward model is missing at {path}; train it with "
            "`python -m t2i_rl.pretrain --stage rewards` (or pass a folder as 'path')")
    return path


def _learned_path(path: str) -> Path:
    """A learned model's folder: as given, else (a relative path not found here) under the assets."""
    given = Path(path).expanduser()
    under_assets = REWARD_ASSETS.parent / given
    return under_assets if not given.exists() and not given.is_absolute() and under_assets.exists() else given


def make_reward(spec, device: str = "cpu") -> RewardFunction:
    """A reward from a name ("clip", "lee", "pairwise", "gold") or a spec with a "name" key."""
    if isinstance(spec, RewardFunction):
        return spec.to(device)
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"a reward spec must be a name or a mapping with a 'name' key, got {spec!r}")
    if "name" not in spec:
        raise ValueError(f"reward spec {dict(spec)!r} has no 'name'; allowed names: {', '.join(_KEYS)}")
    name = spec["name"]
    if name not in _KEYS:
        raise ValueError(f"unknown reward {name!r}; allowed names: {', '.join(_KEYS)}")
    extra = sorted(set(spec) - _KEYS[name] - {"name"})
    if extra:
        allowed = sorted(_KEYS[name]) or "none"
        raise ValueError(f"unknown keys {extra} for reward {name!r}; allowed keys: {allowed}")

    if name in LEARNED:
        path = spec.get("path")
        return LEARNED[name].from_pretrained(_learned_path(path) if path else _shipped(name), device=device)
    if name in PRETRAINED:
        return PRETRAINED[name].from_pretrained(device=device, **{k: v for k, v in spec.items() if k != "name"})
    if name == "gold":
        return GoldReward()
    if name == "ensemble":
        members = spec.get("members")
        if isinstance(members, (str, Mapping)) or not isinstance(members, (list, tuple)) or not members:
            raise ValueError(f"an ensemble needs 'members': a non-empty list of reward specs, got {members!r}")
        return Ensemble([make_reward(m, device) for m in members], mode=spec.get("mode", "mean"),
                        lam=spec.get("lam", 0.5), weights=spec.get("weights"))
    if "base" not in spec:
        raise ValueError("textnorm needs 'base': the reward spec to normalize (a raw model or an ensemble)")
    tau = spec.get("tau")
    if tau is not None and not isinstance(tau, Mapping):
        positive_float(tau, "tau")  # fail before loading any model
    # "shapes" (ShapesWorld's grammar), "rules", {"name": "lm", ...} or {"name": "json", ...}:
    # built before the base model so that a bad spec fails before any model loads
    contrastive = make_contrastive(spec.get("contrastive"), device)  # None: DEFAULT_CONTRASTIVE
    return TextNorm(make_reward(spec["base"], device), contrastive=contrastive, tau=spec.get("tau"),
                    k=spec.get("k"), seed=spec.get("seed", 0))
