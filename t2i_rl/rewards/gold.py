"""The gold reward: ShapesWorld's exact judge, the stand-in for human raters.

For diagnostics only: it measures what the proxy rewards are meant to approximate and is NEVER an
optimization target (optimizing it would remove the very gap between proxy and truth that the
package studies). Not differentiable.
"""

from __future__ import annotations

import torch

from ..world import ATTRIBUTES, ShapesWorld
from .base import RewardFunction, RewardOutput


class GoldReward(RewardFunction):
    """Diagnostics only, never an optimization target: scores = the judge's score in [0, 1] (the
    fraction of the prompt's attributes that hold).

    Components: `gold/score`, `gold/correct` (1.0 when every attribute surely holds, else 0.0),
    `gold/unsure` (1.0 when the judge hesitates on some attribute and finds none surely wrong:
    `gold/correct` is then no verdict, and rates leave the image out) and `gold/<attribute>` (0/1) for each of count, color,
    shape and background.
    """

    name = "gold"
    differentiable = False

    def __init__(self, world: ShapesWorld | None = None) -> None:
        if world is not None and not isinstance(world, ShapesWorld):
            raise ValueError(f"world must be a ShapesWorld or None, got {type(world).__name__}")
        self.world = world or ShapesWorld()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        result = self.world.judge(images, list(prompts))
        device = images.device  # the judge runs on the CPU; results go back to the images' device
        score = result.score.float().to(device)
        components = {"gold/score": score, "gold/correct": result.correct.float().to(device),
                      "gold/unsure": (~result.sure).float().to(device)}
        for a in ATTRIBUTES:
            components[f"gold/{a}"] = result.attributes[a].float().to(device)
        return RewardOutput(score, components)
