"""Data-parallel training for real: `accelerate launch --num_processes 2` on the CPU (gloo), tiny
models built from configs. Both ranks must end with the same weights, which trained; only rank 0
writes; the ranks sample different prompts and noise; DDPO's advantages on every rank are one
process's on the whole batch; a resumed two-process run equals one that did not stop; with
shard_optimizer=true (ZeRO-1) each rank holds part of the AdamW states and trains the same weights;
under `--use_deepspeed --zero_stage 2` DeepSpeed's engine trains those weights too."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents import agent_class
from agents.ddpo import DDPOConfig
from agents.rwr import RWRConfig
from t2i_rl.checkpoint import LORA_FILE, load_trainer_state
from t2i_rl.train import CONFIG_DIR, validate

from tests.agents.test_train import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
UNET_FILE = "diffusion_pytorch_model.safetensors"  # a fully fine-tuned checkpoint's unet/ (save_pretrained)
WORKER = Path(__file__).with_name("distributed_worker.py")
RANKS = (0, 1)
DEFAULT_AGENTS = ("ddpo", "refl")  # a policy-gradient agent and a gradient-through-reward one
SLOW_AGENTS = ("dpok", "draft", "rwr", "ddpo_trl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTI = ("--multi_gpu",)  # data parallel: the agents average the gradients
DEEPSPEED = ("--use_deepspeed", "--zero_stage", "2")  # DeepSpeed's ZeRO-2 engine steps


def launch(args: list[str], timeout: int = 600, launcher: tuple[str, ...] = MULTI) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 processes on this machine's CPU, one thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_jobs(tmp: Path, jobs: list[dict], launcher: tuple[str, ...] = MULTI) -> dict[str, list[dict]]:
    """Run the worker's jobs in 2 processes; {out name: [rank 0's result, rank 1's]}."""
    path = tmp / "jobs.json"
    path.write_text(json.dumps([{**job, "out": str(tmp / job["out"])} for job in jobs]))
    launch([str(WORKER), str(path)], launcher=launcher)
    return {job["out"]: [torch.load(tmp / f"{job['out']}.rank{r}.pt", weights_only=False) for r in RANKS]
            for job in jobs}


def train_job(assets: dict, run_dir: Path, agent: str, out: str, epochs: int = 1, *extra: str) -> dict:
    overrides, reward = tiny_overrides(assets, run_dir, agent, "raw", epochs=epochs)
    # the grammar's 5,472 prompts, so that the ranks' own random streams show in the prompts they draw
    # (one group each from the 16 fixed prompts could coincide)
    overrides.append("env.prompts=composition-train")
    return {"kind": "train", "overrides": [*overrides, *extra], "reward": reward, "out": out}


@pytest.fixture(scope="module")
def default_run(tiny_assets, tmp_path_factory):
    """One launch: the helpers, each default agent for one epoch, and DDPO for 2 epochs straight
    and 1 + 1 resumed, without and with a sharded optimizer."""
    tmp = tmp_path_factory.mktemp("distributed")
    jobs = [{"kind": "helpers", "out": "helpers"}]
    jobs += [train_job(tiny_assets, tmp / agent, agent, agent) for agent in DEFAULT_AGENTS]
    # ReFL with env.batch_size=4 over a share of 2 samples per process: each process denoises its 2
    refl = next(job for job in jobs if job.get("out") == "refl")["overrides"]
    refl[refl.index("env.batch_size=2")] = "env.batch_size=4"
    for prefix, extra in (("", ()), ("sharded_", ("shard_optimizer=true",))):
        jobs += [train_job(tiny_assets, tmp / f"{prefix}straight", "ddpo", f"{prefix}straight", 2, *extra),
                 train_job(tiny_assets, tmp / f"{prefix}resumed", "ddpo", f"{prefix}first", 1, *extra),
                 train_job(tiny_assets, tmp / f"{prefix}resumed", "ddpo", f"{prefix}resumed", 2, *extra)]
    return tmp, run_jobs(tmp, jobs)


