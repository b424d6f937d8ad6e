"""A test set for the judge drawn independently of the project's renderer, with its ground truth.

The judge plays the human rater, so its errors are the gold reward's errors. Measured only on the
project's own renderer, it could pass while reading no more than that renderer's habits (its edge
profile, its orientations, its spacing). This module draws ShapesWorld scenes from scratch with
other choices: convex shapes at any rotation, point-sampled at pixel centres (hard edges) or at
8x8 points per pixel (anti-aliased), placed edge to edge at a chosen gap, then optionally jittered,
textured, cut by the frame or JPEG-compressed. It also draws adversarial images that a careful
person would reject for their prompt. Tests and `benchmarks/judge_robustness.py` share
`conditions()`, `make_condition()` and `measure()`.

Coordinates are pixels, x to the right and y down; pixel (i, j) covers [i, i + 1) x [j, j + 1).
Angles are degrees clockwise on screen; a triangle at angle 0 points up.
"""

from __future__ import annotations

import io
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from t2i_rl.intervals import wilson_interval
from t2i_rl.world import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, ShapesWorld, parse_prompt
from t2i_rl.world.grammar import ObjectGroup, Scene

RES = 32
SUPERSAMPLE = 8
MIN_SIZE, MAX_SIZE = 6.0, 14.0
# Larger objects do not fit at the gaps below once there are three or four of them.
SIZE_CAP = {1: 14.0, 2: 14.0, 3: 12.0, 4: 11.0}
MARGIN = 1.0  # whole objects keep this far from the frame
TRIANGLE_ASPECT = (0.85, 1.15)  # height / base
JITTER = 0.05
TEXTURE_AMPLITUDE = 0.06
CUT_FRACTION = 0.25
LUMA = np.array([0.299, 0.587, 0.114])  # Y' of BT.601, JPEG's lightness
LEGIBLE_LUMA = 0.2  # lightness difference of an outline JPEG keeps sharp
FAINT_SIZE = 10.0
FAINT_CONTRAST = (0.10, 0.15)
ROUND = ("circle", "ellipse")
# Off-palette backgrounds a careful person names otherwise than the prompt does.
OFF_PALETTE = {
    "light grey": ((0.75, 0.75, 0.75), "pink"),
    "beige": ((0.96, 0.87, 0.70), "pink"),
    "navy": ((0.0, 0.0, 0.5), "black"),
    "light blue": ((0.68, 0.85, 1.0), "white"),
}

RGB = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class DrawnObject:
    """One object as drawn, and what a person calls it.

    `size` is the side of a square, the diameter of a circle, the long side of a bar or rectangle,
    the major axis of an ellipse and the larger of base and height of a triangle; `aspect` is
    height / base for a triangle and short / long side (or axis) otherwise.
    """

    shape: str
    color: str
    rgb: RGB
    size: float
    aspect: float = 1.0
    angle: float = 0.0
    center: tuple[float, float] = (0.0, 0.0)

    def local(self) -> np.ndarray:
        """Outline vertices [K, 2] around the centre (the centroid), before rotation."""
        if self.shape == "triangle":
            base = self.size if self.aspect <= 1 else self.size / self.aspect
            h = base * self.aspect
            return np.array([[0.0, -2 * h / 3], [base / 2, h / 3], [-base / 2, h / 3]])
        a, b = self.size / 2, self.size * self.aspect / 2
        if self.shape in ROUND:
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            return np.stack([a * np.cos(t), b * np.sin(t)], 1)
        return np.array([[-a, -b], [a, -b], [a, b], [-a, b]])

    def _rotation(self) -> np.ndarray:
        r = np.deg2rad(self.angle)
        return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])

    def outline(self) -> np.ndarray:
        """Outline vertices [K, 2] in the image (64 of them for round shapes)."""
        return self.local() @ self._rotation().T + np.asarray(self.center)

    @property
    def radius(self) -> float:
        """The farthest outline point from the centre: a bound for searches and sampling."""
        return float(np.linalg.norm(self.local(), axis=1).max())

    def core(self) -> np.ndarray:
        """The convex polygon that, grown by `rounding`, is the object: a circle's is its centre."""
        return np.array([self.center]) if self.shape == "circle" else self.outline()

    @property
    def rounding(self) -> float:
        return self.size / 2 if self.shape == "circle" else 0.0

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether points lie in the object: exact for every shape (no polygon for round ones)."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        d = np.stack([x - self.center[0], y - self.center[1]], -1) @ self._rotation()
        u, v = d[..., 0], d[..., 1]
        if self.shape in ROUND:
            a, b = self.size / 2, self.size * self.aspect / 2
            return (u / a) ** 2 + (v / b) ** 2 <= 1
        p = self.local()
        e = np.roll(p, -1, 0) - p
        cross = e[:, 0] * (v[..., None] - p[:, 1]) - e[:, 1] * (u[..., None] - p[:, 0])
        return (cross >= 0).all(-1)  # the local outlines run clockwise on screen

    def area(self) -> float:
        if self.shape in ROUND:
            return float(np.pi * self.size**2 * self.aspect / 4)
        return _polygon_area(self.local())

    def visible_fraction(self) -> float:
        """Share of the area inside the frame (from the outline; exact for polygons)."""
        return _polygon_area(_clip_to_frame(self.outline())) / _polygon_area(self.outline())


