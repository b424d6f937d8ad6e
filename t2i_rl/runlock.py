"""One run per run folder: `output_dir/run.lock` names the process that trains there.

Two runs writing one folder interleave their metrics and TensorBoard events and overwrite each
other's checkpoints. The lock file holds the owner's pid and host; it is made with O_EXCL, so of
two runs starting at once one gets it. A lock whose process is gone (same host, no such pid: the
run was killed) is taken over with a message, and what the killed run's checkpoint saves left
(`checkpoint.remove_dead_saves`) and its other half-written files are cleared; a lock of another host cannot be checked from here
and is refused, naming the file to delete once that run is known to be gone.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = "run.lock"
CHECKPOINTS = "checkpoints"  # the run folder's checkpoints (t2i_rl/train.py)
EVALS = "evals"  # its evaluations' scores and images
_HELD: set[Path] = set()  # the run folders this process locked, released when it exits


class RunFolderInUse(ValueError):
    """Another live run holds the run folder's lock (a bad `output_dir` for this run)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner(path: Path) -> dict | None:
    """The lock's {"pid", "host"}, or None when there is no lock (or only an unreadable one)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def check(run_dir: str | Path) -> None:
    """Raise RunFolderInUse when another live run holds the lock of `run_dir` (no lock, this
    process's, or a stale one that `acquire` takes over are fine)."""
    path = Path(run_dir) / LOCK_FILE
    owner = _owner(path)
    if owner is None or owner.get("host") == socket.gethostname() and (
            owner["pid"] == os.getpid() or not _alive(owner["pid"])):
        return
    raise RunFolderInUse(f"output_dir = {run_dir} is in use by another run: pid {owner['pid']} on host "
                         f"{owner.get('host')!r} holds {path} (delete it only once that run is gone)")


def acquire(run_dir: str | Path) -> None:
    """Take the lock of `run_dir` for this process (re-entrant within it) until it exits or
    `release` is called; raise RunFolderInUse when another live run holds it."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        check(run_dir)
        owner = _owner(path)
        if owner is not None and owner["pid"] != os.getpid():
            print(f"taking over the lock of {run_dir} from pid {owner['pid']}, which is no longer running",
                  file=sys.stderr)
        tmp = path.with_name(f".{LOCK_FILE}.{os.getpid()}")
        tmp.write_text(mine)
        os.replace(tmp, path)
        if path.read_text() != mine:  # another run took it over at the same moment
            check(run_dir)
        if owner is None or owner["pid"] != os.getpid():  # a dead run's folder, now this process's alone
            from t2i_rl.checkpoint import remove_dead_saves

            remove_dead_saves(Path(run_dir) / CHECKPOINTS)
            _remove_dead_writes(Path(run_dir))
    else:
        with os.fdopen(fd, "w") as f:
            f.write(mine)
    _HELD.add(Path(run_dir))


def _remove_dead_writes(run_dir: Path) -> None:
    """The temporary files of a killed run's one-rename writes (`.config.yaml.tmp`, the evaluations'
    `evals/.epochNNNN.{npz,json}.tmp`): never read, and an evaluation's images are megabytes."""
    for leftover in [*run_dir.glob(".config.yaml.tmp"), *(run_dir / EVALS).glob(".epoch*.tmp")]:
        leftover.unlink(missing_ok=True)


def release(run_dir: str | Path) -> None:
    """Remove the lock of `run_dir` if this process holds it."""
    path = Path(run_dir) / LOCK_FILE
    owner = _owner(path)
    if owner is not None and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    _HELD.discard(Path(run_dir))


@atexit.register
def _release_held() -> None:
    for run_dir in list(_HELD):
        release(run_dir)
