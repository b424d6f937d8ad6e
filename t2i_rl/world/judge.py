"""The exact judge of ShapesWorld: the gold reward that stands in for human raters.

Two halves, kept apart so that each can be checked on its own:

* `perceive(image)` reads any RGB image and says what is in it, as a careful person would: the
  background colour and a list of objects (colour, shape), and where it hesitates.
* `verdict(seen, prompt)` compares what is there with what the prompt asks for, attribute by
  attribute. The ground truth of a rendered image goes through the same `verdict`, so the judge's
  accuracy measures perception alone.

Attributes per object group of the prompt (count n, colour c, shape s):
  count: exactly n objects of colour c;  colour: objects of colour c exist and no object has a
  colour the prompt does not name;  shape: objects of colour c exist and all of them are s-shaped.
Plus the background. Each verdict is True, False or None: None is "unsure", where a person would
hesitate too (a background between two colour names, a shape between a circle and an ellipse, an
object barely visible). `correct` is every attribute surely right; rates are taken over the images
the judge is sure about (every attribute sure, or one surely wrong: a person rejects those whatever
else they hesitate on), and the unsure share is reported beside them. `score` is the fraction of
attributes that hold, an unsure one counting one half.

How it reads an image (32x32; larger images are reduced to it):
1. The background: the median colour of the border, named by its CIELAB distance to the palette.
   The local background is the masked median of 15x15 windows, so gradients and smooth blotches are
   background, not objects.
2. Objects: pixels far from the local background, split by colour (each pixel is unmixed into
   background + alpha x object colour, and takes the palette colour most of its 3x3 neighbourhood
   is explained best by). An object's colour is named from its core's lightness and from its
   chroma summed over it and a 2 px ring, per unit of its lightness: JPEG smears colour but keeps
   its sum, so a small object's colour is read as a person reads it through the smear.
3. Counting: a region of one colour is as many objects as its distance transform has separate peaks,
   so touching and overlapping objects count as a person counts them.
4. Shape, from rotation-invariant moments of the object's coverage (read from lightness where its
   outline is sharper there, as JPEG keeps it): a triangle (any orientation) has third-order
   moments, a square (any rotation) a fourth harmonic, a circle neither; elongation over 4:3 is
   neither a circle nor a square. Where the moments hesitate (small hard-edged objects, whose
   pixels make a square look rounder or longer than it is), and for an object cut by the border,
   each shape is fitted instead, both sides blurred alike, and the better fit decides. An outline
   blurred past 0.8 px (JPEG's colour-only edges) is fitted at its own blur: unsure where the blur
   leaves the shapes alike, as it leaves a person.
5. Faint objects (contrast from 10% of the way to a palette colour) are objects of no palette
   colour, unless their colour has no lightness to go with it: that is JPEG's smeared or ringing
   chroma beside an object, not an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, optimize
from scipy.special import erf

from .grammar import ATTRIBUTES, BACKGROUND_COLORS, OBJECT_COLORS, Scene

_BG_NAMES = list(BACKGROUND_COLORS)
_OBJ_NAMES = list(OBJECT_COLORS)
_OBJ_RGB = np.array([OBJECT_COLORS[n] for n in _OBJ_NAMES])

# Perception thresholds, at the world's 32x32 resolution (areas scale with the image).
FOREGROUND_DISTANCE = 0.22  # RGB distance from the local background, after 3x3 smoothing
MIN_OBJECT_AREA = 8.0  # pixels; smaller regions are specks, not objects
BACKGROUND_SURE_DELTA_E = 14.0  # CIELAB distance to a palette background: sure within this,
BACKGROUND_MAX_DELTA_E = 20.0  # unsure up to this, and beyond it a colour that has no name here
COLOR_SURE_RESIDUAL = 0.20  # what unmixing with a palette colour leaves unexplained: sure within,
MAX_COLOR_RESIDUAL = 0.30  # unsure up to this, and beyond it a colour that is not in the palette
COLOR_MIN_ALPHA = (0.45, 0.60)  # alpha of the core towards its colour: no palette colour below, unsure
COLOR_MARGIN = 1.3  # the second-best colour must explain the core this much worse to be sure
FAINT_DISTANCE = 0.035  # smoothed distance from the background above its noise: faint objects
FAINT_CONTRAST = (0.06, 0.10)  # alpha towards a palette colour: unsure from, sure from
FAINT_MIN_AREA = 16.0
TEXTURE_ASPECT = 3.0  # a faint region longer than this (a stripe) is texture, not an object
SPLIT_PROMINENCE = (0.6, 1.0)  # px of distance-transform peak over its saddle: unsure from, sure from
TRIANGLE_MOMENT = (0.30, 0.50)  # third-order moment: unsure from, triangle from (0.75 vs < 0.08)
ROUND_ASPECT = (1.18, 1.33)  # elongation: unsure from, "not a circle or a square" from (4:3)
SQUARE_MOMENT = (0.30, 0.42)  # fourth harmonic: circle below, square above (0.58 vs < 0.06)
FIT_MAX_ERROR = 0.25  # relative squared error of an object's best shape fit
FIT_MARGIN = 1.4  # the best fit must beat the second shape by this factor to be sure
FIT_BLUR = 0.6  # px: the Gaussian both sides of a fit are compared under
FIT_ROTATIONS = 8  # rotations tried per period before a fit's search starts ...
FIT_SEARCHES = 2  # ... from the best this many of them
EDGE_BLUR = 0.8  # px: outlines more blurred than this are read by fits at their blur
# JPEG (4:2:0) keeps lightness at full resolution and stores colour at half, coarsely quantized
_LUMA = np.array([0.299, 0.587, 0.114])  # Y' of BT.601, JPEG's lightness
LUMA_CONTRAST = 0.2  # above this luma difference from the background, outlines are read from luma,
LUMA_MIN_CONTRAST = 0.08  # and from this one, where luma's outline is the sharper
CHROMA_SPREAD = 2  # px around an object over which its colour's chroma is gathered
CHROMA_MIN_LUMA = 0.10  # core luma difference from which chroma is read per unit of lightness
GHOST_LIGHTNESS = 0.7  # a faint region with less lightness than this share of its colour's is smear
EDGE_SHARPNESS = 0.5  # share of two parts' colour difference their border must show to be an edge
GHOST_AREA = 24.0  # px: a faint region this small whose colour has no lightness of its own is ringing


@dataclass(frozen=True)
class SeenObject:
    color: str | None  # None: a colour that is not in the palette (or too faint to be one)
    shape: str | None  # None: a region that is not a circle, a square or a triangle
    area: float
    unsure: frozenset[str] = frozenset()  # of "exists", "color", "shape"


@dataclass(frozen=True)
class Perception:
    """What the judge saw in one image."""

    background: str | None
    objects: tuple[SeenObject, ...]
    background_unsure: bool = False


Verdict = bool | None  # None: unsure


@dataclass
class JudgeResult:
    """Per-image verdicts. `attributes[a][i]` holds when attribute `a` surely holds for every object
    group of prompt i, `unsure[a][i]` when it may but the judge cannot tell; `groups[i]` has the
    per-group verdicts (True, False or None)."""

    score: torch.Tensor  # float [N] in [0, 1]
    correct: torch.Tensor  # bool [N]: every attribute surely right
    attributes: dict[str, torch.Tensor]  # name -> bool [N]
    unsure: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool [N]
    groups: list[list[dict[str, Verdict]]] = field(default_factory=list)
    perceptions: list[Perception] = field(default_factory=list)

    @property
    def sure(self) -> torch.Tensor:
        """bool [N]: `correct` is a verdict a rate may count: no attribute is unsure (surely right or
        surely wrong), or some attribute is surely wrong (a person rejects the image whatever the
        attribute they hesitate on)."""
        unsure = torch.stack([self.unsure[a] for a in self.attributes]).any(0)
        surely_wrong = torch.stack([~self.attributes[a] & ~self.unsure[a] for a in self.attributes]).any(0)
        return ~unsure | surely_wrong


def _three_valued(sure_true: bool, sure_false: bool) -> Verdict:
    return False if sure_false else (True if sure_true else None)


def verdict(seen: Perception, scene: Scene) -> tuple[list[dict[str, Verdict]], Verdict]:
    """Compare a perception (or a ground-truth layout) with a prompt's scene.

    Returns the per-group verdicts {count, color, shape} and the background verdict, each True,
    False or None (unsure).
    """
    named = {g.color for g in scene.groups}
    present = [o for o in seen.objects if "exists" not in o.unsure]

    def sure_color(o: SeenObject) -> bool:
        return "color" not in o.unsure

    stray_sure = any(sure_color(o) and o.color not in named for o in present)
    stray_maybe = any(not sure_color(o) or o.color not in named for o in seen.objects)
    groups = []
    for g in scene.groups:
        mine = [o for o in present if o.color == g.color and sure_color(o)]
        # objects that might be of this colour: unsure colour, or unsure existence
        possible = [o for o in seen.objects if o.color == g.color and o not in mine]
        shapes_wrong = any(o.shape != g.shape and "shape" not in o.unsure for o in mine)
        # sure only if the objects that may also be of this colour would not change it either
        shapes_sure = all(o.shape == g.shape and "shape" not in o.unsure for o in mine + possible)
        groups.append({
            "count": _three_valued(len(mine) == g.count and not possible,
                                   len(mine) > g.count or len(mine) + len(possible) < g.count),
            "color": _three_valued(bool(mine) and not stray_maybe, stray_sure or not (mine or possible)),
            "shape": _three_valued(bool(mine) and shapes_sure,
                                   shapes_wrong or not (mine or possible)),
        })
    if seen.background != scene.background:
        return groups, False
    return groups, None if seen.background_unsure else True


# -- 1. colours --------------------------------------------------------------------------------


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB [..., 3] in [0, 1] -> CIELAB (D65): distances there follow what a person names apart."""
    rgb = np.clip(rgb, 0.0, 1.0)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_BG_LAB = _lab(np.array([BACKGROUND_COLORS[n] for n in _BG_NAMES]))