@dataclass(frozen=True, eq=False)
class Truth:
    """What a person reads in an image: the background's name and every object."""

    background: str
    background_rgb: RGB
    objects: tuple[DrawnObject, ...]

    def seen(self) -> Counter[tuple[str, str]]:
        return Counter((o.color, o.shape) for o in self.objects)


def reads_as(truth: Truth, prompt: str) -> bool:
    """Whether a person reading `truth` would accept `prompt`: same background, same objects."""
    scene = parse_prompt(prompt)
    wanted = Counter({(g.color, g.shape): g.count for g in scene.groups})
    return truth.background == scene.background and truth.seen() == wanted


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. The defaults are the clean condition."""

    edges: str = "hard"  # "hard": point-sampled at pixel centres; "aa": 8x8 points per pixel
    jitter: float = 0.0  # uniform per channel on every palette colour
    jpeg: int | None = None  # JPEG quality
    texture: str | None = None  # "blotches", "gradient" or "stripes" on the background
    cut: bool = False  # one object with CUT_FRACTION of its area outside the frame
    triangle_angles: tuple[float, ...] | None = None  # None: uniform in [0, 360)
    square_tilt: tuple[float, float] | None = None  # |angle| range; None: uniform in [0, 90)
    gap: tuple[float, float] = (2.0, 6.0)  # edge to edge, from each object to its neighbour


@dataclass(frozen=True, eq=False)
class Drawing:
    """An image, its truth, and the prompt it was drawn for."""

    image: torch.Tensor  # [3, RES, RES] in [0, 1]
    truth: Truth
    prompt: str


Draw = Callable[[int, np.random.Generator], list[Drawing]]  # (n, rng) -> n drawings of a condition
Make = Callable[[str, RGB, np.random.Generator], list[DrawnObject] | None]  # (colour, rgb, rng) -> objects


# --- geometry -----------------------------------------------------------------------------------

def _polygon_area(p: np.ndarray) -> float:
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _clip_to_frame(p: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon to [0, RES]^2."""
    pts = [tuple(v) for v in p]
    for axis, bound, keep_below in ((0, 0.0, False), (0, RES, True), (1, 0.0, False), (1, RES, True)):
        def inside(q: tuple[float, float]) -> bool:
            return q[axis] <= bound if keep_below else q[axis] >= bound

        out: list[tuple[float, float]] = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.array(pts).reshape(-1, 2)


