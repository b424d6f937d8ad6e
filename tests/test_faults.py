"""Fault injection: a training process killed with SIGKILL at any moment, or stopped by a full disk,
and run again with the same command, ends with the very weights (bit for bit) and metrics of a run
that was never interrupted, with each epoch once in metrics.jsonl and in TensorBoard.

The kills are real: `python -m t2i_rl.train` in a process of its own, killed when a file it writes
shows the moment (an epoch's line in metrics.jsonl, a checkpoint's temporary folder, a saved
checkpoint's state), with nothing in the training code to help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_rl import runlock
from t2i_rl.checkpoint import LORA_FILE, STATE_FILE, DiskFull, load_trainer_state
from t2i_rl.train import Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides
from tests.test_checkpoint import assert_same

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3  # evaluations at epochs 0 and 2 and after the last (3): both kinds of epoch, and `best` saved twice
EXTRA = ["eval.every=2", "threads=1"]


def overrides(assets: dict, run_dir: Path) -> tuple[list[str], dict]:
    args, reward = tiny_overrides(assets, run_dir, epochs=EPOCHS)
    return args + EXTRA, reward


def hydra_value(value) -> str:
    """A config value in Hydra's override grammar."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if isinstance(value, str) else repr(value)


def command(assets: dict, run_dir: Path) -> list[str]:
    args, reward = overrides(assets, run_dir)
    return [sys.executable, "-m", "t2i_rl.train", *args, f"env.reward={hydra_value(reward)}"]


@contextmanager
def threads_restored():
    """The run's `threads=1`, which the Trainer sets in this process, undone afterwards."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> Path:
    """The run folder of the same config trained without a stop."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with threads_restored():
        Trainer(compose_cfg(overrides(tiny_assets, run_dir))).fit()
    return run_dir


# -- what the run folder shows --------------------------------------------------------------------
def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete lines (a line being written is not one yet)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def saved_epoch(run_dir: Path, since: float = 0.0) -> int | None:
    """The epoch of checkpoints/last when it was saved after `since` (time.time()), else None."""
    path = run_dir / "checkpoints" / "last" / STATE_FILE
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())["state"]["epoch"]
    except (OSError, ValueError, KeyError):  # not there, or replaced while read
        return None


def save_leftovers(run_dir: Path) -> set[str]:
    """What a save of `last` that is under way (or was killed) has in checkpoints/: its temporary
    folder, or `.last.old` between its two renames."""
    folder = run_dir / "checkpoints"
    return {p.name for p in folder.iterdir() if p.name.startswith(".last.")} if folder.is_dir() else set()