def check_agent_run(run_dir: Path, results: list[dict], epochs: int = 1, runs: int = 1) -> None:
    """Identical trained weights on both ranks; only rank 0 wrote (one event file per run in the
    folder, one metrics line per epoch), and its checkpoint holds them."""
    first, second = results
    assert first["weights"].keys() == second["weights"].keys() and first["weights"]
    for key, value in first["weights"].items():
        assert torch.equal(value, second["weights"][key]), f"the ranks' weights differ at {key}"
    assert any(not torch.equal(v, first["initial"][k]) for k, v in first["weights"].items()), "nothing trained"
    assert first["metrics"] == second["metrics"]  # averaged over the ranks: the same numbers on both
    last = run_dir / "checkpoints" / "last"
    saved = load_file(last / LORA_FILE if (last / LORA_FILE).exists() else last / "unet" / UNET_FILE)
    assert {k.removeprefix("unet."): v for k, v in saved.items()}.keys() == first["weights"].keys()
    assert all(torch.equal(v, first["weights"][k.removeprefix("unet.")]) for k, v in saved.items())
    assert len(list((run_dir / "tb").iterdir())) == runs, "more than one process wrote TensorBoard events"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(epochs + 1))  # + the final evaluation
    assert (run_dir / "config.yaml").is_file()
    # the ranks sampled different prompts and different x_T
    assert first["prompts"] != second["prompts"] and not torch.equal(first["x_T"], second["x_T"])


def test_helpers_gather_and_average_over_the_ranks(default_run):
    _, results = default_run
    for r, out in enumerate(results["helpers"]):
        assert out["gathered"].tolist() == [0.0, 10.0, 1.0, 11.0]
        assert out["local_rows"].tolist() == [float(r), r + 10.0]
        assert out["gather_list"] == ["p0", "p1"]
        both, one, none = out["grads"]
        assert both.tolist() == [1.5] * 3  # (1 + 2) / 2
        assert one.tolist() == [2.0] * 3  # rank 0 had none: it counts as zeros
        assert none is None  # no rank had one: AdamW skips it, as in one process
        assert out["metrics"] == {"a": 0.5, "b": 5.0}  # b: the mean over the ranks that report it
        assert out["seeds"][0] == 7 and out["seeds"][1] != 7  # rank 0 keeps the run's seed
    ranks = [part["rank"].tolist() for part in results["helpers"][0]["to_main"]]
    assert ranks == [[0], [1]] and results["helpers"][1]["to_main"] is None  # only rank 0 receives


@pytest.mark.parametrize("agent", DEFAULT_AGENTS)
def test_two_processes_train_identical_weights_and_only_rank_0_writes(default_run, agent):
    tmp, results = default_run
    check_agent_run(tmp / agent, results[agent])


def test_a_process_whose_share_is_below_env_batch_size_denoises_its_share(default_run):
    _, results = default_run
    assert [out["num_envs"] for out in results["refl"]] == [2, 2]  # 4 samples, env.batch_size=4, 2 processes
    assert [out["num_envs"] for out in results["ddpo"]] == [2, 2]


def test_ddpo_advantages_are_one_process_advantages_on_the_whole_batch(default_run):
    _, results = default_run
    for out in results["ddpo"]:
        assert len(out["advantages"]) == 4  # 2 samples on each rank
        torch.testing.assert_close(out["advantages"], out["one_process_advantages"], rtol=0, atol=0)


def test_resumed_two_process_run_equals_one_that_did_not_stop(default_run):
    tmp, results = default_run
    check_agent_run(tmp / "straight", results["straight"], epochs=2)
    check_agent_run(tmp / "resumed", results["resumed"], epochs=2, runs=2)
    for straight, resumed in zip(results["straight"], results["resumed"]):
        for key, value in straight["weights"].items():
            assert torch.equal(value, resumed["weights"][key]), key
        assert straight["prompts"] == resumed["prompts"]  # each rank continued its own random streams
        assert torch.equal(straight["x_T"], resumed["x_T"])


