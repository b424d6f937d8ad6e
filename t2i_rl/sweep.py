"""Several training runs side by side on one machine, each with an equal share of its cores.

The benchmarks that compare runs (`benchmarks/agents_at_equal_budget.py`,
`benchmarks/overoptimization.py`) launch `python -m t2i_rl.train` through `run_side_by_side`: N
runs at a time, each with `threads=cores/N`, so that no run gets more of the machine than another,
a log beside each run folder (`<run>.log`) and its curves drawn next to it (`<run>.png`, by
`python -m t2i_rl.plot`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def check_parallel(parallel: int) -> int:
    """`parallel` if this machine has that many cores, else a ValueError naming what is allowed."""
    cores = os.cpu_count() or 1
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= cores:
        raise ValueError(f"--parallel must be in [1, {cores}] (the cores here), got {parallel!r}")
    return parallel


def parallel_arg(text: str) -> int:
    """argparse `type` of a benchmark's --parallel: one `error:` line for a bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    try:
        return check_parallel(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A benchmark's own arguments, and the train overrides after `--` that every run gets."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def run_side_by_side(runs: Sequence[tuple[Path, Sequence[str]]], parallel: int = 1) -> dict[Path, int]:
    """Train each (run folder, train overrides) `parallel` at a time; return each run's exit code.

    `output_dir`, `threads` and `samples.every=0` (no image grids: they cost time and are not what
    is compared) are set here, before the overrides, which give the rest."""
    parallel = check_parallel(parallel)
    threads = (os.cpu_count() or 1) // parallel if parallel > 1 else 0
    codes: dict[Path, int] = {}
    for start in range(0, len(runs), parallel):
        procs = []
        for run, overrides in runs[start:start + parallel]:
            run.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "t2i_rl.train", f"threads={threads}", "samples.every=0",
                   f"output_dir={run}", *overrides]
            log = Path(f"{run}.log").open("a")
            procs.append((run, time.perf_counter(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for run, began, proc, log in procs:
            codes[run] = proc.wait()
            log.close()
            print(f"{run.name}: exit {codes[run]}, {time.perf_counter() - began:.0f} s (log: {run}.log)", flush=True)
            if (run / "metrics.jsonl").is_file():
                subprocess.run([sys.executable, "-m", "t2i_rl.plot", str(run), "--out", f"{run}.png"],
                               stdout=subprocess.DEVNULL, check=False)
    return codes
