"""Contrastive prompts C(y) for TextNorm on free text.

TextNorm (Kim et al., ICLR 2024) normalizes a reward over the prompt and prompts that describe a
different image. ShapesWorld's grammar gives those for its own prompts; for free text this module
gives three sources, all callables `prompt -> list[str]`:

* `RuleContrastive`: swaps counts ("two dogs" -> "one dog", "three dogs"), colours, objects within
  a category (animals, vehicles, food, ...), spatial words (left/right, above/below, on top
  of/under, in front of/behind) and colour bindings ("a red cube and a blue ball" -> "a blue cube
  and a red ball"). Deterministic; [] when nothing applies (TextNorm then gives confidence 1).
* `LMContrastive`: a transformers causal LM asked with a few-shot prompt; its lines are cleaned,
  filtered and deduplicated, topped up from a fallback generator, and cached per prompt.
* `JsonContrastive`: sets read from JSON files `{prompt: [alternatives, ...]}` (the layout of
  TIA2's `prompts/prompt_set_*.json`), with a fallback generator for prompts not in them.

`make_contrastive(spec)` builds any of them from "shapes", "rules" or a dict with a "name".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

from ..prompts import DEFAULT_CONTRASTIVE

Contrastive = Callable[[str], list[str]]

KINDS: tuple[str, ...] = ("count", "color", "object", "spatial", "binding")

# ----------------------------------------------------------------------------------------------
# Vocabularies

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
)
_COLOR_ALIASES = {"grey": "gray"}  # read as gray; never swapped for it

# Common nouns by category; an object is only swapped for another of its category. Multi-word
# nouns match before their last word ("teddy bear" before "bear"). No word is in two categories.
OBJECTS: dict[str, tuple[str, ...]] = {
    "animal": (
        "dog", "cat", "horse", "cow", "sheep", "pig", "goat", "rabbit", "bird", "duck", "chicken",
        "owl", "parrot", "penguin", "bear", "lion", "tiger", "elephant", "giraffe", "zebra",
        "monkey", "fox", "wolf", "deer", "mouse", "squirrel", "raccoon", "frog", "turtle", "fish",
        "dolphin", "whale", "shark", "butterfly", "bee", "snake", "kangaroo", "panda", "koala",
        "camel", "hedgehog", "hamster", "otter", "crab", "puppy", "kitten",
    ),
    "person": ("man", "woman", "boy", "girl", "child", "person", "baby", "astronaut", "chef", "knight"),
    "vehicle": (
        "car", "truck", "bus", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat",
        "ship", "tractor", "van", "taxi", "scooter", "rocket", "submarine",
    ),
    "food": (
        "apple", "banana", "orange", "pear", "lemon", "strawberry", "watermelon", "pineapple",
        "carrot", "broccoli", "tomato", "potato", "pizza", "sandwich", "burger", "hot dog", "donut",
        "cake", "cupcake", "cookie", "croissant", "egg", "pie", "mango", "cherry",
    ),
    "furniture": (
        "chair", "table", "sofa", "couch", "bed", "desk", "bench", "stool", "bookshelf", "lamp",
        "armchair", "wardrobe",
    ),
    "kitchenware": ("cup", "mug", "bowl", "plate", "fork", "spoon", "knife", "bottle", "teapot", "vase", "jar", "kettle"),
    "electronics": ("laptop", "computer", "phone", "television", "keyboard", "microwave", "toaster", "clock", "camera", "radio"),
    "clothing": ("hat", "shirt", "dress", "shoe", "boot", "jacket", "scarf", "glove", "sock", "backpack", "suitcase", "handbag"),
    "plant": ("tree", "palm tree", "flower", "rose", "sunflower", "tulip", "cactus", "mushroom", "bush"),
    "shape": ("cube", "sphere", "ball", "cylinder", "cone", "pyramid", "circle", "square", "triangle", "star", "ring", "block"),
    "instrument": ("guitar", "piano", "violin", "drum", "trumpet", "flute", "saxophone", "cello"),
    "toy": ("teddy bear", "kite", "balloon", "doll", "skateboard", "surfboard", "frisbee"),
    "building": ("house", "castle", "church", "tower", "lighthouse", "barn", "bridge", "skyscraper", "cabin", "tent"),
}

# phrase -> what it becomes; phrases are matched word by word, longest first.
SPATIAL: dict[str, tuple[str, ...]] = {
    "left": ("right",), "right": ("left",),
    "above": ("below",), "below": ("above",),
    "on top of": ("under",), "under": ("on top of",), "underneath": ("on top of",), "beneath": ("on top of",),
    "in front of": ("behind",), "behind": ("in front of",),
}

NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_COUNT = len(NUMBER_WORDS)

# Words that end a noun phrase: a colour followed by one of them is not an adjective.
_FUNCTION_WORDS = frozenset(
    "and or but on in of with at by to the a an is are was were be under over above below behind near "
    "next beside inside outside from for into onto while as that which this these those its their his "
    "her it they there here".split()
)

_IRREGULAR_PLURALS = {
    "mouse": "mice", "goose": "geese", "person": "people", "man": "men", "woman": "women",
    "child": "children", "foot": "feet", "tooth": "teeth", "ox": "oxen", "cactus": "cacti",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "loaf": "loaves", "shelf": "shelves",
    "calf": "calves", "half": "halves", "scarf": "scarves", "elf": "elves", "thief": "thieves",
    "wife": "wives", "life": "lives", "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
    "hero": "heroes", "volcano": "volcanoes", "buffalo": "buffaloes", "bookshelf": "bookshelves",
    "bus": "buses", "gas": "gases",
}
_IRREGULAR_SINGULARS = {p: s for s, p in _IRREGULAR_PLURALS.items()}
_INVARIANT = frozenset(
    "sheep deer fish moose bison salmon trout shrimp squid aircraft spacecraft series species".split())
# Plurals in -ies whose singular ends in -ie, not -y.
_IE_PLURALS = frozenset("cookies movies zombies brownies smoothies selfies goalies calories pies ties lies".split())


def pluralize(noun: str) -> str:
    """The plural of a singular noun (last word of a multi-word noun): irregulars, invariants,
    -y -> -ies, -s/-x/-z/-ch/-sh -> -es, else -s."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _INVARIANT:
        plural = last
    elif low in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[low]
    elif len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def singularize(noun: str) -> str:
    """The singular of a plural noun, the inverse of `pluralize` for the usual patterns."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _INVARIANT:
        single = last
    elif low in _IRREGULAR_SINGULARS:
        single = _IRREGULAR_SINGULARS[low]
    elif low.endswith("ies") and low not in _IE_PLURALS and len(low) > 4:
        single = last[:-3] + "y"
    elif low.endswith(("sses", "xes", "zzes", "ches", "shes")):
        single = last[:-2]
    elif low.endswith("s") and not low.endswith("ss"):
        single = last[:-1]
    else:
        single = last
    return f"{head} {single}" if head else single


def _is_plural_form(word: str) -> bool:
    low = word.lower()
    return low in _IRREGULAR_SINGULARS or (low.endswith("s") and not low.endswith("ss") and len(low) > 2)


def article(word: str) -> str:
    """ "a" or "an" before `word`, by its first sound (a spelling heuristic with the usual exceptions)."""
    low = word.lower()
    if low.startswith(("uni", "use", "usu", "uten", "eu", "one", "once", "ukulele")):
        return "a"
    if low.startswith(("hour", "honest", "honor", "heir")):
        return "an"
    return "an" if low[:1] in "aeiou" else "a"


# noun form (singular or plural, as words) -> (category, singular, is plural)
_NOUNS: dict[tuple[str, ...], tuple[str, str, bool]] = {}
for _category, _members in OBJECTS.items():
    for _noun in _members:
        _NOUNS[tuple(_noun.split())] = (_category, _noun, False)
        _NOUNS.setdefault(tuple(pluralize(_noun).split()), (_category, _noun, True))
_MAX_NOUN_WORDS = max(len(k) for k in _NOUNS)
_NOUN_WORDS = frozenset(n for members in OBJECTS.values() for n in members)
_SPATIAL_PHRASES = sorted((tuple(p.split()) for p in SPATIAL), key=len, reverse=True)

# ----------------------------------------------------------------------------------------------
# The rule-based generator

_WORD_RE = re.compile(r"[A-Za-z]+|\d+")


class _Tokens:
    """The words of a prompt with their character spans, for span-exact rewriting."""

    def __init__(self, text: str) -> None:
        self.text = text
        matches = list(_WORD_RE.finditer(text))
        self.words = [m.group().lower() for m in matches]
        self.spans = [m.span() for m in matches]

    def __len__(self) -> int:
        return len(self.words)

    def joined(self, i: int, n: int) -> bool:
        """True when words i..i+n-1 exist and are separated by whitespace only (one phrase)."""
        if i + n > len(self.words):
            return False
        return all(self.text[self.spans[j][1]:self.spans[j + 1][0]].isspace() for j in range(i, i + n - 1))

    def match(self, i: int, phrase: tuple[str, ...]) -> bool:
        return tuple(self.words[i:i + len(phrase)]) == phrase and self.joined(i, len(phrase))

    def span(self, i: int, n: int = 1) -> tuple[int, int]:
        return self.spans[i][0], self.spans[i + n - 1][1]

    def original(self, i: int, n: int = 1) -> str:
        start, end = self.span(i, n)
        return self.text[start:end]

    def noun_at(self, i: int) -> tuple[int, tuple[str, str, bool]] | None:
        """The longest known noun starting at word i: (its length in words, (category, singular, plural))."""
        for n in range(min(_MAX_NOUN_WORDS, len(self) - i), 0, -1):
            key = tuple(self.words[i:i + n])
            if key in _NOUNS and self.joined(i, n):
                return n, _NOUNS[key]
        return None

    def is_color(self, i: int) -> bool:
        """A colour word used as a colour: "orange" followed by no modified word is the fruit."""
        word = _COLOR_ALIASES.get(self.words[i], self.words[i])
        if word not in COLORS:
            return False
        if word in _NOUN_WORDS:
            return self.modifies(i)
        return True

    def modifies(self, i: int) -> bool:
        """Word i is directly followed by a content word (so it is an adjective of that word)."""
        return self.joined(i, 2) and self.words[i + 1] not in _FUNCTION_WORDS and not self.words[i + 1].isdigit()


def _cased(original: str, replacement: str) -> str:
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement


def _apply(tokens: _Tokens, edits: dict[int, tuple[int, str]]) -> str:
    """Rewrite the prompt: edits {first word: (number of words, replacement)}, non-overlapping."""
    out, pos = [], 0
    for i in sorted(edits):
        n, replacement = edits[i]
        start, end = tokens.span(i, n)
        out.append(tokens.text[pos:start])
        out.append(_cased(tokens.original(i, n), replacement))
        pos = end
    out.append(tokens.text[pos:])
    return "".join(out)


def _with_article(tokens: _Tokens, edits: dict[int, tuple[int, str]], i: int, new_word: str) -> None:
    """If word i-1 is a/an directly before word i, make it agree with the new word i."""
    if i > 0 and tokens.words[i - 1] in ("a", "an") and tokens.joined(i - 1, 2) and i - 1 not in edits:
        edits[i - 1] = (1, article(new_word))


def _count_of(word: str) -> tuple[int, str] | None:
    """(count, style) of a count word: style "article", "word" or "digit"."""
    if word in ("a", "an"):
        return 1, "article"
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word) + 1, "word"
    if word.isdigit() and 1 <= int(word) <= MAX_COUNT:
        return int(word), "digit"
    return None


def _count_alternatives(n: int) -> list[int]:
    """Counts near n (n-2 .. n+2, at least 1, at most MAX_COUNT), as TIA2's counting prompt sets."""
    return [m for m in range(n - 2, n + 3) if m != n and 1 <= m <= MAX_COUNT]