def test_sharded_optimizer_splits_the_states_and_trains_the_same_weights(default_run):
    """ZeRO-1: each rank holds part of the AdamW states, the checkpoint all of them (consolidated on
    rank 0); the weights are those of the unsharded run, and a resumed run equals one that did not stop."""
    tmp, results = default_run
    check_agent_run(tmp / "sharded_straight", results["sharded_straight"], epochs=2)
    check_agent_run(tmp / "sharded_resumed", results["sharded_resumed"], epochs=2, runs=2)
    for run in ("straight", "sharded_straight", "sharded_resumed"):
        saved = load_trainer_state(tmp / run / "checkpoints" / "last")
        assert len(saved["agent"]["optimizer"]["state"]) == len(results["straight"][0]["weights"]), run
    held = [out["optimizer_states"] for out in results["sharded_straight"]]
    assert [out["optimizer_states"] for out in results["straight"]] == [len(results["straight"][0]["weights"])] * 2
    assert min(held) > 0 and sum(held) == len(results["straight"][0]["weights"])
    for plain, sharded, resumed in zip(results["straight"], results["sharded_straight"], results["sharded_resumed"]):
        for key, value in sharded["weights"].items():
            torch.testing.assert_close(value, plain["weights"][key])
            assert torch.equal(value, resumed["weights"][key]), key


