"""Non-finite values never reach the weights: a non-finite reward is dropped, a step with a non-finite
loss or gradient is skipped, and too many bad steps in a row stop the run with its last checkpoint intact."""

import dataclasses
import json
import math
import sys

import pytest
import torch

from agents.base import TrainingDiverged
from t2i_rl.checkpoint import load_checkpoint
from t2i_rl.train import Trainer
from tests.agents.test_train import compose_cfg, tiny_overrides


class PoisonedReward:
    """A reward that, while `armed`, scores sample 0 of its first batch `value` (then disarms), or
    with `everything` every sample of every batch."""

    def __init__(self, reward, value: float, everything: bool = False) -> None:
        self.reward, self.value, self.everything, self.armed = reward, value, everything, False

    def __call__(self, images, prompts):
        out = self.reward(images, prompts)
        if not self.armed:
            return out
        self.armed = self.everything
        scores = out.scores.clone()
        scores[slice(None) if self.everything else 0] = self.value
        return dataclasses.replace(out, scores=scores)

    def __getattr__(self, name):
        return getattr(self.reward, name)


def poisoned_trainer(cfg, value: float, epochs: set[int], everything: bool = False) -> Trainer:
    """A Trainer whose proxy reward scores one training sample (or all) `value` in each of `epochs`."""
    trainer = Trainer(cfg)
    proxy = PoisonedReward(trainer.env.reward_fn, value, everything)
    trainer.env.reward_fn = proxy
    if hasattr(trainer.agent, "numpy_env"):  # SB3 samples on an env of its own
        trainer.agent.numpy_env.torch_env.vec.reward_fn = proxy
    epoch = trainer.epoch

    def epoch_with_poison(e: int):
        proxy.armed = e in epochs
        return epoch(e)

    trainer.epoch = epoch_with_poison
    return trainer


def finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize("agent, value", [("ddpo", math.nan), ("ddpo", math.inf), ("ddpo", -math.inf),
                                          ("rwr", math.nan), ("sb3", math.nan), ("ddpo_trl", math.inf)])
def test_a_nonfinite_reward_is_dropped_and_the_run_goes_on(tiny_assets, tmp_path, agent, value):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = "raw" if agent == "sb3" else "textnorm"
    cfg = compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", agent, env, epochs=3))
    trainer = poisoned_trainer(cfg, value, epochs={1})
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.fit()
    params = trainer.policy.trainable_parameters()
    assert finite(params) and any(not torch.equal(a, b) for a, b in zip(params, before))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["health/nonfinite_rewards"] for x in lines[:3]] == [0, 1, 0]
    assert all(x["health/skipped_steps"] == 0 and math.isfinite(x["reward/proxy"]) for x in lines[:3])
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("health/nonfinite_rewards")] == [0, 1, 0]
    load_checkpoint(tmp_path / "run" / "checkpoints" / "last", trainer.policy)
    assert finite(trainer.policy.trainable_parameters())
    assert all(torch.equal(a, b) for a, b in zip(trainer.policy.trainable_parameters(), params))


def test_an_epoch_without_a_finite_reward_has_no_update_and_counts_one_bad_step(tiny_assets, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", epochs=2))
    trainer = poisoned_trainer(cfg, math.nan, epochs={1}, everything=True)
    trained = []
    update = trainer.agent.update
    trainer.agent.update = lambda rollout: trained.append(len(rollout)) or update(rollout)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert trained == [4]  # epoch 0 only
    assert [(x["health/nonfinite_rewards"], x["health/skipped_steps"]) for x in lines[:2]] == [(0, 0), (4, 1)]
    assert finite(trainer.policy.trainable_parameters())


@pytest.fixture
def agent(tiny_assets, tmp_path):
    return Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run"))).agent


def test_a_step_with_a_nonfinite_loss_or_gradient_is_skipped(agent):
    params = agent.params
    before = [p.detach().clone() for p in params]
    total = sum(p.sum() for p in params)
    # a NaN loss whose gradients are finite, then finite losses with inf and NaN gradients
    for loss in (total + math.nan, (params[0] * math.inf).sum() + 1, (params[0] * math.nan).sum().nan_to_num()):
        assert not math.isfinite(agent.optimizer_step(loss))
        assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is None for p in params)
    assert agent.health.take_skipped() == 3 and agent.health.in_a_row == 3
    assert math.isfinite(agent.optimizer_step(sum(p.square().sum() for p in params) + params[0].sum()))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert agent.health.in_a_row == 0 and agent.health.take_skipped() == 0


