"""Every agent x env pair composes and runs a tiny epoch through the real Hydra configs."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from agents import AGENTS
from t2i_rl.rewards import make_reward
from t2i_rl.rewards.pretrained import PRETRAINED, save_tiny_reward
from t2i_rl.train import CONFIG_DIR, Trainer, group_options, run, validate

ENVS = group_options("env")
# Every agent runs on the ShapesWorld envs and on one published-reward env: ImageReward (ReFL's
# reward; free-text prompts, no judge). The other published-reward envs take the same path through
# the trainer, so they are composed below but not run (7 agents x 6 envs would take minutes).
RUN_ENVS = [e for e in ENVS if e not in PRETRAINED] + ["imagereward"]
# every evaluation's tags: both sets, three scores and the judge's unsure share, each with its 95% interval
EVAL_TAGS = {f"eval/{s}/{k}{ci}" for s in ("train", "heldout")
             for k in ("proxy", "gold", "gold_correct", "gold_unsure", "monitor") for ci in ("", "/ci_low", "/ci_high")}


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """Tiny random instances of the published reward models: {env name: folder}."""
    root = tmp_path_factory.mktemp("pretrained")
    return {name: str(save_tiny_reward(name, root / name)) for name in PRETRAINED}


def record_eval_images(trainer: Trainer) -> list[torch.Tensor]:
    """A list that each evaluation set's sampling appends its float images to, as the judge saw them."""
    images: list[torch.Tensor] = []
    sample_set = trainer._sample_set

    def recording(prompts, seed, env):
        out = sample_set(prompts, seed, env)
        images.append(env.images.clone())
        return out
    trainer._sample_set = recording
    return images


def tiny_overrides(assets, run_dir, agent="ddpo", env="textnorm", epochs=1, pretrained=None, lora_rank="4"):
    clip = {"name": "clip", "path": assets["clip"]}
    members = [clip, {"name": "lee", "path": assets["lee"]}, {"name": "pairwise", "path": assets["pairwise"]}]
    shapes = {
        "raw": clip,
        "textnorm": {"name": "textnorm", "base": clip, "tau": 0.05},
        "ensemble": {"name": "ensemble", "members": members, "mode": "mean_minus_std", "lam": 0.5},
        "textnorm_ensemble": {"name": "textnorm", "base": {"name": "ensemble", "members": members,
                                                          "mode": "mean_minus_std"}, "tau": 0.1},
    }
    reward = {"name": env, "path": pretrained[env]} if env in PRETRAINED else shapes[env]
    return [
        f"agent={agent}", f"env={env}", f"epochs={epochs}", f"output_dir={run_dir}",
        f"model.pipeline={assets['pipeline']}", "env.batch_size=2", "env.num_steps=2",
        "agent.samples_per_epoch=4", "agent.train_batch_size=2",
        "eval.num_prompts=4", "eval.train_images=4", "eval.batch_size=4", "eval.every=1",
        "samples.every=1", "samples.num=4",
        "diagnostics.kl_samples=2", f"agent.lora_rank={lora_rank}", *tiny_agent_overrides(agent),
        f"env.monitor={{name:clip,path:'{assets['monitor']}'}}" if env not in PRETRAINED else "env.monitor=null",
    ], reward


def tiny_agent_overrides(agent: str) -> list[str]:
    """DDPO's (and DPOK's) default groups and trained steps, scaled to a tiny epoch of 4 samples x 2 steps."""
    return ["agent.group_size=2", "agent.train_steps=1"] if agent in ("ddpo", "dpok") else []


def compose_cfg(overrides_and_reward):
    """The real configs, with the tiny models' folders in place of the shipped ones."""
    overrides, reward = overrides_and_reward
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.env.reward = reward
    return cfg


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("env", ENVS)
def test_every_agent_env_pair_composes(agent, env):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"agent={agent}", f"env={env}"])
    assert cfg.agent.name == agent and cfg.env.name == env


