"""The reward protocol: `reward(images, prompts) -> RewardOutput(scores[B], components{name: [B]})`.

Images are float tensors [B, 3, H, W] in [0, 1] and stay differentiable where the model is (ReFL
and DRaFT backpropagate through the reward). A raw reward model also scores each image against
several prompts at once (`score_prompts`), which is what TextNorm needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..world.judge import check_images


@dataclass
class RewardOutput:
    """`scores` is what an agent optimizes; `components` holds every number behind it, by name
    (each raw model's score, TextNorm confidences, ...), all of shape [B]."""

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardFunction(ABC):
    """A reward as a plain callable on (images, prompts)."""

    name: str = "reward"
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_images(images, len(prompts))
        return self.forward(images, prompts)

    @abstractmethod
    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        ...

    def to(self, device: str | torch.device) -> "RewardFunction":
        return self


class RawReward(RewardFunction):
    """A reward model r(x, y) that can score one image against many prompts."""

    @abstractmethod
    def score_prompts(self, images: torch.Tensor, prompt_sets: list[list[str]]) -> torch.Tensor:
        """Scores [B, K]: image i against each of the K prompts of prompt_sets[i]."""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        scores = self.score_prompts(images, [[p] for p in prompts])[:, 0]
        return RewardOutput(scores, {f"rm/{self.name}": scores.detach()})


@torch.no_grad()
def score_images(reward: Callable, images: torch.Tensor, prompts: list[str], batch_size: int = 64,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """A reward's scores [N] of images [N, 3, H, W] against their prompts, in batches."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        result = reward(x, prompts[start:start + batch_size])
        scores = getattr(result, "scores", result)
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        if scores.shape[0] != x.shape[0]:
            raise ValueError(f"the reward returned {scores.shape[0]} scores for {x.shape[0]} images")
        if not torch.isfinite(scores).all():
            raise ValueError("the reward returned NaN or inf scores")
        out.append(scores.numpy().astype(np.float64))
    return np.concatenate(out)