def _hull(p: np.ndarray) -> np.ndarray:
    """Convex hull of points [K, 2] (Andrew's monotone chain); a single point stays one."""
    pts = sorted(set(map(tuple, np.round(p, 9))))
    if len(pts) < 3:
        return np.array(pts)

    def chain(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return np.array(chain(pts) + chain(pts[::-1]))


def _origin_distance(h: np.ndarray) -> float:
    """Distance from the origin to a convex hull; 0 inside it."""
    if len(h) == 1:
        return float(np.linalg.norm(h[0]))
    e = np.roll(h, -1, 0) - h
    if np.all(e[:, 0] * -h[:, 1] - e[:, 1] * -h[:, 0] >= 0):
        return 0.0
    t = np.clip((-h * e).sum(1) / (e * e).sum(1), 0, 1)
    return float(np.linalg.norm(h + t[:, None] * e, axis=1).min())


def _difference(a: DrawnObject, b: DrawnObject) -> np.ndarray:
    """Hull of {p - q: p in a's core, q in b's core}; its distance from the origin is the cores'."""
    return _hull((a.core()[:, None, :] - b.core()[None, :, :]).reshape(-1, 2))


def gap(a: DrawnObject, b: DrawnObject) -> float:
    """Edge-to-edge distance in pixels; 0 when the objects touch or overlap. Exact for polygons
    and circles (a circle is its centre rounded by its radius)."""
    return max(0.0, _origin_distance(_difference(a, b)) - a.rounding - b.rounding)


def _exit(h: np.ndarray, r: float, u: np.ndarray) -> np.ndarray:
    """How far rays from the origin along the unit vectors u [D, 2] run inside h grown by r.

    The grown hull is convex and holds the origin; its boundary runs through a disk of radius r
    around each vertex and a rectangle r either side of each edge, all inside it, so a ray leaves
    it where it leaves the last of those pieces.
    """
    uv = u @ h.T  # [D, K]
    disc = uv**2 - (h * h).sum(1) + r * r
    far = np.where(disc >= 0, uv + np.sqrt(np.maximum(disc, 0)), -np.inf).max(1)
    if len(h) == 1:
        return far
    e = np.roll(h, -1, 0) - h
    length = np.linalg.norm(e, axis=1)
    along, normal = e / length[:, None], np.stack([-e[:, 1], e[:, 0]], 1) / length[:, None]
    lo, hi = np.zeros_like(uv), np.full_like(uv, np.inf)
    for axis, low, high in ((along, 0.0, length), (normal, -r, np.full_like(length, r))):
        rate = u @ axis.T  # [D, K]
        start = (h * axis).sum(1)  # the ray's coordinate along axis is rate * t - start
        safe = np.where(np.abs(rate) < 1e-12, 1e-12, rate)
        t1, t2 = (low + start) / safe, (high + start) / safe
        lo, hi = np.maximum(lo, np.minimum(t1, t2)), np.minimum(hi, np.maximum(t1, t2))
    return np.maximum(far, np.where(lo <= hi, hi, -np.inf).max(1))


# --- placement ----------------------------------------------------------------------------------

def _fits(o: DrawnObject) -> bool:
    p = o.outline()
    return bool(p.min() >= MARGIN and p.max() <= RES - MARGIN)


def _place_free(o: DrawnObject, rng: np.random.Generator) -> DrawnObject | None:
    """Anywhere wholly inside the frame."""
    p = o.outline() - np.asarray(o.center)
    lo, hi = MARGIN - p.min(0), RES - MARGIN - p.max(0)
    if np.any(lo > hi):
        return None
    return replace(o, center=tuple(float(v) for v in rng.uniform(lo, hi)))


def _place_next_to(o: DrawnObject, anchor: DrawnObject, others: list[DrawnObject], g: float,
                   rng: np.random.Generator, directions: int = 64) -> DrawnObject | None:
    """Exactly `g` pixels from `anchor` edge to edge, in a random direction that keeps the object
    inside the frame and at least `g` from the others; None when no tried direction does."""
    o = replace(o, center=(0.0, 0.0))
    u = rng.normal(size=(directions, 2))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    # with o's centre on anchor's, the cores' difference holds the origin; move o out along u
    reach = _exit(_difference(anchor, o) - anchor.center, g + anchor.rounding + o.rounding, u)
    centres = np.asarray(anchor.center) + reach[:, None] * u
    p = o.outline()
    inside = ((centres + p.min(0) >= MARGIN) & (centres + p.max(0) <= RES - MARGIN)).all(1)
    for c in centres[inside]:
        cand = replace(o, center=(float(c[0]), float(c[1])))
        if all(gap(cand, x) >= g - 1e-6 for x in others):
            return cand
    return None


def _place_cut(o: DrawnObject, rng: np.random.Generator) -> DrawnObject:
    """Across one side of the frame with CUT_FRACTION of the area outside (bisection on depth)."""
    r = o.radius
    along = rng.uniform(r + MARGIN, RES - r - MARGIN)
    side = int(rng.integers(4))  # left, right, top, bottom

    def at(depth: float) -> DrawnObject:  # depth: centre's distance inside the side
        n = depth if side in (0, 2) else RES - depth
        return replace(o, center=(n, along) if side < 2 else (along, n))

    lo, hi = -r, r
    for _ in range(30):
        mid = (lo + hi) / 2
        if at(mid).visible_fraction() < 1 - CUT_FRACTION:
            lo = mid
        else:
            hi = mid
    return at(hi)


def _beside(o: DrawnObject, placed: list[DrawnObject], style: Style, rng: np.random.Generator) -> DrawnObject | None:
    """Next to one of the placed objects (tried in random order) at a gap drawn from the style."""
    g = rng.uniform(*style.gap)
    for k in rng.permutation(len(placed)):
        found = _place_next_to(o, placed[k], placed[:k] + placed[k + 1:], g, rng)
        if found is not None:
            return found
    return None


def _lay_out(objs: list[DrawnObject], style: Style, rng: np.random.Generator) -> list[DrawnObject] | None:
    """Place objects one by one, each next to one placed before; None when they do not fit."""
    order = [objs[i] for i in rng.permutation(len(objs))]
    first = _place_cut(order[0], rng) if style.cut else _place_free(order[0], rng)
    if first is None:
        return None
    placed = [first]
    for o in order[1:]:
        o = _beside(o, placed, style, rng)
        if o is None:
            return None
        placed.append(o)
    return placed


def _new_object(shape: str, color: str, size: float, style: Style, rng: np.random.Generator) -> DrawnObject:
    """An unplaced object with the style's colour jitter, orientation and (triangle) proportions."""
    rgb = _jittered(OBJECT_COLORS[color], style.jitter, rng)
    if shape == "triangle":
        aspect = rng.uniform(*TRIANGLE_ASPECT)
        angle = rng.choice(style.triangle_angles) if style.triangle_angles else rng.uniform(0, 360)
        return DrawnObject(shape, color, rgb, size, float(aspect), float(angle))
    if shape == "square":
        if style.square_tilt:
            angle = rng.uniform(*style.square_tilt) * rng.choice([-1, 1])
        else:
            angle = rng.uniform(0, 90)
        return DrawnObject(shape, color, rgb, size, 1.0, float(angle))
    return DrawnObject(shape, color, rgb, size)


def _jittered(rgb: RGB, amount: float, rng: np.random.Generator) -> RGB:
    if not amount:
        return rgb
    return tuple(float(v) for v in np.clip(np.add(rgb, rng.uniform(-amount, amount, 3)), 0, 1))


def scene_truth(scene: Scene, style: Style, rng: np.random.Generator) -> Truth:
    """Objects of a scene at random sizes, orientations and places; smaller sizes if they do not fit."""
    cap = SIZE_CAP[scene.n_objects]
    for attempt in range(200):
        size_cap = max(MIN_SIZE, cap - attempt // 10)
        objs = [_new_object(g.shape, g.color, rng.uniform(MIN_SIZE, size_cap), style, rng)
                for g in scene.groups for _ in range(g.count)]
        placed = _lay_out(objs, style, rng)
        if placed is not None:
            bg = _jittered(BACKGROUND_COLORS[scene.background], style.jitter, rng)
            return Truth(scene.background, bg, tuple(placed))
    raise RuntimeError(f"cannot lay out {scene.text()!r}")


# --- drawing ------------------------------------------------------------------------------------

def _coverage(o: DrawnObject, edges: str) -> np.ndarray:
    """Share of each pixel inside the object, over 1 point (hard) or 8x8 points (anti-aliased)."""
    ss = SUPERSAMPLE if edges == "aa" else 1
    cov = np.zeros((RES, RES), np.float32)
    p = o.outline()
    x0, y0 = np.clip(np.floor(p.min(0)).astype(int), 0, RES)
    x1, y1 = np.clip(np.ceil(p.max(0)).astype(int), 0, RES)
    if x1 <= x0 or y1 <= y0:
        return cov
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    hit = o.inside(xs[None, :], ys[:, None]).astype(np.float32)
    cov[y0:y1, x0:x1] = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))
    return cov


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A smooth luminance offset [RES, RES] within +-TEXTURE_AMPLITUDE: nothing a person takes for an object."""
    c = np.arange(RES) + 0.5
    x, y = np.meshgrid(c, c)
    if kind == "blotches":
        field = np.zeros((RES, RES))
        for _ in range(int(rng.integers(4, 8))):
            cx, cy = rng.uniform(0, RES, 2)
            s = rng.uniform(5, 10)
            field += rng.normal() * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    elif kind == "gradient":
        t = rng.uniform(0, 2 * np.pi)
        field = np.cos(t) * x + np.sin(t) * y
    elif kind == "stripes":
        t = rng.uniform(0, np.pi)
        field = np.sin(2 * np.pi * (np.cos(t) * x + np.sin(t) * y) / rng.uniform(4, 8) + rng.uniform(0, 2 * np.pi))
    else:
        raise ValueError(f"unknown texture {kind!r}")
    field = field - (field.max() + field.min()) / 2
    return TEXTURE_AMPLITUDE * field / np.abs(field).max()


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255


def render(truth: Truth, style: Style, rng: np.random.Generator) -> torch.Tensor:
    """The image [3, RES, RES] of a truth: background (textured), objects in order, then JPEG."""
    img = np.broadcast_to(np.asarray(truth.background_rgb, np.float32), (RES, RES, 3)).copy()
    if style.texture:
        img = np.clip(img + _texture(style.texture, rng)[..., None], 0, 1)
    for o in truth.objects:
        cov = _coverage(o, style.edges)[..., None]
        img = img * (1 - cov) + np.asarray(o.rgb, np.float32) * cov
    if style.jpeg is not None:
        img = _jpeg(img, style.jpeg)
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).clamp(0, 1)


# --- conditions ---------------------------------------------------------------------------------

def heldout_prompts(n: int, seed: int, keep: Callable[[Scene], bool] = lambda s: True,
                    two_object_prob: float = 0.3) -> list[str]:
    """`n` held-out prompts whose scenes pass `keep`, drawn in rounds until there are enough."""
    world = ShapesWorld(two_object_prob=two_object_prob)
    out: list[str] = []
    for r in range(1000):
        out += [p for p in world.sample_prompts(4 * n + 16, seed=seed + r, split="heldout") if keep(parse_prompt(p))]
        if len(out) >= n:
            return out[:n]
    raise RuntimeError("too few held-out prompts pass the filter")


def _sure(style: Style, keep: Callable[[Scene], bool] = lambda s: True, two_object_prob: float = 0.3) -> Draw:
    def draw(n: int, rng: np.random.Generator) -> list[Drawing]:
        out = []
        for p in heldout_prompts(n, int(rng.integers(2**31)), keep, two_object_prob):
            truth = scene_truth(parse_prompt(p), style, rng)
            out.append(Drawing(render(truth, style, rng), truth, p))
        return out
    return draw


def _single(make: Make, asked: str) -> Draw:
    """One adversarial object (or pair) of a random colour on a random background, asked as `asked`."""
    def draw(n: int, rng: np.random.Generator) -> list[Drawing]:
        out = []
        for _ in range(n):
            color, bg = str(rng.choice(list(OBJECT_COLORS))), str(rng.choice(list(BACKGROUND_COLORS)))
            style = Style(edges=str(rng.choice(["hard", "aa"])))
            objs = None
            while objs is None:
                objs = make(color, OBJECT_COLORS[color], rng)
            truth = Truth(bg, BACKGROUND_COLORS[bg], tuple(objs))
            prompt = Scene((ObjectGroup(1, color, asked),), bg).text()
            out.append(Drawing(render(truth, style, rng), truth, prompt))
        return out
    return draw


def _circle_pair(overlapping: bool) -> Make:
    """Two same-colour 8-12 px circles of one diameter: 0-1 px apart, or centres 0.6-0.9 diameters apart."""
    def make(color: str, rgb: RGB, rng: np.random.Generator) -> list[DrawnObject] | None:
        d = rng.uniform(8, 12)
        a = _place_free(DrawnObject("circle", color, rgb, d), rng)
        if not overlapping:
            b = _place_next_to(DrawnObject("circle", color, rgb, d), a, [], rng.uniform(0, 1), rng)
            return None if b is None else [a, b]
        t, dist = rng.uniform(0, 2 * np.pi), d * rng.uniform(0.6, 0.9)
        b = replace(a, center=(a.center[0] + dist * np.cos(t), a.center[1] + dist * np.sin(t)))
        return [a, b] if _fits(b) else None
    return make


def _elongated(shape: str, size: tuple[float, float], aspect: float) -> Make:
    """One bar, rectangle or ellipse of a long side in `size`, at any rotation, anywhere."""
    def make(color: str, rgb: RGB, rng: np.random.Generator) -> list[DrawnObject] | None:
        o = DrawnObject(shape, color, rgb, rng.uniform(*size), aspect, rng.uniform(0, 180))
        placed = _place_free(o, rng)
        return None if placed is None else [placed]
    return make


def _faint_extra(n: int, rng: np.random.Generator) -> list[Drawing]:
    """A correct scene plus a whole FAINT_SIZE object at low contrast; the prompt omits it.

    Scenes of up to three objects, laid out again until the extra object has room beside one.
    """
    out: list[Drawing] = []
    for p in heldout_prompts(n, int(rng.integers(2**31)), lambda s: s.n_objects < 4):
        style = Style(edges=str(rng.choice(["hard", "aa"])))
        color = str(rng.choice(list(OBJECT_COLORS)))
        extra = _new_object(str(rng.choice(SHAPES)), color, FAINT_SIZE, style, rng)
        c = rng.uniform(*FAINT_CONTRAST)
        for _ in range(100):
            truth = scene_truth(parse_prompt(p), style, rng)
            bg = np.asarray(truth.background_rgb)
            faint = replace(extra, rgb=tuple(float(v) for v in bg + c * (np.asarray(OBJECT_COLORS[color]) - bg)))
            placed = _beside(faint, list(truth.objects), style, rng)
            if placed is not None:
                break
        else:
            raise RuntimeError(f"no room for a faint object beside {p!r}")
        truth = replace(truth, objects=truth.objects + (placed,))
        out.append(Drawing(render(truth, style, rng), truth, p))
    return out


def _off_palette(name: str) -> Draw:
    """Correct scenes of prompts on the background a person might confuse `name` with, drawn on `name`."""
    rgb, asked = OFF_PALETTE[name]

    def draw(n: int, rng: np.random.Generator) -> list[Drawing]:
        out = []
        for p in heldout_prompts(n, int(rng.integers(2**31)), lambda s: s.background == asked):
            style = Style(edges=str(rng.choice(["hard", "aa"])))
            truth = replace(scene_truth(parse_prompt(p), style, rng), background=name, background_rgb=rgb)
            out.append(Drawing(render(truth, style, rng), truth, p))
        return out
    return draw


@dataclass(frozen=True)
class Condition:
    """A named way of drawing images: "sure" (a person is sure of its verdicts) or "adversarial"."""

    name: str
    kind: str
    description: str
    draw: Draw

    @property
    def goal(self) -> float:
        return 0.98 if self.kind == "sure" else 0.95


def lightness_outlines(scene: Scene) -> bool:
    """Whether every object colour of a scene differs from its background by LEGIBLE_LUMA in Y'."""
    bg = np.asarray(BACKGROUND_COLORS[scene.background])
    return all(abs(float((np.asarray(OBJECT_COLORS[g.color]) - bg) @ LUMA)) >= LEGIBLE_LUMA for g in scene.groups)