def _count_swaps(tokens: _Tokens) -> list[str]:
    out = []
    for i, word in enumerate(tokens.words):
        parsed = _count_of(word)
        if parsed is None:
            continue
        n, style = parsed
        # The counted noun: a known noun within the next three words (after modifiers such as
        # a colour); for an explicit count above one, else the first plural-looking word.
        noun = None
        for j in range(i + 1, min(i + 4, len(tokens))):
            if not tokens.joined(j - 1, 2) or tokens.words[j] in _FUNCTION_WORDS:
                break
            if tokens.is_color(j):
                continue
            found = tokens.noun_at(j)
            if found is not None:
                noun = (j, found[0], found[1][1])
                break
            if style != "article" and n > 1 and _is_plural_form(tokens.words[j]):
                noun = (j, 1, singularize(tokens.words[j]))
                break
        if noun is None:
            continue
        j, length, singular = noun
        for m in _count_alternatives(n):
            form = singular if m == 1 else pluralize(singular)
            # a/an only ever counts one, so its alternatives are all number words
            count = str(m) if style == "digit" else NUMBER_WORDS[m - 1]
            out.append(_apply(tokens, {i: (1, count), j: (length, form)}))
    return out


def _color_swaps(tokens: _Tokens) -> list[str]:
    out = []
    for i in range(len(tokens)):
        if not tokens.is_color(i):
            continue
        own = _COLOR_ALIASES.get(tokens.words[i], tokens.words[i])
        for color in COLORS:
            if color != own:
                edits = {i: (1, color)}
                _with_article(tokens, edits, i, color)
                out.append(_apply(tokens, edits))
    return out


