"""Free-text prompt sets: files given as `file:PATH` and named sets shipped in `assets/prompts/`.

A prompt file is a .txt with one prompt per line (blank lines and lines starting with "#" are
skipped) or a .json list of strings. The shipped sets are DDPO-style: `animals` ("a photo of a
<animal>") and `activities` ("a <animal> <activity>").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

PROMPT_ASSETS = Path(__file__).resolve().parent / "assets" / "prompts"
FILE_PREFIX = "file:"
# a TextNorm reward's contrastive prompts when its spec names none (t2i_rl.rewards.make_contrastive);
# here, with no heavy import, so that the config checks read the same default
DEFAULT_CONTRASTIVE = "shapes"


def shipped_prompt_sets() -> list[str]:
    """The names of the prompt sets shipped in `PROMPT_ASSETS` (file names without .txt)."""
    return sorted(p.stem for p in PROMPT_ASSETS.glob("*.txt"))


def load_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a .txt (one per line) or .json (a list of strings) file; errors name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix not in (".txt", ".json"):
        raise ValueError(f"prompt file {path} must be a .txt (one prompt per line) or a .json list, got {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".txt":
        prompts = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    else:
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(prompts, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got a {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{path}: item #{i} must be a non-empty string, got {p!r}")
        prompts = [p.strip() for p in prompts]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompt_set(source: str, also_allowed: Sequence[str] = ()) -> list[str]:
    """The prompts of `file:PATH` or of a shipped set by name.

    `also_allowed` names the caller's other sources, listed in the error for an unknown name."""
    if source.startswith(FILE_PREFIX):
        return load_prompt_file(source[len(FILE_PREFIX):])
    shipped = shipped_prompt_sets()
    if source not in shipped:
        allowed = ", ".join([*also_allowed, *shipped])
        raise ValueError(
            f"unknown prompt source {source!r}; allowed: {allowed}, file:PATH (a .txt with one prompt "
            "per line or a .json list), a list of prompts, or a callable (n, rng) -> list[str]")
    return load_prompt_file(PROMPT_ASSETS / f"{source}.txt")
