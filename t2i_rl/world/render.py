"""Ground-truth renderer of ShapesWorld scenes: anti-aliased shapes at random sizes and positions.

All objects of a batch are rasterized at once (supersampled coverage masks), so rendering keeps
up with pretraining instead of becoming its bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, Scene

SUPERSAMPLE = 4
COLOR_JITTER = 0.04


@dataclass(frozen=True)
class PlacedObject:
    """An object as drawn: shape, colour name, top-left corner and side, in pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Layout:
    """Where everything went in one image; the exact truth the judge is measured against."""

    background: str
    objects: tuple[PlacedObject, ...]


def layout_params(resolution: int) -> tuple[float, float, float, float]:
    """(min side, max side, gap between bounding boxes, border margin) in pixels at a resolution."""
    s = resolution / 32.0
    return 8.0 * s, 12.0 * s, 4.0 * s, 1.0 * s


def sample_layout(scene: Scene, resolution: int, rng: np.random.Generator) -> Layout:
    """Place every object of `scene` at a random size and position, apart from each other."""
    lo, hi, gap, margin = layout_params(resolution)
    kinds = [(g.shape, g.color) for g in scene.groups for _ in range(g.count)]
    for attempt in range(100):
        # Shrink the size range when a crowded scene does not fit.
        top = max(lo, hi - attempt * 0.25)
        placed: list[PlacedObject] = []
        for shape, color in kinds:
            for _ in range(50):
                size = float(rng.uniform(lo, top))
                x = float(rng.uniform(margin, resolution - margin - size))
                y = float(rng.uniform(margin, resolution - margin - size))
                if all(
                    x + size + gap <= p.x or p.x + p.size + gap <= x
                    or y + size + gap <= p.y or p.y + p.size + gap <= y
                    for p in placed
                ):
                    placed.append(PlacedObject(shape, color, x, y, size))
                    break
            else:
                break
        if len(placed) == len(kinds):
            return Layout(scene.background, tuple(placed))
    raise RuntimeError(f"could not place {len(kinds)} objects in a {resolution}x{resolution} image")


def _coverage(objs: list[PlacedObject], resolution: int) -> torch.Tensor:
    """Fraction of each pixel covered by each object: [M, H, W]."""
    k = SUPERSAMPLE
    coords = (torch.arange(resolution * k, dtype=torch.float32) + 0.5) / k
    v = coords.view(1, -1, 1)  # rows (y)
    u = coords.view(1, 1, -1)  # columns (x)
    x = torch.tensor([o.x for o in objs]).view(-1, 1, 1)
    y = torch.tensor([o.y for o in objs]).view(-1, 1, 1)
    s = torch.tensor([o.size for o in objs]).view(-1, 1, 1)
    kind = torch.tensor([SHAPES.index(o.shape) for o in objs]).view(-1, 1, 1)
    inside_box = (u >= x) & (u < x + s) & (v >= y) & (v < y + s)
    cx, cy = x + s / 2, y + s / 2
    circle = (u - cx) ** 2 + (v - cy) ** 2 <= (s / 2) ** 2
    triangle = inside_box & ((u - cx).abs() <= (v - y) / 2)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, inside_box, triangle))
    return F.avg_pool2d(mask.float().unsqueeze(1), k).squeeze(1)


def _jittered(rgb: tuple[float, float, float], rng: np.random.Generator) -> torch.Tensor:
    c = np.asarray(rgb) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3)
    return torch.tensor(np.clip(c, 0.0, 1.0), dtype=torch.float32)


def draw_layouts(layouts: list[Layout], resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """Rasterize layouts into float images [N, 3, H, W] in [0, 1]."""
    images = torch.stack(
        [_jittered(BACKGROUND_COLORS[lay.background], rng) for lay in layouts]
    ).view(-1, 3, 1, 1).expand(-1, 3, resolution, resolution).clone()
    objs = [(i, o) for i, lay in enumerate(layouts) for o in lay.objects]
    if not objs:
        return images
    alpha = _coverage([o for _, o in objs], resolution)  # [M, H, W]
    colors = torch.stack([_jittered(OBJECT_COLORS[o.color], rng) for _, o in objs])  # [M, 3]
    for (i, _), a, c in zip(objs, alpha, colors):
        images[i] = images[i] * (1 - a) + c.view(3, 1, 1) * a
    return images


def render_scenes(
    scenes: list[Scene], resolution: int, seed: int | np.random.Generator
) -> tuple[torch.Tensor, list[Layout]]:
    """Render scenes; return the images and the layouts that produced them."""
    rng = np.random.default_rng(seed)
    layouts = [sample_layout(s, resolution, rng) for s in scenes]
    return draw_layouts(layouts, resolution, rng), layouts