def _object_swaps(tokens: _Tokens) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        found = tokens.noun_at(i)
        if found is None or (tokens.words[i] in COLORS and tokens.is_color(i)):
            i += 1
            continue
        length, (category, singular, plural) = found
        for other in OBJECTS[category]:
            if other != singular:
                form = pluralize(other) if plural else other
                edits = {i: (length, form)}
                _with_article(tokens, edits, i, form)
                out.append(_apply(tokens, edits))
        i += length
    return out


def _spatial_swaps(tokens: _Tokens) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        phrase = next((p for p in _SPATIAL_PHRASES if tokens.match(i, p)), None)
        if phrase is None:
            i += 1
            continue
        for alt in SPATIAL[" ".join(phrase)]:
            out.append(_apply(tokens, {i: (len(phrase), alt)}))
        i += len(phrase)
    return out


def _binding_swaps(tokens: _Tokens) -> list[str]:
    """Swap the colours of two differently coloured things ("a red cube and a blue ball")."""
    colored = [i for i in range(len(tokens)) if tokens.is_color(i) and tokens.modifies(i)]
    out = []
    for a, i in enumerate(colored):
        for j in colored[a + 1:]:
            ci, cj = tokens.words[i], tokens.words[j]
            if _COLOR_ALIASES.get(ci, ci) != _COLOR_ALIASES.get(cj, cj):
                edits = {i: (1, cj), j: (1, ci)}
                _with_article(tokens, edits, i, cj)
                _with_article(tokens, edits, j, ci)
                out.append(_apply(tokens, edits))
    return out


