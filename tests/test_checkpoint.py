"""Checkpoints: the trainer state round-trips through safetensors + JSON, nothing a run folder holds
is unpickled, a save killed at any point leaves a loadable checkpoint, diverged weights are never
saved, and a full disk is one clear error that keeps the previous checkpoint."""

import errno
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_rl import checkpoint
from t2i_rl.checkpoint import (LEGACY_STATE_FILE, LORA_FILE, STATE_FILE, TENSORS_FILE, DiskFull, find_checkpoint,
                               load_checkpoint, load_trainer_state, save_checkpoint)
from t2i_rl.logger import truncate_jsonl
from t2i_rl.models import build_pipeline, build_tokenizer
from t2i_rl.policy import DiffusionPolicy


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_policy(tokenizer):
    def make(lora_rank: int | None = 4) -> DiffusionPolicy:
        pipe = build_pipeline(tokenizer, text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
        return DiffusionPolicy(pipe, num_steps=2, guidance_scale=3.0, eta=1.0, lora_rank=lora_rank)

    return make


@pytest.fixture
def policy(make_policy):
    return make_policy()


def weights(policy: DiffusionPolicy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.trainable_parameters()]


def change_weights(policy: DiffusionPolicy) -> None:
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.5)


def assert_same(a, b, where: str = "state") -> None:
    """Equal values of the very same types (tuples stay tuples), NaN equal to NaN, -0.0 not 0.0."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    else:
        assert a == b, where


def every_kind_of_state() -> dict:
    """What the trainer saves (optimizer, scaler, RNG states, trackers, statistics) and more."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.full((3,), 0.25)
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    generator = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(5)
    rng.random(7)
    np.random.seed(11)
    shared = torch.arange(4)
    agent = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "generator": generator.get_state(),
             "env": {"np": rng.bit_generator.state, "torch": torch.Generator().manual_seed(9).get_state()},
             "tracker": {"a red circle": [0.5, 1.25], "$dollar/slash prompt": [], "": [float("nan")]},
             "sb3": {"numpy_rng": np.random.get_state(), "num_timesteps": 2 ** 70, "seeded": True}}
    return {
        "epoch": 3, "agent": agent, "torch_rng": torch.get_rng_state(),
        "hack_threshold": None, "hack_threshold_set": 0.75, "best_gold": -1.0,
        "stopper": [(0.5, 0.25), (float("-inf"), float("inf")), (-0.0, 1e-310)],
        "rank_rngs": [{"generator": generator.get_state(), "torch": torch.get_rng_state()}] * 2,
        "deepspeed_shards": [optimizer.state_dict(), {"zero_stage": 2, "ds_version": "0.19"}],
        "tensors": {"float16": torch.tensor([1.5, -2.0], dtype=torch.float16),
                    "bfloat16": torch.tensor([3.0], dtype=torch.bfloat16),
                    "float64": torch.tensor([[math.pi, float("nan")]], dtype=torch.float64),
                    "int64": torch.tensor([-(2 ** 62), 7]), "bool": torch.tensor([True, False]),
                    "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
                    "strided": torch.arange(12.0).view(3, 4).t()},
        "aliased": [shared, shared], "clashing keys": {0: torch.ones(1), "0": torch.zeros(1), (1, "b"): "tuple key"},
        "empty": {"dict": {}, "list": [], "tuple": ()}, "text": "ünïcode \" \n", "flag": False,
    }