def conditions() -> dict[str, Condition]:
    def has(shape: str) -> Callable[[Scene], bool]:
        return lambda s: any(g.shape == shape for g in s.groups)

    def two_singles(s: Scene) -> bool:
        return [g.count for g in s.groups] == [1, 1]

    sure = {
        "clean": ("hard edges, any orientation, sizes 6-14 px, gaps 2-6 px", Style()),
        "anti_aliased": ("as clean, anti-aliased over 8x8 points per pixel", Style(edges="aa")),
        "color_jitter": ("as clean, +-0.05 per channel on object and background colours", Style(jitter=JITTER)),
        "jpeg_50": ("as clean, then JPEG at quality 50", Style(jpeg=50)),
        "jpeg_25": ("as clean, then JPEG at quality 25", Style(jpeg=25)),
        "texture_blotches": ("as clean on smooth blotches of +-0.06", Style(texture="blotches")),
        "texture_gradient": ("as clean on a linear gradient of +-0.06", Style(texture="gradient")),
        "texture_stripes": ("as clean on stripes of +-0.06, period 4-8 px", Style(texture="stripes")),
        "border_cut": ("as clean, one object per image with 25% of its area outside the frame", Style(cut=True)),
    }
    out = {name: Condition(name, "sure", desc, _sure(style)) for name, (desc, style) in sure.items()}
    # JPEG keeps only lightness (Y') at full resolution; colour is stored at half resolution and
    # coarsely quantized. An outline a person reads through it is the lightness one, so these draw
    # the scenes whose every colour differs from the background by at least LEGIBLE_LUMA in Y'
    # (what is left of the full conditions' misses there is the judge's, not the format's).
    for quality in (50, 25):
        name = f"jpeg_{quality}_lightness_outlines"
        out[name] = Condition(
            name, "sure", f"as jpeg_{quality}, scenes whose every object differs from the background by >= "
            f"{LEGIBLE_LUMA} in lightness (Y'), the outlines JPEG keeps at full resolution",
            _sure(Style(jpeg=quality), lightness_outlines))
    out["triangles_down_left_right"] = Condition(
        "triangles_down_left_right", "sure", "prompts with triangles; every triangle points down, left or right",
        _sure(Style(triangle_angles=(90.0, 180.0, 270.0)), has("triangle")))
    out["squares_rotated"] = Condition(
        "squares_rotated", "sure", "prompts with squares; every square rotated 20-45 deg either way",
        _sure(Style(square_tilt=(20.0, 45.0)), has("square")))
    out["gap_2px"] = Condition(
        "gap_2px", "sure", "prompts of two objects, 2 px apart edge to edge",
        _sure(Style(gap=(2.0, 2.0)), lambda s: s.n_objects == 2, two_object_prob=0.5))
    out["gap_1px"] = Condition(
        "gap_1px", "sure", "one object each of two colours, 1 px apart edge to edge",
        _sure(Style(gap=(1.0, 1.0)), two_singles, two_object_prob=1.0))

    adversarial = {
        "circles_touching": ("two same-colour 8-12 px circles 0-1 px apart, asked as one circle",
                             _single(_circle_pair(overlapping=False), "circle")),
        "circles_overlapping": ("two same-colour 8-12 px circles, centres 0.6-0.9 diameters apart, asked as one",
                                _single(_circle_pair(overlapping=True), "circle")),
        "bar": ("a 2x8 px bar at any rotation, asked as a circle",
                _single(_elongated("bar", (8, 8), 0.25), "circle")),
        "rectangle": ("a 12x6 px rectangle at any rotation, asked as a square",
                      _single(_elongated("rectangle", (12, 12), 0.5), "square")),
        "ellipse": ("a 10-14 px ellipse of aspect 0.4 at any rotation, asked as a circle",
                    _single(_elongated("ellipse", (10, 14), 0.4), "circle")),
        "faint_extra_object": ("a correct scene plus a 10 px object at 10-15% contrast, prompt without it",
                               _faint_extra),
    }
    for name, (desc, draw) in adversarial.items():
        out[name] = Condition(name, "adversarial", desc, draw)
    for bg, (rgb, asked) in OFF_PALETTE.items():
        name = f"background_{bg.replace(' ', '_')}_as_{asked}"
        out[name] = Condition(name, "adversarial", f"a correct scene on {bg} {rgb}, asked on {asked}", _off_palette(bg))
    return out