_SWAPS: dict[str, Callable[[_Tokens], list[str]]] = {
    "count": _count_swaps, "color": _color_swaps, "object": _object_swaps,
    "spatial": _spatial_swaps, "binding": _binding_swaps,
}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _check_k(k) -> int | None:
    if k is not None and (not isinstance(k, Integral) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be an integer >= 1 or None (all), got {k!r}")
    return None if k is None else int(k)


def _check_seed(seed) -> int:
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed)


class RuleContrastive:
    """Rule-based contrastive prompts for free text: count, colour, object, spatial and binding swaps.

    Args:
        k: at most k prompts per prompt (None: all). With a cap the kinds take turns (in the
            order of `kinds`), each kind's candidates in an order shuffled with `seed` and the
            prompt, so a small k still mixes count, colour, object, ... swaps.
        seed: the seed of that shuffle; the same (seed, prompt) always gives the same list.
        kinds: which swaps to make, a subset of KINDS.

    Never returns the prompt itself or a duplicate (compared case- and space-insensitively);
    returns [] when no rule applies.
    """

    def __init__(self, k: int | None = None, seed: int = 0, kinds: Sequence[str] = KINDS) -> None:
        self.k = _check_k(k)
        self.seed = _check_seed(seed)
        if isinstance(kinds, str) or not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"kinds must be a non-empty list of {', '.join(KINDS)}; got {kinds!r}")
        self.kinds = tuple(dict.fromkeys(kinds))

    def by_kind(self, prompt: str) -> dict[str, list[str]]:
        """Every candidate of each kind, in generation order, without the prompt or repeats."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        tokens = _Tokens(prompt)
        seen = {_norm(prompt)}
        out: dict[str, list[str]] = {}
        for kind in self.kinds:
            out[kind] = []
            for alt in _SWAPS[kind](tokens):
                if _norm(alt) not in seen:
                    seen.add(_norm(alt))
                    out[kind].append(alt)
        return out

    def __call__(self, prompt: str) -> list[str]:
        groups = self.by_kind(prompt)
        if self.k is None:
            return [alt for kind in self.kinds for alt in groups[kind]]
        rng = random.Random(f"{self.seed}\x1f{prompt}")
        queues = [rng.sample(groups[kind], len(groups[kind])) for kind in self.kinds]
        out: list[str] = []
        while len(out) < self.k and any(queues):
            for queue in queues:
                if queue and len(out) < self.k:
                    out.append(queue.pop(0))
        return out


_RULES = RuleContrastive()  # stateless: the default fallback of the other generators


# ----------------------------------------------------------------------------------------------
# The language-model generator

FEW_SHOT = (
    "Each line below a prompt rewrites it with one change (a count, a colour, an object or a "
    "position), so that it describes a different image.\n\n"
    "Prompt: two red apples on a wooden table\n"
    "- three red apples on a wooden table\n"
    "- two green apples on a wooden table\n"
    "- two red pears on a wooden table\n"
    "- two red apples under a wooden table\n\n"
    "Prompt: a cat sitting to the left of a dog\n"
    "- two cats sitting to the left of a dog\n"
    "- a cat sitting to the right of a dog\n"
    "- a fox sitting to the left of a dog\n"
    "- a cat sitting to the left of a horse\n\n"
    "Prompt: {prompt}\n"
    "-"
)
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")


def parse_lines(text: str, prompt: str, min_overlap: float = 0.5, max_chars: int | None = None) -> list[str]:
    """Contrastive prompts from a language model's continuation of `FEW_SHOT`.

    One candidate per line, read until a line that starts a new example ("Prompt:"); bullets,
    numbering and quotes are stripped and spaces collapsed. A line is dropped when it is empty,
    has no letter, is the prompt itself or a repeat (ignoring case and spaces), is longer than
    `max_chars` (default: twice the prompt plus 20), or shares less than `min_overlap` of the
    prompt's distinct words (a rewrite changes one detail; garbage shares nothing).
    """
    limit = max_chars if max_chars is not None else 2 * len(prompt) + 20
    words = set(_norm(prompt).split())
    seen = {_norm(prompt)}
    out = []
    for line in text.splitlines():
        if line.strip().lower().startswith("prompt:"):
            break
        cand = " ".join(_BULLET_RE.sub("", line).strip().strip("\"'`").split())
        if not cand or not re.search(r"[A-Za-z]", cand) or len(cand) > limit or _norm(cand) in seen:
            continue
        shared = len(words & set(_norm(cand).split())) / max(len(words), 1)
        if shared < min_overlap:
            continue
        seen.add(_norm(cand))
        out.append(cand)
    return out


class LMContrastive:
    """Contrastive prompts written by a transformers causal language model.

    The model (a local folder or a hub id, loaded with `AutoModelForCausalLM`) continues
    `FEW_SHOT` with greedy decoding (deterministic, and no global random state is touched);
    `parse_lines` keeps the usable lines. When fewer than `k` remain, the list is topped up from
    `fallback` (the rule-based generator by default; None: return what the model gave). Results are cached per
    prompt; `calls` counts model generations.
    """

    def __init__(
        self,
        model: str | Path,
        k: int = 8,
        fallback: Contrastive | None = _RULES,
        max_new_tokens: int = 96,
        min_overlap: float = 0.5,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.k = _check_k(k)
        if self.k is None:
            raise ValueError("the language-model generator needs k, the number of prompts to ask for")
        if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(min_overlap, Real) or isinstance(min_overlap, bool) or not 0 <= min_overlap <= 1:
            raise ValueError(f"min_overlap must be a number in [0, 1], got {min_overlap!r}")
        local = Path(model).expanduser()
        if (local.is_absolute() or str(model).startswith((".", "~"))) and not local.is_dir():
            raise FileNotFoundError(f"language model folder {model} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.model = AutoModelForCausalLM.from_pretrained(str(model)).to(device).eval()
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.min_overlap = float(min_overlap)
        self.fallback = fallback
        self.calls = 0
        self._cache: dict[str, list[str]] = {}

    @staticmethod
    def query(prompt: str) -> str:
        """The text the model continues for `prompt`."""
        return FEW_SHOT.format(prompt=prompt)

    def generate(self, prompt: str) -> str:
        """The model's raw continuation of `query(prompt)` (a bullet "-" is already given)."""
        import torch

        enc = self.tokenizer(self.query(prompt), return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        self.calls += 1
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, prompt: str) -> list[str]:
        if prompt not in self._cache:
            alts = parse_lines(self.generate(prompt), prompt, self.min_overlap)[:self.k]
            if len(alts) < self.k and self.fallback is not None:
                seen = {_norm(prompt)} | {_norm(a) for a in alts}
                for alt in self.fallback(prompt):
                    if len(alts) == self.k:
                        break
                    if _norm(alt) not in seen:
                        seen.add(_norm(alt))
                        alts.append(alt)
            self._cache[prompt] = alts
        return list(self._cache[prompt])