def kill_when(cmd: list[str], moment: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """Run `cmd` and SIGKILL it (its whole process group) as soon as `moment()` is true."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    try:
        while not moment():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit code {proc.returncode}) before the moment to kill it:\n"
                            f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no moment to kill the run in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def finish(cmd: list[str]) -> str:
    """Run `cmd` to its end; its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)) for k in a)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The run in `run_dir` ended as the reference did: the same LoRA weights of `last` and `best`,
    bit for bit, and the same metrics (all but the clock's), each epoch once, in metrics.jsonl and
    in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("last", "best"):
        ours, theirs = (load_file(d / "checkpoints" / name / LORA_FILE) for d in (run_dir, reference))
        assert bitwise_equal(ours, theirs), f"checkpoints/{name} holds other weights than the run never stopped"
        # and the same trainer state: optimizer moments, random streams, statistics (best: epoch and scores)
        assert_same(*(load_trainer_state(d / "checkpoints" / name) for d in (run_dir, reference)), name)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best", "last"]  # no dead save's leftovers
    assert not (run_dir / runlock.LOCK_FILE).exists()
    lines = metrics(run_dir)
    assert [x["epoch"] for x in lines] == list(range(EPOCHS + 1))  # + the final evaluation
    untimed = [[{k: v for k, v in x.items() if not k.startswith("time/")} for x in metrics(d)]
               for d in (run_dir, reference)]
    assert untimed[0] == untimed[1]
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()  # purged as TensorBoard shows it: the killed runs' events of redone epochs hidden
    for tag, epochs in [("reward/proxy", range(EPOCHS)), ("eval/heldout/gold", [0, 2, EPOCHS])]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(epochs), tag
        assert [e.value for e in events] == pytest.approx([lines[e][tag] for e in epochs], rel=1e-6), tag


# -- kills ----------------------------------------------------------------------------------------
def test_a_run_killed_after_an_epoch_resumes_to_the_weights_of_one_never_killed(tiny_assets, reference, tmp_path):
    """Killed as soon as epoch 1's line is in metrics.jsonl: its checkpoint being written, or not yet."""
    run_dir = tmp_path / "run"
    cmd = command(tiny_assets, run_dir)
    kill_when(cmd, lambda: any(x["epoch"] == 1 for x in metrics(run_dir)), tmp_path / "killed.log")
    assert saved_epoch(run_dir) in (0, 1) and (run_dir / runlock.LOCK_FILE).exists()
    stderr = finish(cmd)
    assert "taking over the lock of" in stderr  # the killed run's, whose process is gone
    assert_same_run(run_dir, reference)


def written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_run_killed_four_times_ends_as_one_never_killed(tiny_assets, reference, tmp_path):
    """Four SIGKILLs, each run resumed by the same command: as epoch 0's line is written (before
    its checkpoint, most times), in the middle of a checkpoint's write, right after a save (in the
    next epoch) and in the final evaluation. Each moment is still ahead wherever the one before
    fell, as each run resumes at or before epoch 2."""
    run_dir = tmp_path / "run"
    cmd = command(tiny_assets, run_dir)
    kill_when(cmd, lambda: bool(metrics(run_dir)), tmp_path / "kill1.log")
    assert saved_epoch(run_dir) in (None, 0)
    before = save_leftovers(run_dir)  # of a save the first kill cut short, if it did
    kill_when(cmd, lambda: bool(save_leftovers(run_dir) - before), tmp_path / "kill2.log")
    assert save_leftovers(run_dir)  # the save of 20-40 ms was cut short: its temporary folder, or `.last.old`
    start = time.time()
    kill_when(cmd, lambda: saved_epoch(run_dir, start) is not None, tmp_path / "kill3.log")
    start, images = time.time(), run_dir / "evals" / f"epoch{EPOCHS:04d}.npz"
    kill_when(cmd, lambda: written_since(images, start), tmp_path / "kill4.log")
    assert saved_epoch(run_dir) == EPOCHS - 1
    finish(cmd)
    assert_same_run(run_dir, reference)


def test_a_run_killed_before_its_first_checkpoint_starts_again_and_logs_each_epoch_once(tiny_assets, reference,
                                                                                        tmp_path):
    """Killed between epoch 0's metrics line and its checkpoint: nothing to resume, so the same
    command starts over, and the killed run's line and events of epoch 0 are not kept beside the new."""
    run_dir = tmp_path / "run"

    class Killed(BaseException):
        pass

    def killed(epoch: int) -> None:
        raise Killed

    with threads_restored():
        trainer = Trainer(compose_cfg(overrides(tiny_assets, run_dir)))
        trainer._save_last = killed
        with pytest.raises(Killed):
            trainer.fit()
        trainer.logger.close()  # flushed, as the process's end would
        assert [x["epoch"] for x in metrics(run_dir)] == [0] and saved_epoch(run_dir) is None
        again = Trainer(compose_cfg(overrides(tiny_assets, run_dir)))
        assert again.start_epoch == 0 and not (run_dir / "metrics.jsonl").read_text()
        again.fit()
    assert_same_run(run_dir, reference)


# -- a full disk ----------------------------------------------------------------------------------
def test_a_full_disk_stops_the_run_keeps_its_checkpoint_and_the_run_resumes(tiny_assets, reference, tmp_path,
                                                                            monkeypatch):
    """The disk fills up once epoch 0's checkpoint is on it: the save of epoch 1 is DiskFull, the
    checkpoint of epoch 0 stays, and once there is room the same command finishes the run."""
    run_dir = tmp_path / "run"
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return usage._replace(free=0) if saved_epoch(run_dir) == 0 else usage

    last = run_dir / "checkpoints" / "last"
    with threads_restored():
        trainer = Trainer(compose_cfg(overrides(tiny_assets, run_dir)))
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        with pytest.raises(DiskFull, match=rf"^not enough disk space to save the checkpoint {last}: it needs "
                                           rf"\d+\.\d MiB, and {last.parent} has 0\.0 MiB free; the previous "
                                           r"checkpoint is kept"):
            trainer.fit()
        trainer.logger.close()
        monkeypatch.undo()
        assert saved_epoch(run_dir) == 0 and sorted(os.listdir(last.parent)) == ["best", "last"]
        resumed = Trainer(compose_cfg(overrides(tiny_assets, run_dir)))
        assert resumed.start_epoch == 1
        resumed.fit()
    assert_same_run(run_dir, reference)
