"""One logger facade for a run: TensorBoard events and `metrics.jsonl`, with the same numbers.

Tag names are the stable ones listed in the README (`reward/proxy`, `reward/gold`,
`policy/kl_to_base`, `eval/train/gold_correct`, `eval/heldout/gold_correct`, ...). The
custom-scalars charts "reward vs human" overlay the proxy reward and the gold reward, so
overoptimization shows as two curves parting.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import custom_scalars

# TensorBoard "Custom Scalars" dashboard: chart name -> tag regexes drawn on one plot.
LAYOUT = {
    "overoptimization": {
        "reward vs human": ["Multiline", ["reward/proxy", "reward/gold"]],
        "reward vs human (eval, training prompts)": ["Multiline", ["eval/train/proxy$", "eval/train/gold$",
                                                                   "eval/train/gold_correct"]],
        "reward vs human (eval, held-out prompts)": ["Multiline", ["eval/heldout/proxy$", "eval/heldout/gold$",
                                                                   "eval/heldout/gold_correct"]],
        "KL to base": ["Multiline", ["policy/kl_to_base"]],
    },
}


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item() if value.numel() else float("nan")
    elif isinstance(value, np.ndarray):
        value = float(value.mean()) if value.size else float("nan")
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool):
        return float(value)
    return None


class RunLogger:
    """Writes scalars, images and hyperparameters of one run; only the main process writes."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None) -> None:
        """`purge_step`: the first epoch this run logs (None: 0). What the folder already holds from that
        epoch on, the epochs after the checkpoint a resumed run continues, is dropped, so that curves
        and metrics.jsonl hold each epoch once; from 0, everything (a run killed before its first
        checkpoint starts again from the beginning)."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer: SummaryWriter | None = None
        self._jsonl = self.run_dir / "metrics.jsonl"
        if enabled:
            start = purge_step or 0
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self._jsonl, start - 1)
            # a purge step hides the events of earlier event files from that step on
            tb = self.run_dir / "tb"
            self.writer = SummaryWriter(str(tb), purge_step=start if tb.is_dir() and any(tb.iterdir()) else None)
            self.writer.file_writer.add_summary(custom_scalars(LAYOUT))

    def hparams(self, table: dict[str, Any]) -> None:
        """Hyperparameters once, as a markdown table (CleanRL style)."""
        if not self.enabled:
            return
        rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(table.items()))
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Scalars to TensorBoard and one JSON line; returns the numbers written."""
        numbers = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
        if not self.enabled:
            return numbers
        for tag, value in numbers.items():
            self.writer.add_scalar(tag, value, step)
        # null for NaN and inf (a skipped step's gradient norm): every line stays strict JSON
        record = {"epoch": step, **{k: (v if math.isfinite(v) else None) for k, v in numbers.items()}}
        with self._jsonl.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self.writer.flush()
        return numbers

    def images(self, tag: str, grid: torch.Tensor | np.ndarray, step: int, caption: str = "") -> None:
        """An image grid [3, H, W] in [0, 1] under `samples/`, captioned in a text entry."""
        if not self.enabled:
            return
        self.writer.add_image(tag, grid, step, dataformats="CHW")
        if caption:
            self.writer.add_text(tag + "/caption", caption, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_jsonl(path: str | Path, last_epoch: int) -> None:
    """Keep the lines of epochs <= last_epoch (a resumed run rewrites what came after). A last line
    that is not JSON is the partial write of a process that died, and is dropped; the file is
    replaced in one rename, so a crash here keeps the old lines."""
    path = Path(path)
    if not path.exists():
        return
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    keep = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == lines[-1][0]:
                break
            raise ValueError(f"{path}: line {number} is not JSON, and only the last line (the write of a run "
                             "that died) can be partial") from None
        if record["epoch"] <= last_epoch:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