# ----------------------------------------------------------------------------------------------
# Contrastive sets from JSON files


def load_contrastive_sets(path: str | Path) -> dict[str, list[str]]:
    """Read `{prompt: [alternative, ...]}` from a JSON file, checking every entry.

    Errors name the file and the bad entry. An empty list is allowed (no contrastive prompts:
    TextNorm gives confidence 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contrastive prompt file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{prompt: [alternatives, ...]}}, got a {type(data).__name__}")
    out = {}
    for prompt, alts in data.items():
        if not prompt.strip():
            raise ValueError(f"{path}: an entry has an empty prompt as its key")
        if not isinstance(alts, list):
            raise ValueError(f"{path}: entry {prompt!r} must be a list of prompts, got {type(alts).__name__}")
        for i, alt in enumerate(alts):
            if not isinstance(alt, str) or not alt.strip():
                raise ValueError(f"{path}: entry {prompt!r}: alternative #{i} must be a non-empty string, got {alt!r}")
        out[prompt] = list(alts)
    return out


class JsonContrastive:
    """Contrastive sets read from JSON files, with a fallback generator for other prompts.

    Args:
        paths: one file or several (their sets are merged; a prompt in two files gets both lists).
        fallback: generator for prompts in no file; None makes such a prompt an error.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], fallback: Contrastive | None = None) -> None:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("the json contrastive source needs at least one file in 'path'")
        self.paths = [Path(p) for p in paths]
        self.sets: dict[str, list[str]] = {}
        for path in self.paths:
            for prompt, alts in load_contrastive_sets(path).items():
                self.sets[prompt] = list(dict.fromkeys(self.sets.get(prompt, []) + alts))
        self.fallback = fallback

    def __call__(self, prompt: str) -> list[str]:
        if prompt in self.sets:
            return [a for a in self.sets[prompt] if _norm(a) != _norm(prompt)]
        if self.fallback is None:
            files = ", ".join(str(p) for p in self.paths)
            raise ValueError(f"prompt {prompt!r} has no contrastive set in {files} and no fallback is set")
        return self.fallback(prompt)