def test_the_guard_skips_a_library_step_with_nonfinite_gradients(agent):
    """The agents whose library steps the optimizer (TRL, SB3) get `guard_steps` on it."""
    params = agent.params
    agent.guard_steps(agent.optimizer)
    before = [p.detach().clone() for p in params]
    (params[0] * math.nan).sum().backward()
    agent.optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is None for p in params)
    assert agent.health.take_skipped() == 1
    sum(p.square().sum() for p in params).backward()
    agent.optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert agent.health.in_a_row == 0


def test_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=4)
    trainer = Trainer(compose_cfg((overrides + ["health.max_bad_steps=3"], reward)))
    log_prob = trainer.policy.log_prob
    epoch = trainer.epoch

    def diverging_epoch(e: int):  # from epoch 1 on every loss is NaN: 2 optimizer steps an epoch
        trainer.policy.log_prob = (lambda *a, **k: log_prob(*a, **k) * math.nan) if e >= 1 else log_prob
        return epoch(e)

    trainer.epoch = diverging_epoch
    last = tmp_path / "run" / "checkpoints" / "last"
    with pytest.raises(TrainingDiverged, match=rf"^training diverged at epoch 2: 3 optimizer steps in a row had a "
                                               rf"non-finite loss or gradient norm \(health.max_bad_steps = 3\); the "
                                               rf"run stops, {last} \(epoch 1\) is the last good state$"):
        trainer.fit()
    weights = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    state = load_checkpoint(last, trainer.policy)
    assert state["epoch"] == 1 and finite(trainer.policy.trainable_parameters())
    assert all(torch.equal(a, b) for a, b in zip(trainer.policy.trainable_parameters(), weights))  # skipped
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["health/skipped_steps"] for x in lines] == [0, 2]
    assert lines[1]["policy/grad_norm"] is None  # strict JSON: the skipped steps' norm is not a number


def test_a_diverged_run_ends_in_one_error_line(tmp_path, monkeypatch, capsys):
    import t2i_rl.train as train

    def diverge(cfg, validated=None):
        raise TrainingDiverged("training diverged at epoch 2: ...")

    monkeypatch.setattr(train, "run", diverge)
    monkeypatch.setattr(sys, "argv", ["t2i_rl.train", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["error: training diverged at epoch 2: ..."]


@pytest.mark.parametrize("override", ["agent.lr=inf", "agent.lr=nan", "agent.weight_decay=inf",
                                      "agent.adv_clip_max=inf", "agent.clip_range=nan", "health.max_bad_steps=0"])
def test_nonfinite_hyperparameters_are_refused(override):
    from t2i_rl.train import precheck

    with pytest.raises(ValueError, match=rf"^{override.split('=')[0]} = \S+ is invalid"):
        precheck([override])


def test_clip_range_inf_still_means_no_clip():
    from t2i_rl.train import precheck

    precheck(["agent=dpok", "agent.clip_range=inf"])


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of one process, which DeepSpeed's engine needs (torn down afterwards)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_deepspeed_skips_a_step_with_a_nonfinite_loss_or_gradient(agent, one_process_group):
    """Under DeepSpeed the engine steps: its ZeRO optimizer finds the non-finite gradient norm and skips
    the step itself (the weights and its states stay as they were), and `health` counts it."""
    pytest.importorskip("deepspeed")
    agent.use_deepspeed({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                         "train_batch_size": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                         "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    params = agent.params
    before = [p.detach().clone() for p in params]
    total = sum(p.sum() for p in params)
    for loss in (total + math.nan, (params[0] * math.inf).sum() + 1):
        assert not math.isfinite(agent.optimizer_step(loss))
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert agent.health.take_skipped() == 2 and agent.health.in_a_row == 2
    assert math.isfinite(agent.optimizer_step(sum(p.square().sum() for p in params) + params[0].sum()))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert agent.health.in_a_row == 0 and agent.health.take_skipped() == 0