@pytest.fixture(scope="module")
def deepspeed_run(tiny_assets, tmp_path_factory):
    """One `--use_deepspeed --zero_stage 2` launch: DDPO for 2 epochs straight and 1 + 1 resumed, its
    loss in one part per denoising step (the parts before the last accumulate without a step), ReFL
    for one epoch on bfloat16 frozen weights (float32 LoRA), and DDPO fully fine-tuning the UNet with
    gradient checkpointing (ZeRO-2 reduces each gradient once per backward: recomputation must not
    produce a second one)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    chunked = ("agent.step_chunk=1",)
    jobs = [train_job(tiny_assets, tmp / "straight", "ddpo", "straight", 2, *chunked),
            train_job(tiny_assets, tmp / "resumed", "ddpo", "first", 1, *chunked),
            train_job(tiny_assets, tmp / "resumed", "ddpo", "resumed", 2, *chunked),
            train_job(tiny_assets, tmp / "refl", "refl", "refl", 1, "model.dtype=bfloat16"),
            train_job(tiny_assets, tmp / "full", "ddpo", "full", 1, "agent.lora_rank=null",
                      "model.gradient_checkpointing=true")]
    return tmp, run_jobs(tmp, jobs, launcher=DEEPSPEED)


def test_deepspeed_zero2_trains_the_weights_of_the_data_parallel_run(default_run, deepspeed_run):
    """DeepSpeed's engine averages, clips and steps: the same weights as the agents' own data parallel
    run, each rank stepping half of the AdamW states; the checkpoint keeps both halves, and a resumed
    run equals one that did not stop."""
    tmp, results = deepspeed_run
    _, plain = default_run
    check_agent_run(tmp / "straight", results["straight"], epochs=2)
    check_agent_run(tmp / "resumed", results["resumed"], epochs=2, runs=2)
    check_agent_run(tmp / "refl", results["refl"])
    check_agent_run(tmp / "full", results["full"])  # full fine-tuning, what ZeRO is for
    whole = sum(v.numel() for v in plain["straight"][0]["weights"].values())
    assert [out["optimizer_numel"] for out in plain["straight"]] == [whole, whole]
    for deepspeed, reference, resumed in zip(results["straight"], plain["straight"], results["resumed"]):
        assert deepspeed["zero_stage"] == 2
        assert 0 < deepspeed["optimizer_numel"] < whole  # this rank's partition (+ DeepSpeed's alignment padding)
        for key, value in deepspeed["weights"].items():
            # within a third of one AdamW step (lr 3e-4): the loss parts sum in another order, and
            # AdamW's normalized step magnifies that rounding where a gradient is near 0
            torch.testing.assert_close(value, reference["weights"][key], atol=1e-4, rtol=0)
            assert torch.equal(value, resumed["weights"][key]), key
    assert sum(out["optimizer_numel"] for out in results["straight"]) >= whole
    saved = load_trainer_state(tmp / "straight" / "checkpoints" / "last")
    assert isinstance(saved["agent"]["optimizer"], list) and len(saved["agent"]["optimizer"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [MULTI, DEEPSPEED], ids=["data_parallel", "deepspeed"])
def test_every_other_agent_trains_in_two_processes(tiny_assets, tmp_path, launcher):
    agents = [a for a in SLOW_AGENTS if launcher == MULTI or not agent_class(a).own_optimizer_reason]
    results = run_jobs(tmp_path, [train_job(tiny_assets, tmp_path / a, a, a) for a in agents], launcher)
    for agent in agents:
        check_agent_run(tmp_path / agent, results[agent])


@pytest.mark.parametrize("launcher", [MULTI, DEEPSPEED], ids=["data_parallel", "deepspeed"])
def test_accelerate_launch_runs_the_training_command(tiny_assets, tmp_path, launcher):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", "ddpo", "raw")
    launch(["-m", "t2i_rl.train", *overrides, f"env.reward={{name:clip,path:'{reward['path']}'}}"], launcher=launcher)
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last" / LORA_FILE).is_file()
    assert len(list((run_dir / "tb").iterdir())) == 1
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# -- configuration: what several processes require, checked before any work (the CLI prints the
#    ValueError as one `error:` line, tests/agents/test_train.py) -----------------------------------
def test_per_process_config_splits_the_sample_counts():
    cfg = DDPOConfig(samples_per_epoch=32, train_batch_size=8)
    assert cfg.per_process(1) is cfg
    local = cfg.per_process(4)
    assert (local.samples_per_epoch, local.train_batch_size, local.lr) == (8, 2, cfg.lr)
    rwr = RWRConfig(samples_per_epoch=8, train_batch_size=4, pretrain_batch_size=6).per_process(2)
    assert (rwr.samples_per_epoch, rwr.train_batch_size, rwr.pretrain_batch_size) == (4, 2, 3)
    with pytest.raises(ValueError, match=r"agent.train_batch_size = 8 is invalid with 3 processes: must be a "
                                         r"multiple of 3"):
        DDPOConfig(samples_per_epoch=24, train_batch_size=8).per_process(3)
    with pytest.raises(ValueError, match=r"group_size \(16\) \(in each process's share, with 2 processes\)"):
        DDPOConfig(samples_per_epoch=16, train_batch_size=8, group_size=16).per_process(2)


@pytest.mark.parametrize("overrides, message", [
    (["eval.num_prompts=6", "eval.batch_size=6"], "eval.num_prompts = 6 is invalid with 4 processes"),
    (["eval.num_prompts=24", "eval.batch_size=4"], r"share per process \(here 6\)"),
    (["agent.samples_per_epoch=30", "agent.group_size=2"], "agent.samples_per_epoch = 30 is invalid with 4 processes"),
    (["agent.samples_per_epoch=48", "agent.group_size=4", "env.batch_size=8"],
     r"each process's share \(12\) must be at most env.batch_size \(8\) or a multiple of it"),
    (["agent=sb3"], r"^agent=sb3 runs in one process; got 4 processes \(Stable-Baselines3's PPO has no "
                    r"data-parallel training\)$"),
])
def test_validate_checks_the_shares_of_each_process(monkeypatch, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["env.batch_size=2", "eval.train_images=0", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    validate(cfg)  # valid in one process


@pytest.mark.parametrize("world", ["2", "4"])
def test_the_default_config_is_valid_in_a_launch(monkeypatch, world):
    """The README's `accelerate launch --num_processes 4 -m t2i_rl.train agent=ddpo env=textnorm`: 32
    samples, 8 or 16 per process, fewer than env.batch_size (32), which each process denoises at once."""
    monkeypatch.setenv("WORLD_SIZE", world)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["agent=ddpo", "env=textnorm"])
    validate(cfg)


def test_fsdp_launches_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    with pytest.raises(ValueError, match="^FSDP launches are not supported"):
        validate(cfg)


@pytest.mark.parametrize("env, overrides, message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, [], r"^DeepSpeed ZeRO stage 3 is not supported: use --zero_stage 1"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, [], r"^DeepSpeed's offload_param needs ZeRO stage 3"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, [], r"^DeepSpeed gradient_accumulation_steps = 4 is invalid"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, [], r"^DeepSpeed gradient_clipping = 0.5 differs from "
                                                  r"agent.max_grad_norm = 1.0"),
    ({}, ["agent=ddpo_trl"], r"^DeepSpeed launches are invalid for agent=ddpo_trl \(TRL's DDPOTrainer"),
    ({}, ["shard_optimizer=true"], r"^shard_optimizer = true is invalid in a DeepSpeed launch"),
    ({}, ["model.dtype=float16"], r"^model.dtype = float16 with LoRA is invalid in a DeepSpeed launch"),
])
def test_deepspeed_launches_that_cannot_train_as_launched_are_refused(monkeypatch, env, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", **env}.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_deepspeed_config_file_sections_the_agents_decide_are_refused(monkeypatch, tmp_path):
    from t2i_rl.distributed import deepspeed_config

    path = tmp_path / "ds.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    for section, message in [({"optimizer": {"type": "Adam"}}, r"^the DeepSpeed config's 'optimizer' section"),
                             ({"bf16": {"enabled": True}}, r"^DeepSpeed's bf16 is not supported")]:
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
        with pytest.raises(ValueError, match=message):
            deepspeed_config(2, 1.0)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    assert deepspeed_config(2, 1.0)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("flag, dtype, message", [
    ("no", "float32", None), ("bf16", "bfloat16", None), ("fp16", "float16", None),
    ("bf16", "float32", r"^accelerate launch --mixed_precision bf16 disagrees with model.dtype = float32, which "
                        r"sets the precision here: pass model.dtype=bfloat16 or launch with --mixed_precision no$"),
    ("fp8", "float32", r"^accelerate launch --mixed_precision fp8 is not supported"),
])
def test_a_launch_precision_must_agree_with_model_dtype(monkeypatch, flag, dtype, message):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", flag)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.dtype={dtype}"])
    if message is None:
        validate(cfg)
    else:
        with pytest.raises(ValueError, match=message):
            validate(cfg)


def test_deepspeed_config_takes_the_agents_batch_and_clipping(monkeypatch):
    from t2i_rl.distributed import deepspeed_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    config = deepspeed_config(4, 0.5)
    assert config["zero_optimization"]["stage"] == 1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 8)
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (1, 0.5)
    assert config["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW steps the offloaded states


def test_checkpoints_resume_only_under_the_launch_that_saved_them():
    from types import SimpleNamespace

    from agents.base import Agent

    agent = SimpleNamespace(engine=None, optimizer=None, generator=None, env=None)
    with pytest.raises(ValueError, match=r"^this checkpoint was saved by a DeepSpeed run and cannot resume without"):
        Agent.load_state_dict(agent, {"optimizer": [{}, {}], "generator": None, "env": None})
    agent.engine = object()
    with pytest.raises(ValueError, match=r"^this checkpoint was saved by a non-DeepSpeed run and cannot resume with "):
        Agent.load_state_dict(agent, {"optimizer": {"state": {}}, "generator": None, "env": None})
    with pytest.raises(ValueError, match=r"sharded over 2 DeepSpeed processes; resume it with 2, not 1$"):
        Agent.load_state_dict(agent, {"optimizer": [{}, {}], "generator": None, "env": None})


def test_eval_prompts_are_checked_per_process_share(monkeypatch):
    """96 held-out prompts in batches of 64: invalid in one process, valid in two (48 each)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["eval.num_prompts=96", "eval.batch_size=64"])
    with pytest.raises(ValueError, match=r"^eval.num_prompts = 96 is invalid: must be at most eval.batch_size"):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(cfg)