def draw_condition(name: str, n: int, seed: int) -> list[Drawing]:
    """`n` drawings of a condition; the same for the same (name, n, seed)."""
    return conditions()[name].draw(n, np.random.default_rng([seed, zlib.crc32(name.encode())]))


def make_condition(name: str, n: int, seed: int) -> tuple[torch.Tensor, list[str], list[bool], bool]:
    """(images, prompts, expected_accept, person_sure) for judging a condition.

    Sure conditions give 2n pairs: each image with its own prompt (accepted) and with one
    contrastive prompt (its truth computed from the drawing), and person_sure is True: a person is
    sure of every verdict, so an unsure judge verdict is a miss. Adversarial classes give n pairs a
    careful person rejects, and person_sure is False: there only an acceptance is a miss.
    """
    drawings = draw_condition(name, n, seed)
    images = torch.stack([d.image for d in drawings])
    prompts = [d.prompt for d in drawings]
    if conditions()[name].kind == "adversarial":
        return images, prompts, [False] * len(drawings), False
    world = ShapesWorld()
    other = [world.contrastive(d.prompt, k=1, seed=seed * 100_003 + i)[0] for i, d in enumerate(drawings)]
    expected = [True] * len(drawings) + [reads_as(d.truth, p) for d, p in zip(drawings, other)]
    return torch.cat([images, images]), prompts + other, expected, True


