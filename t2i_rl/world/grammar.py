"""ShapesWorld's prompt grammar: scenes, their canonical text, parsing, splits and contrastive prompts.

A scene is one or two object groups ("two red circles", "one blue square") on a background colour.
Everything else in the world (renderer, judge, proxy rewards) works on `Scene`, so the text of a
prompt is parsed exactly once and a misspelt word fails loudly instead of being judged wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache

# Palettes in linear RGB [0, 1]. Object and background colours are chosen far apart (>= 0.45 in
# Euclidean distance) so that the judge can separate objects from the background under noise.
OBJECT_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.10, 0.80),
    "orange": (1.00, 0.55, 0.00),
}
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "pink": (1.00, 0.75, 0.80),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_COUNT = 4
# Two-object scenes hold at most this many objects in total: more do not fit a 32x32 image
# with the gaps the judge needs to tell them apart.
MAX_TOTAL_OBJECTS = 4
HELDOUT_PERCENT = 15
ATTRIBUTES: tuple[str, ...] = ("count", "color", "shape", "background")


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of one colour and one shape."""

    count: int
    color: str
    shape: str

    def text(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count - 1]} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    """One or two object groups of distinct colours on a background."""

    groups: tuple[ObjectGroup, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.groups) <= 2:
            raise ValueError(f"a scene holds 1 or 2 object groups, got {len(self.groups)}")
        for g in self.groups:
            if not 1 <= g.count <= MAX_COUNT:
                raise ValueError(f"count {g.count} is not allowed; counts are 1..{MAX_COUNT}")
            _check_word(g.color, OBJECT_COLORS, "object colour")
            _check_word(g.shape, SHAPES, "shape")
        _check_word(self.background, BACKGROUND_COLORS, "background colour")
        if len(self.groups) == 2:
            if self.groups[0].color == self.groups[1].color:
                raise ValueError(
                    f"the two object groups must have distinct colours, both are {self.groups[0].color!r}"
                )
            total = sum(g.count for g in self.groups)
            if total > MAX_TOTAL_OBJECTS:
                raise ValueError(
                    f"a two-object scene holds at most {MAX_TOTAL_OBJECTS} objects, got {total}"
                )

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def text(self) -> str:
        return " and ".join(g.text() for g in self.groups) + f" on a {self.background} background"


def _check_word(word: str, allowed, what: str) -> None:
    if word not in allowed:
        raise ValueError(f"unknown {what} {word!r}; allowed: {', '.join(allowed)}")


_GROUP_RE = r"(\w+) (\w+) (\w+)"
_PROMPT_RE = re.compile(rf"^{_GROUP_RE}(?: and {_GROUP_RE})? on an? (\w+) background$")


def _parse_group(count_word: str, color: str, noun: str) -> ObjectGroup:
    _check_word(count_word, COUNT_WORDS, "count word")
    count = COUNT_WORDS.index(count_word) + 1
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    _check_word(shape, SHAPES, "shape")
    expected = shape if count == 1 else shape + "s"
    if noun != expected:
        raise ValueError(f"{count_word!r} needs the noun {expected!r}, got {noun!r}")
    _check_word(color, OBJECT_COLORS, "object colour")
    return ObjectGroup(count, color, shape)


@lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> Scene:
    """Parse a ShapesWorld prompt; raise ValueError naming the offending word."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(
            f"cannot parse prompt {prompt!r}; expected e.g. 'two red circles on a white background' "
            "or 'one blue square and two green triangles on a pink background'"
        )
    a = m.groups()
    groups = [_parse_group(*a[0:3])]
    if a[3] is not None:
        groups.append(_parse_group(*a[3:6]))
    return Scene(tuple(groups), a[6])


def _all_groups() -> list[ObjectGroup]:
    return [
        ObjectGroup(n, c, s)
        for n in range(1, MAX_COUNT + 1)
        for c in OBJECT_COLORS
        for s in SHAPES
    ]


@lru_cache(maxsize=1)
def all_scenes() -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    """Every valid scene: (single-group scenes, two-group scenes), in a fixed order."""
    groups = _all_groups()
    single = tuple(Scene((g,), b) for g in groups for b in BACKGROUND_COLORS)
    double = tuple(
        Scene((g1, g2), b)
        for g1, g2 in itertools.permutations(groups, 2)
        if g1.color != g2.color and g1.count + g2.count <= MAX_TOTAL_OBJECTS
        for b in BACKGROUND_COLORS
    )
    return single, double


def is_heldout(scene: Scene) -> bool:
    """A stable split by a hash of the canonical text: the same on every machine and Python."""
    digest = hashlib.sha256(scene.text().encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


@lru_cache(maxsize=2)
def split_scenes(split: str) -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; allowed: 'train', 'heldout'")
    want = split == "heldout"
    single, double = all_scenes()
    return (
        tuple(s for s in single if is_heldout(s) == want),
        tuple(s for s in double if is_heldout(s) == want),
    )


def sample_scenes(n: int, seed: int, split: str = "train", two_object_prob: float = 0.3) -> list[Scene]:
    """Draw `n` scenes of a split: one group with probability 1 - two_object_prob, else two."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    single, double = split_scenes(split)
    rng = random.Random(seed)
    return [rng.choice(double if rng.random() < two_object_prob else single) for _ in range(n)]


def contrastive_scenes(scene: Scene) -> list[tuple[str, Scene]]:
    """Every valid scene that differs from `scene` in exactly one attribute, with that attribute.

    For two-group scenes the attributes are swapped per group, and a "binding" alternative swaps the
    colours of the two groups (the same words, bound to the other objects).
    """
    out: list[tuple[str, Scene]] = []

    def add(attr: str, groups: tuple[ObjectGroup, ...], background: str) -> None:
        try:
            out.append((attr, Scene(groups, background)))
        except ValueError:  # e.g. a count swap that overfills a two-object scene
            pass

    for i, g in enumerate(scene.groups):
        def with_group(new: ObjectGroup) -> tuple[ObjectGroup, ...]:
            return scene.groups[:i] + (new,) + scene.groups[i + 1:]

        for n in range(1, MAX_COUNT + 1):
            if n != g.count:
                add("count", with_group(replace(g, count=n)), scene.background)
        for c in OBJECT_COLORS:
            if c != g.color:
                add("color", with_group(replace(g, color=c)), scene.background)
        for s in SHAPES:
            if s != g.shape:
                add("shape", with_group(replace(g, shape=s)), scene.background)
    for b in BACKGROUND_COLORS:
        if b != scene.background:
            add("background", scene.groups, b)
    if len(scene.groups) == 2:
        g1, g2 = scene.groups
        if g1.shape != g2.shape or g1.count != g2.count:
            add("binding", (replace(g1, color=g2.color), replace(g2, color=g1.color)), scene.background)
    return out
