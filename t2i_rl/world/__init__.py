"""ShapesWorld: the embedded default world, in which the "human" is an exact judge.

>>> world = ShapesWorld()
>>> prompts = world.sample_prompts(4, seed=0, split="heldout")
>>> images = world.render(prompts, seed=0)            # [4, 3, 32, 32] in [0, 1]
>>> world.judge(images, prompts).correct.all()
tensor(True)
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .grammar import (
    ATTRIBUTES,
    BACKGROUND_COLORS,
    COUNT_WORDS,
    OBJECT_COLORS,
    SHAPES,
    ObjectGroup,
    Scene,
    contrastive_scenes,
    parse_prompt,
    sample_scenes,
    split_scenes,
)
from .judge import JudgeResult, Perception, SeenObject, judge_images, perceive, verdict
from .render import Layout, render_scenes

__all__ = [
    "ATTRIBUTES", "BACKGROUND_COLORS", "COUNT_WORDS", "OBJECT_COLORS", "SHAPES",
    "JudgeResult", "Layout", "ObjectGroup", "Perception", "Scene", "ShapesWorld",
    "parse_prompt", "perceive", "verdict",
]


class ShapesWorld:
    """Prompt grammar, renderer, judge and contrastive prompts of the embedded world.

    Args:
        resolution: image side in pixels. 32 keeps pretraining and RL within a CPU budget
            (a 16x16x4 latent); the judge works at any multiple of 8 from 32 up.
        two_object_prob: probability that a sampled prompt has two object groups.
    """

    def __init__(self, resolution: int = 32, two_object_prob: float = 0.3) -> None:
        if resolution < 32 or resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 32, got {resolution}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
        self.resolution = resolution
        self.two_object_prob = two_object_prob

    def sample_prompts(self, n: int, seed: int = 0, split: str = "train") -> list[str]:
        """`n` prompts drawn with replacement from a split ("train" or "heldout")."""
        return [s.text() for s in sample_scenes(n, seed, split, self.two_object_prob)]

    def prompts(self, split: str = "train") -> list[str]:
        """Every prompt of a split, in a fixed order."""
        single, double = split_scenes(split)
        return [s.text() for s in single + double]

    def render(self, prompts: list[str], seed: int | np.random.Generator = 0) -> torch.Tensor:
        """Ground-truth images [N, 3, H, W] in [0, 1] for the prompts."""
        return self.render_with_layouts(prompts, seed)[0]

    def render_with_layouts(
        self, prompts: list[str], seed: int | np.random.Generator = 0
    ) -> tuple[torch.Tensor, list[Layout]]:
        return render_scenes([parse_prompt(p) for p in prompts], self.resolution, seed)

    def judge(self, images: torch.Tensor, prompts: list[str]) -> JudgeResult:
        """Per-attribute verdicts, score in [0, 1] and all-correct for each image and prompt."""
        scenes = [parse_prompt(p) for p in prompts]
        return judge_images(images, scenes, self.resolution)

    def contrastive(self, prompt: str, k: int | None = None, seed: int = 0) -> list[str]:
        """Prompts that differ from `prompt` in one attribute: all of them, or `k` sampled."""
        alts = [s.text() for _, s in contrastive_scenes(parse_prompt(prompt))]
        if k is None or k >= len(alts):
            return alts
        if k < 0:
            raise ValueError(f"k must be >= 0 or None, got {k}")
        return random.Random(seed).sample(alts, k)

    @staticmethod
    def truth(layout: Layout) -> Perception:
        """What a perfect judge would see in a rendered image."""
        return Perception(
            layout.background,
            tuple(SeenObject(o.color, o.shape, o.size * o.size) for o in layout.objects),
        )