def judge_verdicts(result) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepts, unsure) per image from a JudgeResult.

    A verdict is unsure when some attribute is unsure and none is surely false (one sure failing
    attribute already makes a sure rejection). A judge without `unsure` is always sure.
    """
    accepts = result.correct.bool()
    unsure = getattr(result, "unsure", None) or {}
    none = torch.zeros_like(accepts)
    any_unsure = none.clone()
    sure_fail = none.clone()
    for name, holds in result.attributes.items():
        u = unsure.get(name, none).bool()
        any_unsure |= u
        sure_fail |= ~holds.bool() & ~u
    return accepts, any_unsure & ~sure_fail


@dataclass(frozen=True)
class Measurement:
    """The judge on one condition: `hits` of `n` pairs agree (sure) or are not accepted (adversarial)."""

    name: str
    kind: str
    n: int
    hits: int
    unsure: int
    goal: float

    @property
    def rate(self) -> float:
        return self.hits / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n)

    @property
    def passed(self) -> bool:
        return self.rate >= self.goal

    def summary(self) -> str:
        what = "agreement" if self.kind == "sure" else "rejection"
        lo, hi = self.interval
        return (f"{self.name}: {what} {self.rate:.1%} [{lo:.1%}, {hi:.1%}] of {self.n}, "
                f"unsure {self.unsure / self.n:.1%}, goal {self.goal:.0%}")


def measure(name: str, n: int, seed: int, world: ShapesWorld | None = None) -> Measurement:
    """Judge a condition's `n` images (2n pairs for sure conditions) and count the hits."""
    condition = conditions()[name]
    images, prompts, expected, person_sure = make_condition(name, n, seed)
    accepts, unsure = judge_verdicts((world or ShapesWorld()).judge(images, prompts))
    agree = accepts == torch.tensor(expected)
    if person_sure:
        agree &= ~unsure
    return Measurement(name, condition.kind, len(prompts), int(agree.sum()), int(unsure.sum()), condition.goal)