def _name_background(rgb: np.ndarray) -> tuple[str | None, bool]:
    d = np.linalg.norm(_BG_LAB - _lab(rgb), axis=1)
    i = int(d.argmin())
    if d[i] > BACKGROUND_MAX_DELTA_E:
        return None, False
    return _BG_NAMES[i], bool(d[i] > BACKGROUND_SURE_DELTA_E)


def _name_object_color(pix: np.ndarray, bg: np.ndarray) -> tuple[str | None, bool]:
    """Name the colour of an object's core pixels [M, 3] over their local background [M, 3]: the
    palette colour that best explains them as background + alpha x colour. Explaining mixed edge,
    JPEG-bled and jittered pixels by unmixing is what a person does when naming a colour; a colour
    that needs alpha well under 1 (pink is red at alpha 0.3 on white) is not that palette colour."""
    alpha, resid = _unmix(pix[None], bg[None], _OBJ_RGB)
    alpha, resid = np.median(alpha[0], axis=0), np.median(resid[0], axis=0)
    first, second = np.argsort(resid)[:2]
    if alpha[first] < COLOR_MIN_ALPHA[0] or resid[first] > MAX_COLOR_RESIDUAL:
        return None, False
    unsure = (alpha[first] < COLOR_MIN_ALPHA[1] or resid[first] > COLOR_SURE_RESIDUAL
              or resid[second] < COLOR_MARGIN * resid[first])
    return _OBJ_NAMES[int(first)], bool(unsure)