@pytest.mark.parametrize("agent", sorted(AGENTS))
def test_agent_yaml_holds_exactly_the_config_fields(agent):
    from dataclasses import fields

    from agents import agent_class

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"agent={agent}"])
    config_class = agent_class(agent).config_class
    assert set(cfg.agent) == {f.name for f in fields(config_class)}
    config_class.from_dict(dict(cfg.agent))  # validates


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("env", RUN_ENVS)
def test_every_agent_env_pair_runs_a_tiny_epoch(tiny_assets, tiny_pretrained, tmp_path, agent, env):
    cfg = compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run", agent, env, pretrained=tiny_pretrained))
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    metrics = trainer.fit()
    after = trainer.policy.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the update changed nothing"
    assert torch.isfinite(torch.tensor(metrics["reward/proxy"]))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    # free text has no judge
    judged = {"reward/gold", "eval/heldout/gold_correct", "eval/train/gold_correct"} if cfg.env.gold else set()
    assert {"reward/proxy", "policy/kl_to_base"} | judged <= set(first)
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir()
    assert (tmp_path / "run" / "config.yaml").is_file()


def modules_of(obj, depth: int = 5, seen: set | None = None):
    """(path, torch module) for every module reachable from `obj` through this package's objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield type(obj).__name__, obj
        return
    if isinstance(obj, dict):
        children = obj.items()
    elif isinstance(obj, (list, tuple)):
        children = enumerate(obj)
    elif type(obj).__module__.split(".")[0] in ("t2i_rl", "envs", "agents", "diffusers"):
        children = vars(obj).items() if hasattr(obj, "__dict__") else ()
    else:
        return
    for key, child in children:
        for path, module in modules_of(child, depth - 1, seen):
            yield f"{key}.{path}", module


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_every_module_a_run_builds_is_on_the_configured_device(tiny_assets, tmp_path, device):
    """Policy, reference, VAE, text encoder, the proxy reward and the judge: all on `device`."""
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run")
    trainer = Trainer(compose_cfg((overrides + [f"device={device}"], reward)))
    modules = dict(modules_of(trainer))
    names = " ".join(modules)
    assert "unet" in names and "vae" in names and "reward_fn" in names, names
    wrong = {path: sorted({str(p.device) for p in m.parameters()}) for path, m in modules.items()
             if any(p.device.type != device for p in m.parameters())}
    assert not wrong, wrong


def test_time_budget_stops_after_the_epoch_that_spends_it_and_still_evaluates(tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=5)
    cfg = compose_cfg((overrides + ["budget_minutes=1e-9", "eval.every=0"], reward))
    metrics = Trainer(cfg).fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]  # one epoch trained, then the final held-out eval
    assert set(lines[1]) == {"epoch"} | EVAL_TAGS
    assert metrics["final/eval/heldout/gold_correct"] == lines[1]["eval/heldout/gold_correct"]


@pytest.mark.parametrize("lora_rank", ["4", "null"])  # LoRA, and full fine-tuning (DDPO's default)
def test_resuming_equals_not_stopping(tiny_assets, tmp_path, lora_rank):
    """2 epochs in one go == 1 epoch, a new process resuming, 1 more epoch: same parameters."""
    def trainer(run, epochs):
        return Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / run, epochs=epochs, lora_rank=lora_rank)))

    straight = trainer("a", 2)
    straight.fit()
    first = trainer("b", 1)
    first.fit()
    resumed = trainer("b", 2)
    assert resumed.start_epoch == 1
    resumed.fit()
    for a, b in zip(straight.policy.trainable_parameters(), resumed.policy.trainable_parameters()):
        assert torch.equal(a, b)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # 2 = the final held-out evaluation


def test_tensorboard_events_hold_the_design_tags(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run")))
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"reward/proxy", "reward/gold", "reward/rm/clip", "textnorm/confidence", "policy/kl_to_base",
            "policy/approx_kl", "policy/clipfrac", "loss/policy", "overopt/hacked_frac",
            "diversity/pixel_rms", "time/samples_per_s"} | EVAL_TAGS
    assert want <= tags, want - tags
    assert any(t.startswith("samples/") for t in acc.Tags()["images"])


def test_evaluation_uses_fixed_noise_and_reports_its_intervals(tiny_assets, tmp_path):
    """Two evaluations of the same weights draw the same images; the intervals are the Wilson and
    bootstrap-over-prompts intervals of exactly the scores judged, which are written per image; the
    training prompts are the fixed set in turn."""
    from t2i_rl.intervals import bootstrap_mean_interval, wilson_interval

    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run")
    prompts = ["two red circles on a white background", "one blue square and one green circle on a black background"]
    trainer = Trainer(compose_cfg((overrides + [f"env.prompts=[{prompts[0]!r},{prompts[1]!r}]"], reward)))
    train_prompts, _, _ = trainer.eval_sets["train"]
    assert train_prompts == prompts * 2  # eval.train_images=4: each fixed prompt twice
    images = record_eval_images(trainer)
    first, second = trainer.evaluate(0), trainer.evaluate(1)
    assert first == second
    assert torch.equal(images[0], images[2]) and torch.equal(images[1], images[3])  # train, held-out
    # the intervals, recomputed from the judge's scores of those very images
    gold = trainer.env.gold_fn(images[0], train_prompts).components
    n_correct, n_sure = float(gold["gold/correct"].sum()), int((gold["gold/unsure"] == 0).sum())
    assert first["eval/train/gold_unsure"] == pytest.approx(1 - n_sure / 4)
    if n_sure:  # the all-correct rate is taken over the images the judge is sure about
        assert first["eval/train/gold_correct"] == pytest.approx(n_correct / n_sure)
        assert (first["eval/train/gold_correct/ci_low"], first["eval/train/gold_correct/ci_high"]) == pytest.approx(
            wilson_interval(n_correct, n_sure))
    scores = gold["gold/score"].double().numpy()
    assert (first["eval/train/gold/ci_low"], first["eval/train/gold/ci_high"]) == pytest.approx(
        bootstrap_mean_interval(scores, train_prompts, seed=0), abs=1e-6)
    for key in ("eval/train/gold", "eval/train/proxy", "eval/heldout/proxy"):
        assert first[f"{key}/ci_low"] <= first[key] <= first[f"{key}/ci_high"]
    record = json.loads((tmp_path / "run" / "evals" / "epoch0000.json").read_text())
    assert record["train"]["prompts"] == train_prompts
    assert record["train"]["gold"] == pytest.approx(scores.tolist())
    assert set(record) == {"train", "heldout"} and len(record["heldout"]["proxy"]) == 4
    # the monitor: the held-out reward model's own scores of those images, with their interval
    monitor = make_reward({"name": "clip", "path": tiny_assets["monitor"]})(images[1], trainer.eval_sets["heldout"][0])
    assert record["heldout"]["monitor"] == pytest.approx(monitor.scores.double().tolist())
    assert first["eval/heldout/monitor"] == pytest.approx(float(monitor.scores.double().mean()))
    assert first["eval/heldout/monitor/ci_low"] <= first["eval/heldout/monitor"] <= first["eval/heldout/monitor/ci_high"]


@pytest.mark.parametrize("watch", ["monitor", "gold"])
def test_early_stop_watches_its_score_and_says_so(tiny_assets, tmp_path, watch, capsys):
    """The run stops after the evaluation at which the watched held-out score has fallen `patience`
    times in a row while the proxy rose where it is optimized (on the training prompts: on held-out
    prompts it falls here, as it does when a policy overfits its prompts)."""
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", epochs=6)
    trainer = Trainer(compose_cfg(([*overrides, "early_stop.enabled=true", f"early_stop.watch={watch}",
                                    "early_stop.patience=2"], reward)))
    key = {"monitor": "eval/heldout/monitor", "gold": "eval/heldout/gold_correct"}[watch]
    evaluate = trainer.evaluate

    def scripted(epoch):  # the watched score falls from epoch 1 on while the proxy rises
        out = evaluate(epoch)
        out.update({key: 1.0 - 0.1 * epoch, "eval/train/proxy": 0.1 * epoch, "eval/heldout/proxy": -0.1 * epoch})
        return out
    trainer.evaluate = scripted
    trainer.fit()
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(epochs) == 3  # evaluations 0, 1, 2: fallen twice at 2; the final evaluation is logged as epoch 3
    printed = capsys.readouterr()
    assert f"early stop at epoch 2: {key} fell for 2 evaluations" in printed.out + printed.err


def test_lora_checkpoint_loads_into_a_diffusers_pipeline(tiny_assets, tmp_path):
    from t2i_rl.models import load_pipeline

    trainer = Trainer(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run")))
    trainer.fit()
    pipe = load_pipeline(tiny_assets["pipeline"])
    pipe.load_lora_weights(str(tmp_path / "run" / "checkpoints" / "last"))
    trained = {n: p for n, p in trainer.policy.unet.named_parameters() if "lora_B" in n}
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(trained) == len(loaded) > 0
    assert all(torch.equal(a, b) for a, b in zip(trained.values(), loaded.values()))


@pytest.mark.parametrize("args, message", [
    (["agent=nope"], "unknown agent 'nope'; allowed: "),
    (["env=nope"], "unknown env 'nope'"),
    (["agent.lr=-1"], "agent.lr = -1 is invalid"),
    (["epochs=0"], "epochs = 0 is invalid"),
    (["agent.bogus=1"], "bogus"),
    (["eval.num_prompts=100", "eval.batch_size=64"], "eval.num_prompts = 100 is invalid"),
    (["eval.train_images=100", "eval.batch_size=64"], "eval.train_images = 100 is invalid"),
    (["env.prompts=file:/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt does not exist"),
    (["env.reward=gold"], "env.reward = gold is invalid: the judge (gold) is what the proxies are measured against"),
    (["env=ensemble", "env.reward.members=[clip,gold]"], "the judge (gold) is what the proxies are measured"),
])
def test_invalid_config_gives_one_error_line_and_no_work(tmp_path, args, message, refused_by_train):
    out = tmp_path / "run"
    code, lines = refused_by_train([f"output_dir={out}", *args])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not out.exists()


def test_plot_draws_reward_vs_human_from_metrics(tiny_assets, tmp_path):
    from t2i_rl.plot import main as plot_main

    run(compose_cfg(tiny_overrides(tiny_assets, tmp_path / "run")))
    out = tmp_path / "curves.png"
    assert plot_main([str(tmp_path / "run"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_an_epoch_smaller_than_env_batch_size_is_denoised_at_once(tiny_assets, tmp_path):
    """env.batch_size is an upper bound: 4 samples per epoch with env.batch_size=8 are one batch of 4."""
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", "ddpo", "raw")
    overrides[overrides.index("env.batch_size=2")] = "env.batch_size=8"
    cfg = compose_cfg((overrides, reward))
    validate(cfg)
    trainer = Trainer(cfg)
    assert trainer.env.num_envs == 4
    rollout = trainer.agent.collect()
    assert len(rollout) == 4


def test_the_monitor_leaves_the_runs_random_stream_alone(tiny_assets, tmp_path):
    """Building env.monitor (a pairwise head draws its init) and scoring with it change nothing the
    run trains: the same LoRA init and the same epoch as without a monitor."""
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "with")
    watched = Trainer(compose_cfg(([*overrides, f"env.monitor={{name:pairwise,path:'{tiny_assets['pairwise']}'}}"], reward)))
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "without")
    plain = Trainer(compose_cfg(([*overrides, "env.monitor=null"], reward)))
    assert watched.monitor is not None and plain.monitor is None
    for a, b in zip(watched.policy.trainable_parameters(), plain.policy.trainable_parameters()):
        assert torch.equal(a, b)
    assert "eval/heldout/monitor" in watched.evaluate(0) and "eval/heldout/monitor" not in plain.evaluate(0)
    one, two = watched.epoch(0), plain.epoch(0)
    for key in ("reward/proxy", "loss/policy", "policy/kl_to_base"):
        assert one[key] == two[key], key


@pytest.mark.parametrize("agent", ["ddpo", "refl"])  # refl: an agent without score_pool gets none filled in
def test_a_run_saved_before_the_monitor_existed_resumes_with_what_it_did(tiny_assets, tmp_path, agent):
    """A config.yaml without env.monitor, early_stop.watch, agent.lora_targets and agent.score_pool
    (saved before they existed) counts as env.monitor=null early_stop.watch=gold, the LoRA on every
    attention projection and the whole action's score: given those, it resumes; the defaults are a
    listed change, other targets too."""
    from omegaconf import OmegaConf

    from t2i_rl.train import config_changes

    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run", agent=agent)
    run(compose_cfg((overrides, reward)))
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert ("score_pool" in saved.agent) == (agent == "ddpo")
    del saved.env["monitor"], saved.early_stop["watch"], saved.agent["lora_targets"]
    saved.agent.pop("score_pool", None)
    OmegaConf.save(saved, tmp_path / "run" / "config.yaml")
    legacy = [o for o in overrides if not o.startswith("env.monitor")] + ["env.monitor=null", "early_stop.watch=gold"]
    assert config_changes(compose_cfg(([*legacy, "epochs=2"], reward))) == []
    changes = config_changes(compose_cfg(([*overrides, "epochs=2"], reward)))
    assert changes[0] == "early_stop.watch: gold -> monitor" and changes[1].startswith("env.monitor: None -> "), changes
    changes = config_changes(compose_cfg(([*legacy, "agent.lora_targets=[attn2.to_k]"], reward)))
    assert changes == ["agent.lora_targets: ['to_q', 'to_k', 'to_v', 'to_out.0'] -> ['attn2.to_k']"], changes