# ----------------------------------------------------------------------------------------------
# Specs

CONTRASTIVE_NAMES: tuple[str, ...] = ("shapes", "rules", "lm", "json")
_SPEC_KEYS = {
    "shapes": set(), "rules": {"k", "seed", "kinds"},
    "lm": {"path", "k", "fallback", "max_new_tokens", "min_overlap"},
    "json": {"path", "fallback"},
}


def make_contrastive(spec=None, device: str = "cpu") -> Contrastive:
    """A contrastive-prompt generator from a spec:

    "shapes" (default; ShapesWorld's grammar), "rules", {"name": "rules", "k", "seed", "kinds"},
    {"name": "lm", "path": MODEL, "k": 8, "fallback": "rules", "max_new_tokens", "min_overlap"},
    {"name": "json", "path": FILE or [FILES], "fallback": "rules"}. A fallback is itself a spec,
    or None (lm: no top-up; json: a prompt missing from the files is an error).
    """
    if spec is None:
        spec = DEFAULT_CONTRASTIVE
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a contrastive spec must be one of {', '.join(CONTRASTIVE_NAMES)} or a mapping "
                         f"with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in _SPEC_KEYS:
        raise ValueError(f"unknown contrastive source {name!r}; allowed: {', '.join(CONTRASTIVE_NAMES)}")
    extra = sorted(set(spec) - _SPEC_KEYS[name] - {"name"})
    if extra:
        raise ValueError(f"unknown keys {extra} for contrastive source {name!r}; allowed: {sorted(_SPEC_KEYS[name]) or 'none'}")
    if name == "shapes":
        from ..world import ShapesWorld

        return ShapesWorld().contrastive
    if name == "rules":
        return RuleContrastive(k=spec.get("k"), seed=spec.get("seed", 0), kinds=spec.get("kinds", KINDS))
    if "path" not in spec:
        raise ValueError(f"the {name} contrastive source needs 'path'")
    fallback_spec = spec.get("fallback", "rules")
    fallback = None if fallback_spec is None else make_contrastive(fallback_spec, device)
    if name == "json":
        return JsonContrastive(spec["path"], fallback)
    return LMContrastive(spec["path"], k=spec.get("k", 8), fallback=fallback,
                         max_new_tokens=spec.get("max_new_tokens", 96),
                         min_overlap=spec.get("min_overlap", 0.5), device=device)
