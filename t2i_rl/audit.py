"""Check the judge by eye on what the policy draws: `python -m t2i_rl.audit RUN_DIR [--epochs 0 last]`.

The judge stands in for human raters, so a run's gold numbers are only as good as its perception of
the policy's images, which need not look like the renders its thresholds were set on. This draws a
sheet of a run's saved evaluation images (evals/epochNNNN.npz): one row per image of a set (the
same prompt and fixed noise in every column, so the rows are paired), one column per chosen epoch,
and under each image the judge's verdicts re-computed now (ok, NO, or ? where it is unsure), its
score and the proxy reward the run stored, so that a person sees where the judge and their own
eyes disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from t2i_rl.world import ATTRIBUTES, ShapesWorld

LABELS = {"count": "count", "color": "colour", "shape": "shape", "background": "bg"}
MARKS = {True: ("ok", (0, 120, 0)), False: ("NO", (200, 0, 0)), None: ("?", (210, 120, 0))}
FONT_SIZE = 12
LINE = 16  # pixels per line of text
PAD = 8
PROMPT_WIDTH = 200  # the first column: the image's index and its prompt, wrapped
CAPTION_WIDTH = 170  # the narrowest cell, so that a caption fits under an image of any --scale
CAPTION_LINES = 4  # verdicts (two lines), the judge's score, the proxy reward
EPOCH_FILE = re.compile(r"epoch(\d+)\.npz")


class AuditError(ValueError):
    """Bad input: reported as one `error:` line, before anything is written."""


@dataclass(frozen=True)
class Cell:
    """One image of a row at one epoch, as the judge reads it now."""

    epoch: int
    image: np.ndarray  # uint8 [H, W, 3]
    verdicts: dict[str, bool | None]  # attribute -> holds; None where the judge is unsure
    score: float  # the judge's score, re-computed now
    proxy: float  # the proxy reward the run stored
    run_gold: float | None  # the judge's score when the run evaluated (None: the run had no judge)


@dataclass(frozen=True)
class Row:
    """One evaluation image index: the same prompt and fixed noise at every chosen epoch."""

    index: int
    prompt: str
    cells: list[Cell]


@dataclass(frozen=True)
class EpochSummary:
    """The judge's reading, re-computed now, of every image of the set at one epoch."""

    epoch: int
    images: int
    unsure: int  # images on which the judge hesitates about some attribute
    correct: int  # all-correct among the others

    def line(self, set_name: str) -> str:
        sure = self.images - self.unsure
        rate = f"{self.correct / sure:.1%}" if sure else "n/a"
        return (f"epoch {self.epoch} ({set_name}, {self.images} images): judge all-correct {self.correct}/{sure} "
                f"sure images ({rate}), {self.unsure} unsure")


@dataclass(frozen=True)
class Audit:
    """What the sheet shows: its rows, one per image index, and each column's epoch summary."""

    set_name: str
    epochs: list[int]
    rows: list[Row]
    summaries: list[EpochSummary]


