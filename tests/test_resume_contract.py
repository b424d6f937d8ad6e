"""Resume is a contract: a run folder resumes only under the config it was started with (or
resume=force, which says what it changes and applies it), resume=false never writes into a folder
that holds a run, and only one run at a time holds it."""

import json
import os
import socket
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i_rl import runlock
from t2i_rl.train import CONFIG_DIR, Trainer, validate
from tests.agents.test_train import compose_cfg, tiny_agent_overrides, tiny_overrides


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i_rl.train", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def one_epoch(tiny_assets, tmp_path_factory):
    """A finished one-epoch tiny run: its folder and its overrides."""
    run_dir = tmp_path_factory.mktemp("contract") / "run"
    overrides, reward = tiny_overrides(tiny_assets, run_dir, epochs=1)
    Trainer(compose_cfg((overrides, reward))).fit()
    return run_dir, overrides, reward


@pytest.mark.parametrize("change, diff", [
    (["agent.lr=0.001"], "agent.lr: 0.0003 -> 0.001"),
    (["seed=1"], "seed: 0 -> 1"),
    (["agent=rwr"], "agent.name: ddpo -> rwr"),
])
def test_a_changed_config_does_not_resume(one_epoch, change, diff):
    run_dir, overrides, reward = one_epoch
    ddpo_only = {"agent=ddpo", *tiny_agent_overrides("ddpo")}
    changed = [o for o in overrides if "agent=rwr" not in change or o not in ddpo_only] + change
    with pytest.raises(ValueError) as err:
        validate(compose_cfg((changed, reward)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"output_dir = {run_dir} holds a run of another config (")
    assert diff in message and "resume=force continues it" in message
    validate(compose_cfg(([*overrides, "epochs=3", "budget_minutes=5", "threads=1"], reward)))  # how long, not what


def test_resume_force_says_what_it_applies_and_applies_the_new_lr(one_epoch, tmp_path, capsys):
    import shutil

    run_dir, overrides, reward = one_epoch
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    overrides = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={copy}"]
    trainer = Trainer(compose_cfg(([*overrides, "agent.lr=0.001", "resume=force", "epochs=2"], reward)))
    assert f"resume=force: {copy} continues with agent.lr: 0.0003 -> 0.001" in capsys.readouterr().out
    assert trainer.start_epoch == 1
    assert [g["lr"] for g in trainer.agent.optimizer.param_groups] == [0.001]
    assert OmegaConf.load(copy / "config.yaml").agent.lr == 0.001  # the contract from now on
    trainer.fit()


def run_files(run_dir) -> dict:
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_false_on_a_folder_holding_a_run_is_refused_and_changes_nothing(one_epoch, refused_by_train):
    run_dir, overrides, reward = one_epoch
    before = run_files(run_dir)
    with pytest.raises(ValueError) as err:
        validate(compose_cfg(([*overrides, "resume=false"], reward)))
    assert str(err.value) == (
        f"output_dir = {run_dir} holds a run (config.yaml, metrics.jsonl, tb, evals, checkpoints), which "
        "resume=false would mix a new run into: resume=true continues it, resume=force continues it with this "
        "config, another output_dir starts afresh")
    assert refused_by_train([f"output_dir={run_dir}", "resume=false"]) == (2, [f"error: {err.value}"])
    assert run_files(run_dir) == before


def test_resume_false_starts_in_a_folder_without_a_run(tiny_assets, tmp_path):
    """A new folder, or one holding only Hydra's log and a killed run's lock, is not a run."""
    run_dir = tmp_path / "run"
    overrides, reward = tiny_overrides(tiny_assets, run_dir)
    validate(compose_cfg(([*overrides, "resume=false"], reward)))
    run_dir.mkdir()
    (run_dir / "train.log").write_text("")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    validate(compose_cfg(([*overrides, "resume=false"], reward)))


def test_a_changed_config_on_the_command_line_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"output_dir={run_dir}"])
    (run_dir / "checkpoints" / "last").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    proc = cli(f"output_dir={run_dir}", "agent.lr=0.001")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: output_dir = ") and "(agent.lr: 0.0003 -> 0.001)" in proc.stderr


def test_a_run_holds_its_folder_and_a_second_one_is_refused(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(compose_cfg(tiny_overrides(tiny_assets, run_dir)))
    assert json.loads((run_dir / runlock.LOCK_FILE).read_text()) == {"pid": os.getpid(),
                                                                     "host": socket.gethostname()}
    proc = cli(f"output_dir={run_dir}")  # this process is alive and holds it
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: output_dir = {run_dir} is in use by another run: pid {os.getpid()} on host "
        f"{socket.gethostname()!r} holds {run_dir / runlock.LOCK_FILE} (delete it only once that run is gone)"]
    trainer.fit()
    assert not (run_dir / runlock.LOCK_FILE).exists()  # released at the end


def test_a_stale_lock_is_taken_over_with_a_message_and_another_hosts_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / runlock.LOCK_FILE
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no live process now
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    # what the killed run's saves left: a temporary folder, a `.last.old` beside `last` (killed after
    # the save's renames), and a `.best.old` without `best` (killed between them: it is the checkpoint)
    checkpoints = run_dir / runlock.CHECKPOINTS
    for name in ("last", ".last.old", ".last.k3j_x9", ".best.old", ".best.tmp9"):
        (checkpoints / name).mkdir(parents=True)
    (checkpoints / ".nfs0001.x").write_text("")  # not a save's: left alone
    # and the temporary files of its one-rename writes, beside finished ones
    (run_dir / runlock.EVALS).mkdir()
    for name in ("evals/epoch0000.json", "evals/.epoch0050.npz.tmp", "evals/.epoch0050.json.tmp", ".config.yaml.tmp"):
        (run_dir / name).write_text("")
    runlock.check(run_dir)
    runlock.acquire(run_dir)
    taken = f"taking over the lock of {run_dir} from pid {gone.pid}, which is no longer running\n"
    assert capsys.readouterr().err == taken
    assert sorted(os.listdir(checkpoints)) == [".best.old", ".nfs0001.x", "last"]
    assert os.listdir(run_dir / runlock.EVALS) == ["epoch0000.json"] and not (run_dir / ".config.yaml.tmp").exists()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    runlock.release(run_dir)
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "another-host"}))
    with pytest.raises(runlock.RunFolderInUse, match="in use by another run: pid .* on host 'another-host'"):
        runlock.acquire(run_dir)
