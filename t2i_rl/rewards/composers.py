"""Compose rewards: `Ensemble` (mean, mean - lambda*std, min, weighted mean) and `TextNorm`.

TextNorm (Kim et al., ICLR 2024, "Confidence-aware Reward Optimization for Fine-tuning
Text-to-Image Models") turns a raw reward r(x, y) into a confidence that the image fits its prompt
better than semantically contrastive ones C(y):

    r_tn(x, y) = exp(r(x, y) / tau) / sum_{y' in {y} ∪ C(y)} exp(r(x, y') / tau)

computed with a log-softmax. An empty C(y) (no contrastive prompt applies) gives confidence 1
with zero gradient: nothing is compared against, so the prompt carries no signal rather than a
made-up one. For an ensemble of raw rewards each member is normalized with its
own tau, and the confidences are combined with the ensemble's mode (the paper's ensemble and
uncertainty-regularized ensemble).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral

import torch

from ._common import check_prompt_sets, pad_prompt_sets, positive_float
from .base import RawReward, RewardFunction, RewardOutput
from .contrastive import make_contrastive

ENSEMBLE_MODES = ("mean", "mean_minus_std", "min", "weighted")
_STD_FLOOR = 1e-12  # variance floor: keeps the gradient of std finite when members agree exactly


class Ensemble(RewardFunction):
    """Combine the scores of several rewards, all of shape [B].

    Modes: "mean"; "mean_minus_std": mean - lam * std (population std over members, the
    uncertainty-regularized ensemble of TextNorm); "min"; "weighted": sum_i w_i r_i with the
    weights normalized to sum to 1 (`weights`: a list in member order or a dict by member name).

    Components: every member's components, plus `rm/<member name>` (its score).
    """

    name = "ensemble"

    def __init__(
        self,
        members: Sequence[RewardFunction],
        mode: str = "mean",
        lam: float = 0.5,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        if isinstance(members, RewardFunction) or not isinstance(members, Sequence) or not members:
            raise ValueError(f"members must be a non-empty list of reward functions, got {members!r}")
        for m in members:
            if not isinstance(m, RewardFunction):
                raise ValueError(f"every member must be a RewardFunction, got {type(m).__name__}")
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"member names must be unique (their scores are logged by name), repeated: {dupes}")
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"unknown ensemble mode {mode!r}; allowed: {', '.join(ENSEMBLE_MODES)}")
        self.members = list(members)
        self.mode = mode
        self.lam = positive_float(lam, "lam", allow_zero=True)
        self.weights = self._check_weights(weights, names) if mode == "weighted" else None
        if mode != "weighted" and weights is not None:
            raise ValueError(f"weights are only used with mode='weighted', got mode={mode!r}")
        self.differentiable = all(m.differentiable for m in self.members)

    def _check_weights(self, weights, names: list[str]) -> torch.Tensor:
        if weights is None:
            raise ValueError("mode='weighted' needs weights: a list in member order or a dict by member name")
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            missing = [n for n in names if n not in weights]
            if unknown or missing:
                raise ValueError(f"weights must name exactly the members {names}; unknown: {unknown}, missing: {missing}")
            weights = [weights[n] for n in names]
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names):
            raise ValueError(f"weights must be {len(names)} numbers (one per member {names}), got {weights!r}")
        w = [positive_float(x, f"weight of {n!r}", allow_zero=True) for n, x in zip(names, weights)]
        if sum(w) <= 0:
            raise ValueError(f"weights must not all be 0, got {list(weights)}")
        return torch.tensor(w, dtype=torch.float64) / sum(w)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def combine(self, stack: torch.Tensor) -> torch.Tensor:
        """Combine member values [M, ...] into [...] with the ensemble's mode."""
        if self.mode == "mean":
            return stack.mean(0)
        if self.mode == "mean_minus_std":
            var = stack.var(0, correction=0)
            return stack.mean(0) - self.lam * var.clamp_min(_STD_FLOOR).sqrt()
        if self.mode == "min":
            return stack.min(0).values
        w = self.weights.to(stack.device, stack.dtype).view(-1, *[1] * (stack.ndim - 1))
        return (w * stack).sum(0)

    def to(self, device: str | torch.device) -> "Ensemble":
        for m in self.members:
            m.to(device)
        return self

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        outs = [m(images, prompts) for m in self.members]
        scores = [o.scores.to(images.device, torch.float32) for o in outs]
        components: dict[str, torch.Tensor] = {}
        for m, o, s in zip(self.members, outs, scores):
            components.update(o.components)
            components[f"rm/{m.name}"] = s.detach()
        return RewardOutput(self.combine(torch.stack(scores)), components)

    def score_prompts(self, images: torch.Tensor, prompt_sets: list[list[str]]) -> torch.Tensor:
        """The combined raw scores [B, K] (every member must be a RawReward)."""
        raw = [m for m in self.members if not isinstance(m, RawReward)]
        if raw:
            raise ValueError(f"score_prompts needs raw reward members; {raw[0].name!r} is not one")
        return self.combine(torch.stack([m.score_prompts(images, prompt_sets).float() for m in self.members]))


