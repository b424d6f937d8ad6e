"""An ImageReward-style preference reward model (Xu et al. 2023).

An MLP head on frozen ShapesCLIP features, trained on pairs of images of the same prompt with the
Bradley-Terry loss -log sigmoid(r(x_w, y) - r(x_l, y)). The pairs are base-model samples ranked
by ShapesWorld's judge score (the stand-in for human rankings); ties give no pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head import CLIPHeadReward


def bradley_terry_loss(r_win: torch.Tensor, r_lose: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_w - r_l)."""
    return -F.logsigmoid(r_win - r_lose).mean()


def preference_pairs(prompts: list[str], scores: torch.Tensor) -> torch.Tensor:
    """All (winner, loser) index pairs [P, 2] among images of the same prompt whose scores
    differ (ties are skipped), in a fixed order."""
    if len(prompts) != len(scores):
        raise ValueError(f"got {len(prompts)} prompts for {len(scores)} scores")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    s = scores.tolist()
    pairs = []
    for idx in groups.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if s[i] > s[j]:
                    pairs.append((i, j))
                elif s[j] > s[i]:
                    pairs.append((j, i))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


class PairwiseReward(CLIPHeadReward):
    """r(x, y): a preference score, only meaningful up to a constant per prompt (as ImageReward's).
    `default_tau` is 1, the scale of the Bradley-Terry model it was trained with."""

    name = "pairwise"
    kind = "pairwise"