def saved_epochs(run_dir: str | Path) -> list[int]:
    """The epochs whose evaluation saved both its scores (json) and its images (npz), in order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"no run folder {run_dir}")
    folder = run_dir / "evals"
    epochs = sorted(int(m.group(1)) for p in folder.glob("epoch*.npz")
                    if (m := EPOCH_FILE.fullmatch(p.name)) and p.with_suffix(".json").is_file())
    if not epochs:
        raise AuditError(f"{folder} holds no saved evaluation images (epochNNNN.npz with its .json): the run "
                         "predates image saving or has not evaluated yet")
    return epochs


def choose_epochs(tokens: list[str], saved: list[int]) -> list[int]:
    """Epoch numbers or `last` (the latest saved evaluation), each once, in the order given."""
    chosen: list[int] = []
    for token in tokens:
        if token == "last":
            epoch = saved[-1]
        elif token.isdigit():
            epoch = int(token)
        else:
            raise AuditError(f"--epochs takes epoch numbers or 'last', got {token!r}")
        if epoch not in saved:
            raise AuditError(f"epoch {epoch} was not evaluated with its images saved; evaluated: "
                             f"{', '.join(map(str, saved))}")
        if epoch not in chosen:
            chosen.append(epoch)
    return chosen


def load_set(run_dir: str | Path, epoch: int, set_name: str) -> tuple[dict[str, list], np.ndarray]:
    """One evaluation set at one epoch: its json record (prompts, proxy, gold, ...) and its images."""
    stem = Path(run_dir) / "evals" / f"epoch{epoch:04d}"
    record = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz")) as saved:
        sets = [name for name in saved.files if name in record]
        if set_name not in sets:
            raise AuditError(f"no set {set_name!r} in the evaluation of epoch {epoch}; sets: {', '.join(sets)}")
        images = saved[set_name]
    record = record[set_name]
    if len(record["prompts"]) != len(images):
        raise AuditError(f"{stem}.npz holds {len(images)} {set_name} images for {len(record['prompts'])} prompts "
                         "in its .json")
    return record, images


def judge(images: np.ndarray, prompts: list[str]) -> tuple[list[dict[str, bool | None]], np.ndarray]:
    """The judge's verdicts now (None where it is unsure) and scores of uint8 images [N, H, W, 3],
    in the world the gold reward judges in."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    try:
        result = ShapesWorld().judge(x, prompts)
    except ValueError as err:
        raise AuditError(f"the judge cannot read these evaluations: {err}") from None
    unsure = getattr(result, "unsure", None) or {}
    verdicts = [{a: None if a in unsure and bool(unsure[a][i]) else bool(result.attributes[a][i])
                 for a in ATTRIBUTES} for i in range(len(prompts))]
    return verdicts, result.score.double().numpy()


def pick_indices(prompts: list[str], num: int) -> list[int]:
    """`num` image indices spread across the prompts: every prompt's first image before any prompt's
    second, evenly spaced within the round that does not fit whole; in evaluation order."""
    rounds: list[list[int]] = []  # rounds[k]: the k-th image of every prompt that has one
    seen: Counter[str] = Counter()
    for i, prompt in enumerate(prompts):
        if seen[prompt] == len(rounds):
            rounds.append([])
        rounds[seen[prompt]].append(i)
        seen[prompt] += 1
    picked: list[int] = []
    for members in rounds:
        take = min(num - len(picked), len(members))
        if take <= 0:
            break
        picked += [members[j] for j in np.linspace(0, len(members) - 1, take).round().astype(int)]
    return sorted(picked)


def audit(run_dir: str | Path, epochs: list[str] | None = None, set_name: str | None = None,
          num: int = 24) -> Audit:
    """The rows of the sheet as data, and each chosen epoch's summary over the whole set.

    epochs: numbers or "last" (default: 0 and last); set_name: default the first saved set (train
    when the run has one); num: rows."""
    if num < 1:
        raise AuditError(f"--num = {num} is invalid: must be >= 1")
    chosen = choose_epochs(epochs or ["0", "last"], saved_epochs(run_dir))
    if set_name is None:
        with np.load(Path(run_dir) / "evals" / f"epoch{chosen[0]:04d}.npz") as saved:
            set_name = saved.files[0]
    loaded = [load_set(run_dir, epoch, set_name) for epoch in chosen]
    prompts = loaded[0][0]["prompts"]
    for epoch, (record, _) in zip(chosen, loaded):
        if record["prompts"] != prompts:
            raise AuditError(f"the {set_name} prompts of epochs {chosen[0]} and {epoch} differ, so their images "
                             "are not paired")
    indices = pick_indices(prompts, num)
    columns, summaries = [], []
    for epoch, (record, images) in zip(chosen, loaded):
        verdicts, scores = judge(images, prompts)
        unsure = [None in v.values() for v in verdicts]
        correct = sum(all(v.values()) for v, u in zip(verdicts, unsure) if not u)
        summaries.append(EpochSummary(epoch, len(prompts), sum(unsure), correct))
        gold = record.get("gold")
        columns.append([Cell(epoch, images[i], verdicts[i], float(scores[i]), float(record["proxy"][i]),
                             None if gold is None else float(gold[i])) for i in indices])
    rows = [Row(i, prompts[i], [column[k] for column in columns]) for k, i in enumerate(indices)]
    return Audit(set_name, chosen, rows, summaries)


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on the sheet: a header line, then one band per row, each cell an image
    of `scale` pixels per pixel above its caption."""

    rows: int
    cols: int
    height: int  # of an image, before scaling
    width: int
    scale: int

    @property
    def cell_width(self) -> int:
        return max(self.width * self.scale, CAPTION_WIDTH) + PAD

    @property
    def row_height(self) -> int:
        return PAD + self.height * self.scale + CAPTION_LINES * LINE + PAD

    @property
    def header(self) -> int:
        return 2 * PAD + LINE

    @property
    def size(self) -> tuple[int, int]:
        return PAD + PROMPT_WIDTH + self.cols * self.cell_width, self.header + self.rows * self.row_height

    def image_origin(self, row: int, col: int) -> tuple[int, int]:
        """The top-left pixel of a cell's upscaled image."""
        return PAD + PROMPT_WIDTH + col * self.cell_width, self.header + row * self.row_height + PAD


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to a width in pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def caption(cell: Cell) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """The lines under an image, as (text, colour) pieces: the verdicts coloured by what they say."""
    black = (0, 0, 0)
    pieces = [[(f"{LABELS[a]} ", black), MARKS[cell.verdicts[a]], ("   ", black)] for a in ATTRIBUTES]
    score = f"judge {cell.score:.2f}"
    if cell.run_gold is not None and abs(cell.run_gold - cell.score) > 1e-6:
        score += f" (the run's: {cell.run_gold:.2f})"
    return [pieces[0] + pieces[1], pieces[2] + pieces[3], [(score, black)], [(f"proxy {cell.proxy:.3f}", black)]]