def test_every_kind_of_trainer_state_round_trips_through_safetensors_and_json(policy, tmp_path):
    state = every_kind_of_state()
    save_checkpoint(tmp_path / "last", policy, state)
    assert sorted(os.listdir(tmp_path / "last")) == sorted([LORA_FILE, STATE_FILE, TENSORS_FILE])
    json.loads((tmp_path / "last" / STATE_FILE).read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    loaded = load_checkpoint(tmp_path / "last", policy)
    assert_same(state, loaded)
    # and they work for their callers: the generators, numpy's and the optimizer continue the same
    resumed = torch.Generator()
    resumed.set_state(loaded["agent"]["generator"])
    assert torch.equal(torch.randn(4, generator=resumed), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded["agent"]["env"]["np"]
    expected = np.random.default_rng(5)
    expected.random(7)
    assert rng.random() == expected.random()
    np.random.set_state(loaded["agent"]["sb3"]["numpy_rng"])
    assert np.random.random() == np.random.RandomState(11).random()
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    optimizer.load_state_dict(loaded["agent"]["optimizer"])
    assert torch.equal(optimizer.state[param]["exp_avg"], state["agent"]["optimizer"]["state"][0]["exp_avg"])


def test_tensors_that_share_storage_are_saved_as_copies(policy, tmp_path):
    """A module's state_dict holds tied weights as views of one parameter (SB3's policy heads share
    their step embedding): each is saved, and comes back, as a tensor of its own."""
    tied = torch.nn.Embedding(4, 3)
    heads = torch.nn.ModuleDict({"pi": tied, "vf": tied, "features": tied})
    heads_state = heads.state_dict()
    assert len({t.data_ptr() for t in heads_state.values()}) == 1
    save_checkpoint(tmp_path / "last", policy, {"heads": heads_state})
    loaded = load_checkpoint(tmp_path / "last", policy)["heads"]
    assert set(loaded) == set(heads_state)
    assert all(torch.equal(loaded[k], heads_state[k]) for k in heads_state)


def test_a_state_holding_an_object_is_refused_before_anything_is_written(policy, tmp_path):
    save_checkpoint(tmp_path / "last", policy, {"epoch": 0})
    with pytest.raises(TypeError, match=r"trainer state's agent/optimizer/0/loss_scaler: a SimpleNamespace"):
        save_checkpoint(tmp_path / "last", policy, {"agent": {"optimizer": [{"loss_scaler": SimpleNamespace()}]}})
    assert os.listdir(tmp_path) == ["last"] and load_trainer_state(tmp_path / "last") == {"epoch": 0}


class Marker:
    """A pickle that, when loaded, creates the folder `path`: what a crafted run folder would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_crafted_pickle_in_a_run_folder_is_refused_without_running_it(make_policy, tmp_path):
    proof = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(Marker(proof)))
    assert proof.is_dir()  # the crafted pickle is live: loading it runs code
    marker = tmp_path / "ran"
    policy = make_policy()
    save_checkpoint(tmp_path / "last", policy, {"epoch": 0})
    before = weights(policy)
    torch.save({"epoch": 5, "agent": Marker(marker)}, tmp_path / "last" / LEGACY_STATE_FILE)
    change_weights(policy)
    changed = weights(policy)
    with pytest.raises(ValueError, match=r"earlier t2i-rl.*pickle.*no longer read.*start afresh in another output_dir"):
        load_checkpoint(tmp_path / "last", policy)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), changed))  # refused before any weight loaded
    # the pickle in the new files' place: neither reader unpickles
    (tmp_path / "last" / LEGACY_STATE_FILE).unlink()
    for name in (STATE_FILE, TENSORS_FILE):
        good = (tmp_path / "last" / name).read_bytes()
        (tmp_path / "last" / name).write_bytes(pickle.dumps(Marker(marker)))
        with pytest.raises(ValueError, match="holds a trainer state that cannot be read"):
            load_checkpoint(tmp_path / "last", policy)
        assert not marker.exists()
        (tmp_path / "last" / name).write_bytes(good)
    load_checkpoint(tmp_path / "last", policy)
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), before))
    # a fully fine-tuned UNet's weights: a pickled .bin in place of the safetensors is not read
    full = make_policy(lora_rank=None)
    save_checkpoint(tmp_path / "full", full, {"epoch": 0})
    unet = tmp_path / "full" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(Marker(marker), unet / "diffusion_pytorch_model.bin")
    with pytest.raises(EnvironmentError):
        load_checkpoint(tmp_path / "full", full)
    assert not marker.exists()


class Died(BaseException):
    """The process was killed here."""


def die_at(monkeypatch, target: str, call: int = 1) -> None:
    """Kill the next save at the `call`-th call of `target` ("save_file", "rename"); as a killed
    process would, it cleans nothing up."""
    calls = []
    real = Path.rename if target == "rename" else getattr(checkpoint, target)

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise Died(target)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "shutil", SimpleNamespace(rmtree=lambda *args, **kwargs: None,
                                                              disk_usage=shutil.disk_usage))
    if target == "rename":
        monkeypatch.setattr(Path, "rename", dying)
    else:
        monkeypatch.setattr(checkpoint, target, dying)


@pytest.mark.parametrize("target, call, survivor", [
    ("save_file", 1, 0),  # while writing the new state
    ("rename", 1, 0),  # before `last` -> `.last.old`
    ("rename", 2, 0),  # between the renames: no `last`, `.last.old` is the checkpoint
    ("rename", 3, 1),  # after both: the new `last`, a stale `.last.old` (nothing renames a third time)
])
def test_a_save_killed_at_any_point_leaves_a_complete_checkpoint(policy, tmp_path, monkeypatch, target, call,
                                                                 survivor):
    last = tmp_path / "checkpoints" / "last"
    saved = []
    for epoch in range(2):
        saved.append(weights(policy))
        if epoch == 1:
            die_at(monkeypatch, target, call)
        try:
            save_checkpoint(last, policy, {"epoch": epoch, "stopper": [(0.5, 0.25)] * epoch})
        except Died:
            pass
        monkeypatch.undo()
        change_weights(policy)
    assert len(os.listdir(last.parent)) > 1  # a dead save's leftovers
    assert find_checkpoint(last).name == (".last.old" if (target, call) == ("rename", 2) else "last")
    state = load_checkpoint(last, policy)
    assert state == {"epoch": survivor, "stopper": [(0.5, 0.25)] * survivor}
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), saved[survivor]))
    # the next save clears the leftovers and is the checkpoint
    save_checkpoint(last, policy, {"epoch": 2})
    assert os.listdir(last.parent) == ["last"] and load_trainer_state(last) == {"epoch": 2}


def test_nothing_to_load_is_one_clear_error(policy, tmp_path):
    assert find_checkpoint(tmp_path / "last") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "last", policy)


@pytest.mark.parametrize("lora_rank", [4, None], ids=["lora", "full"])
def test_non_finite_weights_are_refused_and_the_previous_checkpoint_kept(make_policy, tmp_path, lora_rank):
    policy = make_policy(lora_rank)
    save_checkpoint(tmp_path / "last", policy, {"epoch": 0})
    good = weights(policy)
    name, param = next((n, p) for n, p in policy.unet.named_parameters() if p.requires_grad and "up_blocks" in n)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            param.view(-1)[1] = bad
        with pytest.raises(ValueError, match=r"weight .*up_blocks.* holds NaN or inf .*previous checkpoint is kept"):
            save_checkpoint(tmp_path / "last", policy, {"epoch": 1})
        assert os.listdir(tmp_path) == ["last"]
    assert "up_blocks" in name
    assert load_checkpoint(tmp_path / "last", policy) == {"epoch": 0}
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), good))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Disk:
    """`shutil.disk_usage` as on a disk with `free` bytes free (None: the real figure)."""

    def __init__(self, monkeypatch) -> None:
        self.free: int | None = None
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage",
                            lambda path: real(path) if self.free is None else real(path)._replace(free=self.free))


@pytest.mark.parametrize("lora_rank", [4, None], ids=["lora", "full"])
def test_a_disk_without_room_is_one_clear_error_before_anything_is_written(make_policy, tmp_path, monkeypatch,
                                                                           lora_rank):
    policy = make_policy(lora_rank)
    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, policy, {"epoch": 0})
    good, size = weights(policy), folder_bytes(last)
    change_weights(policy)
    disk = Disk(monkeypatch)
    disk.free = size // 2
    with pytest.raises(DiskFull) as err:
        save_checkpoint(last, policy, {"epoch": 1})
    message = str(err.value)
    match = re.fullmatch(rf"not enough disk space to save the checkpoint {re.escape(str(last))}: it needs "
                         rf"(\d+\.\d) MiB, and {re.escape(str(last.parent))} has {size // 2 / 2**20:.1f} MiB free; the "
                         r"previous checkpoint is kept \(free some space, or move the run folder to a larger disk, "
                         r"then run the same command to resume\)", message)
    assert match, message
    assert size / 2**20 <= float(match[1]) <= size / 2**20 + 1.2  # what a checkpoint takes, and a margin
    assert os.listdir(last.parent) == ["last"]  # nothing written, nothing left
    assert load_checkpoint(last, policy) == {"epoch": 0}
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), good))
    disk.free = int(float(match[1]) * 2**20) + 2**17  # room for it: saved
    change_weights(policy)
    save_checkpoint(last, policy, {"epoch": 1})
    assert load_trainer_state(last) == {"epoch": 1}


FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error, free", [
    (FULL, None),  # Python's own writers
    (checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), None),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 166720 vs 166612"), 0),  # torch's
], ids=["oserror", "safetensors", "torch_unexpected_pos"])
def test_a_disk_that_fills_during_the_write_keeps_the_previous_checkpoint(policy, tmp_path, monkeypatch, error,
                                                                          free):
    """The space was there when the save began; the writer got half the state file out, then failed as
    it does on a full disk (saying so, or, like torch's, only that it wrote less than it meant to)."""
    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, policy, {"epoch": 0})
    good = weights(policy)
    change_weights(policy)
    disk = Disk(monkeypatch)
    real = checkpoint.save_file

    def half_written(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        os.truncate(filename, os.path.getsize(filename) // 2)
        disk.free = free
        raise error

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(DiskFull, match=rf"^not enough disk space to save the checkpoint {re.escape(str(last))}: "
                                       rf"it needs \d+\.\d MiB, and {re.escape(str(last.parent))} filled up while "
                                       rf"writing it \({type(error).__name__}: .+\) and has \d+\.\d MiB free; the "
                                       r"previous checkpoint is kept \("):
        save_checkpoint(last, policy, {"epoch": 1})
    assert os.listdir(last.parent) == ["last"]  # the half-written one is gone
    assert load_checkpoint(last, policy) == {"epoch": 0}
    assert all(torch.equal(a, b) for a, b in zip(weights(policy), good))


def test_a_write_error_with_room_on_the_disk_is_not_called_a_full_disk(policy, tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, policy, {"epoch": 0})

    def refused(tensors, filename, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(filename))

    monkeypatch.setattr(checkpoint, "save_file", refused)
    with pytest.raises(PermissionError):
        save_checkpoint(last, policy, {"epoch": 1})
    assert os.listdir(last.parent) == ["last"] and load_trainer_state(last) == {"epoch": 0}


def test_truncate_jsonl_drops_a_partial_last_line_and_refuses_a_broken_one_before_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "reward/proxy": e / 10}) for e in range(4)]
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "rew')  # killed mid-write
    truncate_jsonl(path, 2)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "rew')
    truncate_jsonl(path, 9)
    assert path.read_text().splitlines() == lines
    path.write_text(lines[0] + '\n{"epo\n' + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        truncate_jsonl(path, 9)
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
