"""The exact judge of ShapesWorld: the gold reward that stands in for human raters.

Two halves, kept apart so that each can be checked on its own:

* `perceive(image)` reads any RGB image and says what is in it: the background colour and a list
  of objects (colour, shape), found as connected regions that differ from the background.
* `verdict(seen, prompt)` compares what is there with what the prompt asks for, attribute by
  attribute. The ground truth of a rendered image goes through the same `verdict`, so the judge's
  accuracy measures perception alone.

Attributes per object group of the prompt (count n, colour c, shape s):
  count: exactly n objects of colour c;  colour: objects of colour c exist and no object has a
  colour the prompt does not name;  shape: objects of colour c exist and all of them are s-shaped.
Plus the background. `score` is the fraction of these that hold; `correct` is all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .grammar import ATTRIBUTES, BACKGROUND_COLORS, OBJECT_COLORS, Scene

_BG_NAMES = list(BACKGROUND_COLORS)
_BG_RGB = np.array([BACKGROUND_COLORS[n] for n in _BG_NAMES])
_OBJ_NAMES = list(OBJECT_COLORS)
_OBJ_RGB = np.array([OBJECT_COLORS[n] for n in _OBJ_NAMES])

# Perception thresholds, at the world's 32x32 resolution (areas scale with the image).
FOREGROUND_DISTANCE = 0.22  # min RGB distance from the background colour, after 3x3 smoothing
MIN_OBJECT_AREA = 12.0  # pixels; smaller regions are specks, not objects
MAX_COLOR_DISTANCE = 0.40  # beyond this from every palette colour, a colour is "unknown"
TRIANGLE_MAX_SKEW = -0.19  # vertical skewness of coverage: triangles ~-0.4, others ~0
SQUARE_MAX_KURTOSIS_GAP = -0.16  # axis minus diagonal excess kurtosis: squares ~-0.4, disks ~0
SQRT2 = float(np.sqrt(2.0))


@dataclass(frozen=True)
class SeenObject:
    color: str | None  # None: a colour that is not in the palette
    shape: str | None  # None: a region without a readable shape
    area: float


@dataclass(frozen=True)
class Perception:
    """What the judge saw in one image."""

    background: str | None
    objects: tuple[SeenObject, ...]


@dataclass
class JudgeResult:
    """Per-image verdicts. `attributes[a][i]` holds when attribute `a` holds for every object
    group of prompt i; `groups[i]` has the per-group verdicts of two-object prompts."""

    score: torch.Tensor  # float [N] in [0, 1]
    correct: torch.Tensor  # bool [N]
    attributes: dict[str, torch.Tensor]  # name -> bool [N]
    groups: list[list[dict[str, bool]]] = field(default_factory=list)
    perceptions: list[Perception] = field(default_factory=list)


def verdict(seen: Perception, scene: Scene) -> tuple[list[dict[str, bool]], bool]:
    """Compare a perception (or a ground-truth layout) with a prompt's scene.

    Returns the per-group verdicts {count, color, shape} and the background verdict.
    """
    named = {g.color for g in scene.groups}
    stray = any(o.color not in named for o in seen.objects)
    groups = []
    for g in scene.groups:
        mine = [o for o in seen.objects if o.color == g.color]
        groups.append({
            "count": len(mine) == g.count,
            "color": bool(mine) and not stray,
            "shape": bool(mine) and all(o.shape == g.shape for o in mine),
        })
    return groups, seen.background == scene.background


def _nearest(rgb: np.ndarray, palette: np.ndarray, names: list[str]) -> str | None:
    d = np.linalg.norm(palette - rgb, axis=1)
    i = int(d.argmin())
    return names[i] if d[i] <= MAX_COLOR_DISTANCE else None


def _shape_of(soft: np.ndarray, bg: np.ndarray, region: np.ndarray, rgb: np.ndarray) -> str | None:
    """Tell circles, squares and upright triangles apart by moments of the region's coverage.

    Coverage is the Gaussian-smoothed image projected on the background -> object colour line.
    Blur and noise barely move these moments, where outlines and fill ratios fall apart at 32x32:
    an upright triangle's mass is skewed towards its base (vertical skewness about -0.57), and a
    square is flatter along its axes than along its diagonals (excess kurtosis -1.2 against -0.6)
    while a disk is the same in every direction. A region whose coverage has no positive spread
    (possible in images that are not renders) has no shape: None.
    """
    d = rgb - bg
    alpha = ((soft - bg) @ d) / max(float(d @ d), 1e-6) * ndimage.binary_dilation(region)
    yy, xx = np.indices(alpha.shape, dtype=float)
    mass = alpha.sum()
    y = yy - (alpha * yy).sum() / mass
    x = xx - (alpha * xx).sum() / mass

    def skew_and_kurtosis(p: np.ndarray) -> tuple[float, float]:
        var = (alpha * p * p).sum() / mass
        return (alpha * p**3).sum() / mass / var**1.5, (alpha * p**4).sum() / mass / var**2 - 3

    spreads = [(alpha * p * p).sum() for p in (x, y, x + y, x - y)]
    if mass <= 0 or min(spreads) <= 0:
        return None
    skew_y, kurt_y = skew_and_kurtosis(y)
    if skew_y < TRIANGLE_MAX_SKEW:
        return "triangle"
    axis = (kurt_y + skew_and_kurtosis(x)[1]) / 2
    diagonal = (skew_and_kurtosis((x + y) / SQRT2)[1] + skew_and_kurtosis((x - y) / SQRT2)[1]) / 2
    return "square" if axis - diagonal < SQUARE_MAX_KURTOSIS_GAP else "circle"


def perceive(image: np.ndarray) -> Perception:
    """Read one image [3, H, W] (float, [0, 1]) at the world's resolution."""
    h, w = image.shape[1:]
    scale = h * w / (32.0 * 32.0)
    pix = image.transpose(1, 2, 0)  # H, W, 3
    # 1. The background is the median colour of the one-pixel border.
    border = np.concatenate([pix[0], pix[-1], pix[1:-1, 0], pix[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, _BG_RGB, _BG_NAMES)
    # 2. Foreground: pixels that differ from the background after 3x3 smoothing (kills noise).
    smooth = ndimage.uniform_filter(pix, size=(3, 3, 1), mode="nearest")
    dist = np.linalg.norm(smooth - bg_rgb, axis=2)
    labels, n = ndimage.label(dist > FOREGROUND_DISTANCE)
    soft = ndimage.gaussian_filter(pix, sigma=(1, 1, 0), mode="nearest")
    objects = []
    for k in range(1, n + 1):
        region = labels == k
        area = float(region.sum())
        if area < MIN_OBJECT_AREA * scale:
            continue
        # 3. The colour of a region: the median of its most foreground half (edges are mixed).
        core = region & (dist >= np.median(dist[region]))
        rgb = np.median(pix[core], axis=0)
        shape = _shape_of(soft, bg_rgb, region, rgb)
        objects.append(SeenObject(_nearest(rgb, _OBJ_RGB, _OBJ_NAMES), shape, area))
    return Perception(background, tuple(objects))


def check_images(images: torch.Tensor, n_prompts: int | None = None) -> None:
    """Raise a ValueError that names what is wrong with an image batch."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    if n_prompts is not None and images.shape[0] != n_prompts:
        raise ValueError(f"got {images.shape[0]} images for {n_prompts} prompts")


def judge_images(images: torch.Tensor, scenes: list[Scene], resolution: int) -> JudgeResult:
    """Judge a batch of images against their prompts' scenes."""
    check_images(images, len(scenes))
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    arr = x.numpy()
    n = len(scenes)
    attrs = {a: torch.zeros(n, dtype=torch.bool) for a in ATTRIBUTES}
    score = torch.zeros(n)
    all_groups, seen_all = [], []
    for i, scene in enumerate(scenes):
        seen = perceive(arr[i])
        groups, bg_ok = verdict(seen, scene)
        for a in ("count", "color", "shape"):
            attrs[a][i] = all(g[a] for g in groups)
        attrs["background"][i] = bg_ok
        flags = [v for g in groups for v in g.values()] + [bg_ok]
        score[i] = sum(flags) / len(flags)
        all_groups.append(groups)
        seen_all.append(seen)
    correct = score == 1.0
    return JudgeResult(score, correct, attrs, all_groups, seen_all)
