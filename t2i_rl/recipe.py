"""What the pretraining recipes share: YAML configs with `key=value` overrides, and the
learning-rate schedule."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """A YAML file merged with `key=value` overrides (OmegaConf dot-list syntax)."""
    cfg = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def load_checked(path: str | Path, overrides: list[str], validate: Callable[[DictConfig], None]) -> DictConfig | None:
    """`load_config` + `validate`; on a bad file or value, one `error:` line and None (exit 2)."""
    try:
        cfg = load_config(path, overrides)
        validate(cfg)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    return cfg


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to `floor` of the peak (for LambdaLR)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f