class TextNorm(RewardFunction):
    """Confidence-aware reward (TextNorm): the softmax of r / tau over the prompt and its
    contrastive prompts, at the prompt.

    Args:
        reward: a RawReward, or an Ensemble of RawRewards (each member is normalized with its
            own tau, then the confidences are combined with the ensemble's mode).
        contrastive: prompt -> list of contrastive prompts (default: `make_contrastive()`, ShapesWorld's;
            free-text generators in `t2i_rl.rewards.contrastive`). The prompt itself and repeats
            are dropped from what it returns; prompts may have different numbers of contrastive
            prompts (the padding is masked out), and none at all gives confidence 1.
        tau: temperature > 0: a float for every member, a dict by member name, or None for each
            model's `default_tau` (the temperature it was trained with; 1.0 if it has none).
        k: use k contrastive prompts per prompt, sampled once per prompt with `seed` (None: all).

    Components: `textnorm/confidence` (the score), and per raw model `rm/<name>` (its raw score of
    the prompt) and `textnorm/<name>` (its normalized score).
    """

    name = "textnorm"

    def __init__(
        self,
        reward: RewardFunction,
        contrastive: Callable[[str], list[str]] | None = None,
        tau: float | Mapping[str, float] | None = None,
        k: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(reward, Ensemble):
            bad = [m for m in reward.members if not isinstance(m, RawReward)]
            if bad:
                raise ValueError(
                    f"TextNorm needs raw reward models that score an image against several prompts; "
                    f"ensemble member {bad[0].name!r} ({type(bad[0]).__name__}) is not a RawReward")
            self.ensemble, self.members = reward, list(reward.members)
        elif isinstance(reward, RawReward):
            self.ensemble, self.members = None, [reward]
        else:
            raise ValueError(
                f"reward must be a RawReward or an Ensemble of RawRewards, got {type(reward).__name__} "
                f"({getattr(reward, 'name', '?')!r})")
        if contrastive is None:
            contrastive = make_contrastive()
        if not callable(contrastive):
            raise ValueError(f"contrastive must be a callable prompt -> list[str], got {contrastive!r}")
        if k is not None and (not isinstance(k, Integral) or isinstance(k, bool) or k < 0):
            raise ValueError(f"k must be an integer >= 0 or None (all contrastive prompts), got {k!r}")
        if not isinstance(seed, Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.reward = reward
        self.contrastive = contrastive
        self.k = None if k is None else int(k)
        self.seed = int(seed)
        self.taus = self._check_tau(tau)
        self.differentiable = reward.differentiable
        self._sets: dict[str, list[str]] = {}

    def _check_tau(self, tau) -> dict[str, float]:
        names = [m.name for m in self.members]
        defaults = {m.name: float(getattr(m, "default_tau", 1.0)) for m in self.members}
        if tau is None:
            return defaults
        if isinstance(tau, Mapping):
            unknown = sorted(set(tau) - set(names))
            if unknown:
                raise ValueError(f"tau names unknown reward models {unknown}; allowed: {names}")
            return {n: positive_float(tau[n], f"tau[{n!r}]") if n in tau else defaults[n] for n in names}
        t = positive_float(tau, "tau")
        return {n: t for n in names}

    def to(self, device: str | torch.device) -> "TextNorm":
        self.reward.to(device)
        return self

    def contrastive_prompts(self, prompt: str) -> list[str]:
        """The contrastive prompts C(prompt) used for `prompt` (fixed per prompt and seed)."""
        if prompt not in self._sets:
            alts = self.contrastive(prompt)
            if isinstance(alts, str) or not all(isinstance(a, str) for a in alts):
                raise ValueError(f"contrastive({prompt!r}) must return a list of strings, got {alts!r}")
            alts = [a for a in dict.fromkeys(alts) if a != prompt]
            if self.k is not None and self.k < len(alts):
                alts = random.Random(self.seed).sample(alts, self.k)
            if len(self._sets) >= 65536:
                self._sets.clear()
            self._sets[prompt] = alts
        return self._sets[prompt]

    def normalized(self, images: torch.Tensor, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per member: (its normalized score [B], its raw score of the prompt [B])."""
        sets, mask = pad_prompt_sets([[p] + self.contrastive_prompts(p) for p in prompts])
        check_prompt_sets(images, sets)
        conf, raw = {}, {}
        for m in self.members:
            scores = m.score_prompts(images, sets)  # [B, K]
            logits = (scores / self.taus[m.name]).masked_fill(~mask.to(scores.device), float("-inf"))
            conf[m.name] = torch.log_softmax(logits, dim=1)[:, 0].exp()
            raw[m.name] = scores[:, 0]
        return conf, raw

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        conf, raw = self.normalized(images, list(prompts))
        if self.ensemble is None:
            score = conf[self.members[0].name]
        else:
            score = self.ensemble.combine(torch.stack([conf[m.name].float() for m in self.members]))
        components = {"textnorm/confidence": score.detach()}
        for name in conf:
            components[f"rm/{name}"] = raw[name].detach()
            components[f"textnorm/{name}"] = conf[name].detach()
        return RewardOutput(score, components)