def test_validate_checks_shard_optimizer():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["shard_optimizer=sometimes"])
    with pytest.raises(ValueError, match=r"^shard_optimizer = sometimes is invalid: must be true or false$"):
        validate(cfg)


def test_validate_refuses_sharding_trls_optimizer(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["agent=ddpo_trl", "shard_optimizer=true"])
    with pytest.raises(ValueError, match=r"^shard_optimizer = true is invalid for agent=ddpo_trl \(TRL's"):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    validate(cfg)  # one process shards nothing


def test_only_the_base_agents_adamw_is_sharded():
    """An agent stepping another optimizer (ddpo_trl steps TRL's) is refused, not trained unsharded."""
    from types import SimpleNamespace

    from agents.base import Agent

    param = torch.nn.Parameter(torch.zeros(2))
    agent = SimpleNamespace(optimizer=torch.optim.SGD([param], lr=0.1), cfg=SimpleNamespace(name="other"))
    with pytest.raises(ValueError, match=r"^shard_optimizer=true is invalid for agent=other: it steps SGD"):
        Agent.shard_optimizer(agent)


def test_every_agent_but_sb3_trains_data_parallel():
    from agents import AGENTS

    single = {name for name in AGENTS if agent_class(name).single_process_reason}
    assert single == {"sb3"}