def draw_sheet(result: Audit, scale: int = 6) -> Image.Image:
    """The sheet: rows of paired images, one column per epoch, each image above its caption."""
    if scale < 1:
        raise AuditError(f"--scale = {scale} is invalid: must be >= 1")
    height, width = result.rows[0].cells[0].image.shape[:2]
    layout = SheetLayout(len(result.rows), len(result.epochs), height, width, scale)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    draw.text((PAD, PAD), f"set {result.set_name}", fill="black", font=font)
    for c, epoch in enumerate(result.epochs):
        draw.text((layout.image_origin(0, c)[0], PAD), f"epoch {epoch}", fill="black", font=font)
    for r, row in enumerate(result.rows):
        top = layout.image_origin(r, 0)[1]
        for k, line in enumerate([f"image {row.index}", *wrap(row.prompt, font, PROMPT_WIDTH - PAD)]):
            draw.text((PAD, top + k * LINE), line, fill="black", font=font)
        for c, cell in enumerate(row.cells):
            x, y = layout.image_origin(r, c)
            sheet.paste(Image.fromarray(cell.image).resize((width * scale, height * scale), Image.NEAREST), (x, y))
            for k, pieces in enumerate(caption(cell)):
                left = x
                for text, colour in pieces:
                    draw.text((left, y + height * scale + k * LINE + 2), text, fill=colour, font=font)
                    left += font.getlength(text)
    return sheet


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One `error:` line, as for every other bad input here, rather than the usage block."""
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m t2i_rl.audit", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (output_dir of t2i_rl.train)")
    p.add_argument("--epochs", nargs="+", metavar="EPOCH",
                   help="evaluation epochs, one column each in this order; 'last' is the latest saved "
                        "evaluation (default: 0 last)")
    p.add_argument("--set", dest="set_name", metavar="SET",
                   help="evaluation set: train (the training prompts) or heldout (default: train when saved)")
    p.add_argument("--num", type=int, default=24,
                   help="rows: images spread across the set's prompts, the same in every column (default: 24)")
    p.add_argument("--scale", type=int, default=6,
                   help="nearest-neighbour upscaling of each image (default: 6, 32x32 -> 192x192)")
    p.add_argument("--out", metavar="PATH", help="PNG to write (default: RUN_DIR/audit/audit_<set>_epochs_<a>-<b>.png)")
    args = p.parse_args(argv)
    try:
        result = audit(args.run_dir, args.epochs, args.set_name, args.num)
        sheet = draw_sheet(result, args.scale)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    epochs = "-".join(map(str, result.epochs))
    out = Path(args.out) if args.out else Path(args.run_dir) / "audit" / f"audit_{result.set_name}_epochs_{epochs}.png"
    for summary in result.summaries:
        print(summary.line(result.set_name))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
