"""Small helpers shared by the reward modules (argument checks, ragged prompt sets, the text cache)."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch


def check_prompt_sets(images: torch.Tensor, prompt_sets: list[list[str]]) -> int:
    """Validate `score_prompts` arguments; return K, the common number of prompts per image."""
    if isinstance(prompt_sets, (str, bytes)) or not isinstance(prompt_sets, (list, tuple)):
        raise ValueError(f"prompt_sets must be a list of lists of prompts, got {type(prompt_sets).__name__}")
    if len(prompt_sets) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images for {len(prompt_sets)} prompt sets")
    if not prompt_sets:
        return 0
    sizes = {len(s) for s in prompt_sets}
    if len(sizes) != 1:
        raise ValueError(f"every prompt set must have the same length K, got lengths {sorted(sizes)}")
    k = sizes.pop()
    if k < 1:
        raise ValueError("prompt sets must not be empty")
    for s in prompt_sets:
        if isinstance(s, str) or not all(isinstance(p, str) for p in s):
            raise ValueError(f"each prompt set must be a list of strings, got {s!r}")
    return k


def pad_prompt_sets(sets: list[list[str]]) -> tuple[list[list[str]], torch.Tensor]:
    """Pad ragged prompt sets to a common length with their first prompt; return the mask [B, K]
    (True where a prompt is real)."""
    k = max((len(s) for s in sets), default=1)
    padded = [list(s) + [s[0]] * (k - len(s)) for s in sets]
    mask = torch.tensor([[j < len(s) for j in range(k)] for s in sets], dtype=torch.bool)
    return padded, mask


def positive_float(value, what: str, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (or >= 0), else a ValueError naming it."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or float(value) < 0 or (float(value) == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def prompt_index(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Unique prompts (first-seen order) and, for each prompt, its index among them."""
    unique: dict[str, int] = {}
    idx = [unique.setdefault(p, len(unique)) for p in prompts]
    return list(unique), torch.tensor(idx, dtype=torch.long)


class TextCache:
    """Each distinct prompt's encoding, computed once without gradients and kept: TextNorm asks for
    the same prompts (and their contrastive ones) at every step. Emptied when it would grow past
    `size` entries; `size=0` keeps nothing. New prompts are encoded `chunk` at a time."""

    def __init__(self, size: int, chunk: int = 256) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {size!r}")
        self.size, self.chunk = size, chunk
        self._items: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        """encode(prompts) [N, ...] on `device`, each distinct prompt encoded once."""
        unique, idx = prompt_index(list(prompts))
        if self.size == 0:
            with torch.no_grad():
                return encode(unique)[idx.to(device)]
        missing = [p for p in unique if p not in self._items]
        if missing:
            if len(self._items) + len(missing) > self.size:
                self._items.clear()
            with torch.no_grad():
                for start in range(0, len(missing), self.chunk):
                    chunk = missing[start:start + self.chunk]
                    self._items.update(zip(chunk, encode(chunk)))
        return torch.stack([self._items[p] for p in unique])[idx.to(device)]