def _unmix(pix: np.ndarray, bg: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel as background + alpha x (colour - background), for every colour [K, 3]:
    (alpha [..., K] clipped to [0, 1], residual distance [..., K])."""
    d = colors[None, None] - bg[..., None, :]  # H, W, K, 3
    diff = (pix - bg)[..., None, :]
    alpha = np.clip((diff * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6), 0.0, 1.0)
    resid = np.linalg.norm(diff - alpha[..., None] * d, axis=-1)
    return alpha, resid


def _background_field(pix: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The local background: the median of the unmasked pixels of a 15x15 window, on a grid every
    4 px, interpolated. A median ignores a faint object inside the window; a gradient or a smooth
    blotch moves it."""
    h, w = mask.shape
    if (~mask).sum() < 20:
        return np.broadcast_to(fallback, pix.shape)
    off = np.where(mask[..., None], 0.0, pix - fallback)
    quadrants = off.reshape(2, h // 2, 2, w // 2, 3).sum((1, 3)) / np.maximum(
        (~mask).reshape(2, h // 2, 2, w // 2).sum((1, 3)), 1)[..., None]
    if np.abs(quadrants).max() < 0.015:
        return np.broadcast_to(fallback, pix.shape)  # no quadrant leans away: a uniform background
    free = np.pad(np.where(mask[..., None], np.nan, pix), ((7, 7), (7, 7), (0, 0)), constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(free, (15, 15), axis=(0, 1))[2::4, 2::4]
    flat = np.sort(windows.reshape(*windows.shape[:3], -1), axis=-1)  # masked (NaN) pixels sort last
    counts = np.isfinite(flat[..., 0, :]).sum(-1)
    middle = np.broadcast_to(((np.maximum(counts, 1) - 1) // 2)[:, :, None, None], (*flat.shape[:3], 1))
    grid = np.take_along_axis(flat, middle, axis=-1)[..., 0]  # the median of the unmasked pixels
    grid[counts < 20] = fallback
    if np.abs(grid - fallback).max() < 0.02:
        return np.broadcast_to(fallback, pix.shape)  # a uniform background: nothing to follow
    yy = np.clip((np.arange(h) - 2) / 4, 0, grid.shape[0] - 1)
    xx = np.clip((np.arange(w) - 2) / 4, 0, grid.shape[1] - 1)
    coords = np.meshgrid(yy, xx, indexing="ij")
    return np.stack([ndimage.map_coordinates(grid[..., c], coords, order=1, mode="nearest")
                     for c in range(3)], -1)


# -- 3. counting -------------------------------------------------------------------------------

UPSAMPLE = 2


def _peaks(alpha: np.ndarray) -> tuple[list[np.ndarray], bool]:
    """Split one colour's coverage into objects at the separate peaks of its distance transform.

    Returns one boolean mask per object (at the input resolution) and whether the count is sure
    (no peak whose prominence lies in the unsure band)."""
    up = ndimage.zoom(alpha, UPSAMPLE, order=1, grid_mode=True, mode="grid-constant")
    inside = np.pad(up >= 0.5, 1)
    dt = ndimage.distance_transform_edt(inside) / UPSAMPLE
    unsure_h, sure_h = SPLIT_PROMINENCE
    best: tuple[int, np.ndarray | None] = (1, None)
    unsure = False
    for t in np.arange(0.4, dt.max() - unsure_h, 0.4):
        labels, n = ndimage.label(dt > t)
        if n < 2:
            continue
        heights = ndimage.maximum(dt, labels, np.arange(1, n + 1)) - t
        sure = [k + 1 for k, h in enumerate(heights) if h >= sure_h]
        maybe = [k + 1 for k, h in enumerate(heights) if unsure_h <= h < sure_h]
        if len(sure) > best[0]:
            best = (len(sure), np.isin(labels, sure) * labels)
        if len(sure) + len(maybe) > max(best[0], len(sure)) and len(sure) + len(maybe) >= 2:
            unsure = True
    if best[1] is None:
        return [alpha > 0], not unsure
    # every pixel goes to the nearest peak region
    seeds = best[1]
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix][1:-1, 1:-1]
    owner = owner[UPSAMPLE // 2::UPSAMPLE, UPSAMPLE // 2::UPSAMPLE]
    parts = [(owner == k) & (alpha > 0) for k in np.unique(seeds[seeds > 0])]
    return [p for p in parts if p.any()], not unsure


# -- 4. shape ----------------------------------------------------------------------------------


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """(elongation, third-order, fourth-harmonic) of a coverage map; each rotation invariant and
    scale free: 1 / 0 / 0 for a disk; 1 / 0 / 0.58 for a square; ~1.15 / 0.75 / ~0.05 for a triangle."""
    yy, xx = np.indices(alpha.shape, dtype=float)
    mass = alpha.sum()
    z = (xx - (alpha * xx).sum() / mass) + 1j * (yy - (alpha * yy).sum() / mass)
    c11 = (alpha * np.abs(z) ** 2).sum()
    c20 = (alpha * z**2).sum()
    c21 = (alpha * z * np.abs(z) ** 2).sum()
    c30 = (alpha * z**3).sum()
    c40 = (alpha * z**4).sum()
    e = min(abs(c20) / max(c11, 1e-9), 1 - 1e-9)  # (l1 - l2) / (l1 + l2) of the covariance
    elongation = float(np.sqrt((1 + e) / (1 - e)))
    third = float(np.sqrt(abs(c30) ** 2 + abs(c21) ** 2) / c11**1.5 * np.sqrt(mass))
    fourth = float(abs(c40) / c11**2 * mass)
    return elongation, third, fourth


def _shape_by_moments(alpha: np.ndarray) -> tuple[str | None, bool]:
    """(shape or None, unsure)."""
    elongation, third, fourth = _moments(alpha)
    if third >= TRIANGLE_MOMENT[1]:
        return "triangle", False
    unsure = third >= TRIANGLE_MOMENT[0]
    if elongation >= ROUND_ASPECT[1]:
        return None, unsure
    unsure |= elongation >= ROUND_ASPECT[0]
    low, high = SQUARE_MOMENT
    unsure |= low < fourth < high
    return ("square" if fourth >= (low + high) / 2 else "circle"), unsure


# a pixel's box and the fit's blur, as one Gaussian edge: sqrt(1/12 + FIT_BLUR^2) px
_EDGE_SIGMA = float(np.sqrt(1 / 12 + FIT_BLUR**2))


def _template(shape: str, cx: float, cy: float, size: float, rot: float, h: int, w: int,
              sigma: float = _EDGE_SIGMA) -> np.ndarray:
    """Blurred coverage [h, w] of a shape of side (or diameter) `size` centred at (cx, cy), rotated
    by `rot`, at the pixel centres. A Gaussian blur of a square is exactly the product of its two
    sides' edge profiles; a triangle is approximated by the product of its three, a circle by an
    edge across its radius."""
    y, x = np.indices((h, w), dtype=float) + 0.5
    c, s = np.cos(rot), np.sin(rot)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    r = size / 2

    def edge(d: np.ndarray) -> np.ndarray:  # share of a blurred half-plane at signed distance d inside
        return 0.5 * (1 + erf(d / (np.sqrt(2) * sigma)))

    if shape == "circle":
        return edge(r - np.hypot(u, v) - sigma**2 / (2 * r))  # a curved edge blurs inwards
    if shape == "square":
        return (edge(r - u) - edge(-r - u)) * (edge(r - v) - edge(-r - v))
    # isosceles triangle, base = height = size, centroid at (cx, cy), apex towards -v; the slanted
    # sides' inward normals are (-+2, 1) / sqrt(5)
    k = 1 / np.sqrt(5)
    return edge(size / 3 - v) * edge(k * (2 * size / 3 + v - 2 * u)) * edge(k * (2 * size / 3 + v + 2 * u))


def _shape_by_fit(alpha: np.ndarray, sigma: float = _EDGE_SIGMA) -> tuple[str | None, bool]:
    """Fit each shape (its centre may lie outside the frame, for a border-cut object) to what is
    visible, both blurred a little so that hard and anti-aliased edges compare alike; the better
    fit decides, unsure when the two best are close."""
    h, w = alpha.shape
    yy, xx = np.indices(alpha.shape, dtype=float)
    mass = alpha.sum()
    cy, cx = (alpha * yy).sum() / mass, (alpha * xx).sum() / mass
    soft = ndimage.gaussian_filter(alpha, FIT_BLUR, mode="nearest")
    norm = float((soft**2).sum())

    def error(shape: str, p: np.ndarray) -> float:
        return float(((_template(shape, p[0], p[1], max(p[2], 2.0), p[3], h, w, sigma) - soft) ** 2).sum())

    errors = {}
    # a square repeats every 90 degrees, a triangle every 120: the rotations on a grid over that
    # period that fit best start the search, which from one fixed start ends in a local minimum
    for shape, period in (("circle", 0.0), ("square", np.pi / 2), ("triangle", 2 * np.pi / 3)):
        starts = [np.array([cx, cy, max(np.sqrt(mass) * 1.1, 4.0), rot])
                  for rot in (np.arange(FIT_ROTATIONS) * period / FIT_ROTATIONS if period else [0.0])]
        starts = sorted(starts, key=lambda p: error(shape, p))[:FIT_SEARCHES]
        errors[shape] = min(optimize.minimize(lambda p: error(shape, p), start, method="Nelder-Mead",
                                              options={"xatol": 0.1, "fatol": 1e-3, "maxiter": 160}).fun
                            for start in starts) / norm
    order = sorted(errors, key=errors.get)
    first, second = order[0], order[1]
    if errors[first] > FIT_MAX_ERROR:
        return None, True
    return first, errors[second] < FIT_MARGIN * errors[first]


def _edge_blur(coverage: np.ndarray) -> float:
    """The Gaussian sigma (px) of an object's outline, from its coverage: across an edge blurred by
    sigma, 4a(1 - a) sums to 4 sigma / sqrt(pi) per unit of outline length, and |grad a| sums to
    the length. Hard edges give 0, anti-aliased ones ~0.25 (a pixel's box), JPEG's colour-only
    outlines (chroma at half resolution) 0.8 and more."""
    gy, gx = np.gradient(coverage)
    length = float(np.hypot(gy, gx).sum())
    return float((4 * coverage * (1 - coverage)).sum()) * np.sqrt(np.pi) / 4 / max(length, 1e-9)


def _shape_of(alpha: np.ndarray, coverage: np.ndarray, touches_border: bool) -> tuple[str | None, bool]:
    """Moments decide; where they hesitate short of 4:3 (a small rotated square with hard edges is
    nearly round, a 6 px one drawn 6 x 7 px looks longer) and for border-cut objects, fitting each
    shape decides. An outline blurred past EDGE_BLUR has lost the corners the moments read, so
    each shape is fitted to the unsharpened `coverage` at that blur: a large blurred square still
    fits a square best, a small one fits all shapes alike and is unsure, as for a person."""
    blur = _edge_blur(coverage)
    if blur >= EDGE_BLUR:
        return _shape_by_fit(coverage, float(np.hypot(blur, FIT_BLUR)))
    if touches_border:
        return _shape_by_fit(alpha)
    shape, unsure = _shape_by_moments(alpha)
    if unsure and _moments(alpha)[0] < ROUND_ASPECT[1]:
        return _shape_by_fit(alpha)
    return shape, unsure


# -- the whole reading -------------------------------------------------------------------------


def _color_parts(pix: np.ndarray, field_rgb: np.ndarray, region: np.ndarray, others: np.ndarray,
                 min_area: float) -> list[np.ndarray]:
    """Split a foreground region by colour (touching objects of two colours): each pixel takes the
    palette colour whose unmixing explains it best, and parts too small to be objects (mixed
    edges) join their largest neighbour, and parts of one colour are one part (two squares of one
    colour that a third object joins), whose objects `_peaks` then counts. The split stands only if
    every part's colour surely has a name and the colour changes at an edge between them
    (`_gradual`); a blob of mixed or shading colour stays one object whose colour the judge names."""
    alpha, resid = _unmix(pix, field_rgb, _OBJ_RGB)
    best = resid.argmin(-1)
    solid = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= 0.5  # not a mixed edge
    # each pixel takes the colour most of its 3x3 neighbourhood takes: JPEG flips single 2x2
    # chroma cells between neighbouring hues (orange and yellow), which are not objects
    votes = np.stack([ndimage.uniform_filter(((best == k) & region & solid).astype(float), 3, mode="constant")
                      for k in range(len(_OBJ_RGB))], -1)
    best = votes.argmax(-1)
    label = np.where(region & solid, best + 1, 0)
    parts = []
    for k in np.unique(label[label > 0]):
        comps, n = ndimage.label(label == k)
        parts += [comps == i for i in range(1, n + 1)]
    big = [p for p in parts if p.sum() >= min_area]
    if len(big) < 2:
        return [region]
    owner = np.zeros(region.shape, dtype=int)
    for i, p in enumerate(big, start=1):
        owner[p] = i
    _, (iy, ix) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest = owner[iy, ix]
    split = [region & (nearest == i) for i in range(1, len(big) + 1)]
    names = [_name_object_color(*_object_color(pix, field_rgb, p, p & solid, ~others & ~(region & ~p)))
             for p in split]
    if any(name is None or unsure for name, unsure in names):
        return [region]
    # parts of one colour are one part: `_peaks` counts the objects within it
    by_name: dict[str, np.ndarray] = {}
    for p, (name, _) in zip(split, names):
        by_name[name] = by_name.get(name, np.zeros_like(p)) | p
    split = list(by_name.values())
    if len(split) < 2:
        return [region]
    if any(_gradual(pix, solid & a, solid & b) for i, a in enumerate(split) for b in split[i + 1:]
           if (ndimage.binary_dilation(a) & b).any()):
        return [region]
    return split


def _gradual(pix: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the colour goes from part `a` to part `b` [H, W] gradually (one object shading from
    red to orange) rather than at an edge (two objects touching): at an edge, the pixels along the
    border already differ by most of what the parts' insides do."""
    inside_a = a & (ndimage.distance_transform_edt(~b) > 2)
    inside_b = b & (ndimage.distance_transform_edt(~a) > 2)
    border_a = a & ndimage.binary_dilation(b)
    border_b = b & ndimage.binary_dilation(a)
    if not (inside_a.any() and inside_b.any() and border_a.any() and border_b.any()):
        return False
    across = np.linalg.norm(np.median(pix[inside_a], axis=0) - np.median(pix[inside_b], axis=0))
    at_border = np.linalg.norm(np.median(pix[border_a], axis=0) - np.median(pix[border_b], axis=0))
    return at_border < EDGE_SHARPNESS * across


def _colour_without_lightness(pix: np.ndarray, bg: np.ndarray, kind: np.ndarray, contrast: float,
                              small: bool) -> bool:
    """Whether a faint region [M, 3] is a neighbour's colour smeared or ringing (JPEG) rather than
    an object.

    A faint object is its colour mixed into the background at some alpha, in lightness as in hue;
    JPEG's smeared and ringing chroma moves hue and saturation but not lightness. Where the
    region's colour differs from the background in lightness, lightness well under the alpha its
    hue shows marks it as smear. Where it does not (green on grey, yellow on pink), lightness
    cannot tell; there only a `small` region (under GHOST_AREA: a whole faint object of the size
    of the world's objects covers more) is taken for ringing."""
    k = int(np.bincount(kind).argmax())
    d_luma = float((_OBJ_RGB[k] - np.median(bg, axis=0)) @ _LUMA)
    if abs(d_luma) < CHROMA_MIN_LUMA:
        return small
    return float(np.median((pix - bg) @ _LUMA)) / d_luma < GHOST_LIGHTNESS * contrast


def _faint_objects(smooth: np.ndarray, field_rgb: np.ndarray, dist: np.ndarray, strong: np.ndarray,
                   scale: float) -> list[SeenObject]:
    """Regions a person sees although they are faint: colour None (too faint to name), so a
    prompt that does not ask for them fails on colour, as it would with a person."""
    alpha, resid = _unmix(smooth, field_rgb, _OBJ_RGB)
    kind = resid.argmin(-1)
    best = np.take_along_axis(alpha, kind[..., None], -1)[..., 0]
    free = ~ndimage.binary_dilation(strong, iterations=3)
    # above the image's own noise too: the median smoothed distance of background pixels is ~1.5
    # sigma of that noise, and a person sees a faint object where it stands ~3.5 sigma out
    floor = max(FAINT_DISTANCE, 2.3 * float(np.median(dist[free]))) if free.any() else FAINT_DISTANCE
    faint = (best >= FAINT_CONTRAST[0]) & (dist > floor) & free
    labels, n = ndimage.label(faint)
    out = []
    for k in range(1, n + 1):
        region = labels == k
        area = float(region.sum())
        if area < FAINT_MIN_AREA * scale or _moments(region.astype(float))[0] > TEXTURE_ASPECT:
            continue
        contrast = float(np.median(best[region]))
        if _colour_without_lightness(smooth[region], field_rgb[region], kind[region], contrast,
                                     area < GHOST_AREA * scale):
            continue
        if contrast >= FAINT_CONTRAST[0]:
            unsure = frozenset() if contrast >= FAINT_CONTRAST[1] else frozenset({"exists"})
            out.append(SeenObject(None, None, area, unsure))
    return out


def _coverage(pix: np.ndarray, field_rgb: np.ndarray, rgb: np.ndarray, near: np.ndarray) -> np.ndarray:
    """How much of each pixel the object covers (0 outside `near`), as a person reads an outline:
    from lightness where the object is much lighter or darker than the background (JPEG keeps luma
    sharp and smears colour over 2x2 pixels), else from the whole colour difference, or from
    lightness where that outline is the sharper of the two (a moderate lightness contrast under
    JPEG). On an exact mix of background and object the two are the same number."""
    dy = float((rgb - field_rgb.reshape(-1, 3).mean(0)) @ _LUMA)
    luma = np.clip(((pix - field_rgb) @ _LUMA) / dy, 0.0, 1.0) * near if abs(dy) >= LUMA_MIN_CONTRAST else None
    if luma is not None and abs(dy) >= LUMA_CONTRAST:
        return luma
    colour = np.clip(_unmix(pix, field_rgb, rgb[None])[0][..., 0], 0.0, 1.0) * near
    return luma if luma is not None and _edge_blur(luma) < _edge_blur(colour) else colour


def _object_color(pix: np.ndarray, field_rgb: np.ndarray, part: np.ndarray, core: np.ndarray,
                  allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels [M, 3] and backgrounds [M, 3] an object's colour is named from.

    JPEG keeps lightness sharp and smears colour (chroma at half resolution, coarsely quantized),
    so a small object's core holds its lightness but only part of its chroma, the rest lying around
    it. Smearing moves chroma but keeps its sum: the object's chroma is its chroma summed over the
    object and a ring of CHROMA_SPREAD px around it (within `allowed`), per unit of its lightness
    summed over the object, times the core's lightness. Lightness is summed without the ring, where
    it holds only the background's texture. On an image without smear this is the core's own
    colour. Where the object is not much lighter or darker than the background (under
    CHROMA_MIN_LUMA), lightness cannot measure it and the core's pixels are named as they are."""
    dev = pix - field_rgb
    luma = dev @ _LUMA
    core_luma = float(np.median(luma[core]))
    mass = float(luma[ndimage.binary_dilation(part) & allowed].sum())
    if abs(core_luma) < CHROMA_MIN_LUMA or mass * core_luma <= 0:
        return pix[core], field_rgb[core]
    spread = ndimage.binary_dilation(part, iterations=CHROMA_SPREAD) & allowed
    chroma = (dev[spread] - luma[spread, None]).sum(0)
    bg = np.median(field_rgb[core], axis=0)
    return (bg + core_luma + chroma * core_luma / mass)[None], bg[None]


def _objects_in(pix: np.ndarray, field_rgb: np.ndarray, dist: np.ndarray, others: np.ndarray,
                region: np.ndarray, edge: np.ndarray, min_area: float) -> list[SeenObject]:
    """The objects of one connected foreground region (a window of the image around it)."""
    objects = []
    for part in _color_parts(pix, field_rgb, region, others, min_area):
        core = part & (dist >= np.median(dist[part]))
        rgb = np.median(pix[core], axis=0)
        allowed = ~others & ~(region & ~part)
        color, color_unsure = _name_object_color(*_object_color(pix, field_rgb, part, core, allowed))
        coverage = _coverage(pix, field_rgb, rgb, ndimage.binary_dilation(part, iterations=2) & allowed)
        alpha = np.clip((coverage - 0.25) / 0.5, 0.0, 1.0) * ndimage.binary_dilation(part)
        if alpha.sum() < min_area:
            continue
        # touching objects of one colour: as many as the distance transform has separate peaks
        pieces, count_sure = _peaks(alpha)
        for piece in pieces:
            a = alpha * piece if len(pieces) > 1 else alpha
            area = float(a.sum())
            if area < min_area:
                continue
            c = coverage * ndimage.binary_dilation(piece, iterations=2) if len(pieces) > 1 else coverage
            shape, shape_unsure = _shape_of(a, c, int((a[edge] >= 0.5).sum()) >= 2)
            unsure = {"color"} if color_unsure else set()
            if shape_unsure or len(pieces) > 1 and shape is None:
                unsure.add("shape")
            if not count_sure:
                unsure.add("exists")
            objects.append(SeenObject(color, shape, area, frozenset(unsure)))
    return objects


def perceive(image: np.ndarray) -> Perception:
    """Read one image [3, H, W] (float, [0, 1]) at the world's resolution."""
    h, w = image.shape[1:]
    scale = h * w / (32.0 * 32.0)
    pix = image.transpose(1, 2, 0).astype(np.float64)  # H, W, 3
    # 1. The background: the border's median colour names it; the local field is what objects
    #    differ from (foreground is masked out of it).
    border = np.concatenate([pix[0], pix[-1], pix[1:-1, 0], pix[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background, background_unsure = _name_background(bg_rgb)
    smooth = ndimage.uniform_filter(pix, size=(3, 3, 1), mode="nearest")
    rough = np.linalg.norm(smooth - bg_rgb, axis=2) > FOREGROUND_DISTANCE
    field_rgb = _background_field(pix, ndimage.binary_dilation(rough, iterations=2), bg_rgb)
    dist = np.linalg.norm(smooth - field_rgb, axis=2)
    strong = dist > FOREGROUND_DISTANCE
    # 2. Objects: connected foreground, split by colour, then 3. counted and 4. shaped, each in a
    #    window around its region.
    labels, n = ndimage.label(strong)
    objects = []
    min_area = MIN_OBJECT_AREA * scale
    edge = np.zeros((h, w), dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        win = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in box)
        region = labels[win] == k
        if region.sum() < min_area:
            continue
        objects += _objects_in(pix[win], field_rgb[win], dist[win], strong[win] & ~region, region,
                               edge[win], min_area)
    # 5. Faint objects.
    objects += _faint_objects(smooth, field_rgb, dist, strong, scale)
    return Perception(background, tuple(objects), background_unsure)


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
    unsure = {a: torch.zeros(n, dtype=torch.bool) for a in ATTRIBUTES}
    score = torch.zeros(n)
    all_groups, seen_all = [], []
    for i, scene in enumerate(scenes):
        seen = perceive(arr[i])
        groups, bg = verdict(seen, scene)
        per_attribute = {a: [g[a] for g in groups] for a in ("count", "color", "shape")}
        per_attribute["background"] = [bg]
        for a, flags in per_attribute.items():
            attrs[a][i] = all(f is True for f in flags)
            unsure[a][i] = False not in flags and None in flags
        flags = [v for g in groups for v in g.values()] + [bg]
        score[i] = sum(1.0 if f else 0.5 if f is None else 0.0 for f in flags) / len(flags)
        all_groups.append(groups)
        seen_all.append(seen)
    correct = torch.stack([attrs[a] for a in ATTRIBUTES]).all(0)
    return JudgeResult(score, correct, attrs, unsure, all_groups, seen_all)
