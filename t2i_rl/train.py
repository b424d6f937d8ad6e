"""Train a policy: `python -m t2i_rl.train agent=ddpo env=textnorm [model=shapes] [key=value ...]`.

A run folder (`output_dir`) holds TensorBoard events (tb/), `metrics.jsonl` (one JSON object per
epoch, the same numbers), the resolved `config.yaml`, checkpoints (checkpoints/last, and
checkpoints/best by held-out gold) and sample grids. Running the same command again resumes from
checkpoints/last and continues the same run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from agents.base import TrainingDiverged, adamw_settings, run_episodes
from t2i_rl import CONFIG_DIR, distributed, runlock
from t2i_rl.lora import LORA_TARGETS, check_lora_targets
from t2i_rl.prompts import DEFAULT_CONTRASTIVE

GROUPS = ("agent", "env", "model")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Unknown group options fail in one line before Hydra prints a page about them."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~").startswith("hydra.sweeper."):  # precheck runs without --multirun only
            raise ValueError(f"{key} = {value} is a sweep's setting, which a single run has no use for: add "
                             "--multirun to the training command")
        if key in GROUPS and value not in group_options(key):
            raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(group_options(key))}")


def eval_counts(cfg: DictConfig) -> list[tuple[str, int]]:
    """The image counts of the evaluation sets, which batches of eval.batch_size must fill."""
    return [("eval.train_images", cfg.eval.train_images), ("eval.num_prompts", cfg.eval.num_prompts)]


def fills_batches(count: int, batch: int) -> bool:
    """Whether `count` images fit one batch (of `count`) or fill batches of `batch` exactly: the rule
    of every env and evaluation batch size, in one process or per process of a launch."""
    return count <= batch or count % batch == 0


def model_float16(model: DictConfig, agent_cfg) -> bool:
    """Whether the UNet will run in float16: LoRA over float16 weights (full fine-tuning trains a
    float32 UNet whatever model.dtype says)."""
    return model.dtype == "float16" and agent_cfg.lora_rank is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_device(value: Any) -> bool:
    """A device torch names and this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu" or device.type == "mps" and torch.backends.mps.is_available()


# what early stopping and checkpoints/best watch: the held-out evaluation's score of each choice
WATCHED = {"monitor": "eval/heldout/monitor", "gold": "eval/heldout/gold_correct"}

# (key, test, rule): the run's own settings, each tested for its type as well as its range
RUN_SETTINGS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", _is_int, "an int"),
    ("epochs", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("budget_minutes", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: no time limit)"),
    ("device", _is_device, "a device this machine has: cpu, cuda, cuda:<index> or mps"),
    ("threads", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: torch's default)"),
    ("resume", lambda v: isinstance(v, bool) or v == "force",
     "true, false or force (resume with a changed config)"),
    ("shard_optimizer", lambda v: isinstance(v, bool), "true or false"),
    ("env.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("env.num_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("env.eta", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("env.guidance_scale", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("eval.every", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: only at epoch 0)"),
    ("eval.num_prompts", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("eval.train_images", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("eval.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("diagnostics.kl_samples", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("diagnostics.kl_every_step", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("diagnostics.hacked_quantile", lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("samples.every", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no sample grids)"),
    ("samples.num", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("early_stop.enabled", lambda v: isinstance(v, bool), "true or false"),
    ("early_stop.watch", lambda v: v in WATCHED, f"one of {', '.join(WATCHED)}"),
    ("early_stop.patience", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("health.max_bad_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
]


def check_run_settings(cfg: DictConfig) -> None:
    """The run's own settings (`RUN_SETTINGS`), before anything heavy is imported."""
    for key, ok, rule in RUN_SETTINGS:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ValueError(f"{key} = {value} is invalid: must be {rule}")


def check_output_dir(output_dir: str) -> None:
    """The run folder is a folder, or can be made as one, and can be written (nothing is created here)."""
    path = Path(output_dir).expanduser().absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if not there.is_dir():
        raise ValueError(f"output_dir = {output_dir} is invalid: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir = {output_dir} is invalid: {there} is not writable")


# what a resumed run may change: how long it runs and on how many threads, not what it trains
RESUME_MAY_CHANGE = frozenset({"epochs", "budget_minutes", "resume", "output_dir", "threads"})
# keys added after runs were saved without them, and what such a run did: it resumes unchanged when
# these values are given (env.monitor=null early_stop.watch=gold); a key only some agents have is
# filled in only where the config now has it
SAVED_WITHOUT = {"env.monitor": None, "early_stop.watch": "gold", "agent.lora_targets": list(LORA_TARGETS),
                 "agent.score_pool": 1}


def config_changes(cfg: DictConfig) -> list[str]:
    """How `cfg` differs from the config of the run it would resume in output_dir, one "key: saved
    -> now" per changed key; [] when it would resume none."""
    from t2i_rl.checkpoint import find_checkpoint

    run_dir = Path(cfg.output_dir)
    saved = run_dir / "config.yaml"
    if not (cfg.resume and saved.is_file() and find_checkpoint(run_dir / "checkpoints" / "last")):
        return []
    before = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))

    def has(flat: dict, key: str) -> bool:
        return any(k == key or k.startswith(key + ".") for k in flat)

    for key, value in SAVED_WITHOUT.items():
        if has(now, key) and not has(before, key):
            before[key] = value
    unset = "(unset)"
    keys = [k for k in sorted(before.keys() | now.keys()) if k not in RESUME_MAY_CHANGE and not k.startswith("hydra.")]
    return [f"{k}: {before.get(k, unset)} -> {now.get(k, unset)}" for k in keys
            if before.get(k, unset) != now.get(k, unset)]


# what a run writes in its folder (Hydra's empty train.log and a dead run's run.lock are not a run)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "evals", "checkpoints")


def check_run_folder(cfg: DictConfig) -> None:
    """The run folder's contract, checked by the process that writes there: no other live run holds
    it, resume=false finds no run there (a new run would mix its metrics and curves into the old
    one's), and the run it resumes had this config (what changed is listed unless resume=force)."""
    runlock.check(cfg.output_dir)
    if cfg.resume is False:
        found = [name for name in RUN_FILES if (Path(cfg.output_dir) / name).exists()]
        if found:
            raise ValueError(f"output_dir = {cfg.output_dir} holds a run ({', '.join(found)}), which resume=false "
                             "would mix a new run into: resume=true continues it, resume=force continues it with "
                             "this config, another output_dir starts afresh")
    changes = config_changes(cfg)
    if changes and cfg.resume != "force":
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ValueError(f"output_dir = {cfg.output_dir} holds a run of another config ({shown}): resume=force "
                         "continues it with this config, another output_dir starts afresh")


def any_spec(spec: Any, test: Callable[[Any], bool]) -> bool:
    """Whether `test` holds for a reward spec or for any spec nested in it (mappings and lists)."""
    if test(spec):
        return True
    if isinstance(spec, dict):
        return any(any_spec(v, test) for v in spec.values())
    return isinstance(spec, list) and any(any_spec(v, test) for v in spec)


def uses_shapes_contrastive(spec: Any) -> bool:
    """Whether a reward spec holds a TextNorm whose contrastive prompts come from ShapesWorld's
    grammar (its default, also as a fallback)."""
    def shapes(source: Any) -> bool:
        return source == "shapes" or isinstance(source, dict) and (
            source.get("name") == "shapes" or shapes(source.get("fallback")))

    return any_spec(spec, lambda s: isinstance(s, dict) and s.get("name") == "textnorm"
                    and shapes(s.get("contrastive", DEFAULT_CONTRASTIVE)))


def names_the_judge(spec: Any) -> bool:
    """Whether a reward spec is, or holds, the gold judge."""
    return any_spec(spec, lambda s: s == "gold" or isinstance(s, dict) and s.get("name") == "gold")


def leaf_models(spec: Any) -> set[tuple[str, str]]:
    """The (name, path) of every model a reward spec scores with (ensemble members, TextNorm bases)."""
    if isinstance(spec, str):  # a model's name (composites need a mapping)
        return {(spec, "")}
    if isinstance(spec, dict):
        if spec.get("name") == "ensemble":
            return set().union(*(leaf_models(m) for m in spec.get("members") or []))
        if spec.get("name") == "textnorm":
            return leaf_models(spec.get("base"))
        return {(str(spec.get("name")), str(spec.get("path") or ""))}
    return set()


def check_monitor(cfg: DictConfig) -> None:
    """env.monitor stands for what a user has in place of gold: a reward model the run does not
    optimize, and not the judge; early stopping needs what it watches, on held-out prompts."""
    env = OmegaConf.to_container(cfg.env, resolve=True)
    monitor = env.get("monitor")
    if monitor is not None:
        if names_the_judge(monitor):
            raise ValueError(f"env.monitor = {monitor} is invalid: the judge is gold, which a user does not have; "
                             "early_stop.watch=gold watches it")
        shared = leaf_models(monitor) & leaf_models(env["reward"])
        if shared:
            raise ValueError(f"env.monitor = {monitor} is invalid: the optimized reward env.reward scores with "
                             f"{', '.join(sorted(n for n, _ in shared))} too, so the monitor would climb with the "
                             "proxy; name a model outside it (e.g. {name:clip,path:rewards-web/clip})")
    if cfg.early_stop.enabled:
        if cfg.early_stop.watch == "monitor" and monitor is None:
            raise ValueError("early_stop.watch = monitor needs env.monitor, which is null: set it (a model outside "
                             "env.reward, e.g. {name:clip,path:rewards-web/clip}) or watch early_stop.watch=gold")
        if cfg.early_stop.watch == "gold" and env.get("gold") is None:
            raise ValueError("early_stop.watch = gold needs env.gold, which is null: set it (the judge, gold) "
                             "or watch early_stop.watch=monitor")
        if not cfg.eval.num_prompts:
            raise ValueError("early_stop.enabled = true needs held-out prompts to watch, but eval.num_prompts = 0")
        if not cfg.eval.every:
            raise ValueError("early_stop.enabled = true needs evaluations to compare, but eval.every = 0 "
                             "(only epoch 0 is evaluated)")


def check_prompts(cfg: DictConfig) -> None:
    """Read the prompt files of env.prompts and eval.prompts now (a missing or unreadable one fails
    here, not after the models load) and, when the judge or a `shapes` contrastive source will parse
    the prompts, parse each against ShapesWorld's grammar (which fails in the first episode otherwise)."""
    from envs.denoise import SHAPES_PROMPT_SETS
    from t2i_rl.prompts import load_prompt_set
    from t2i_rl.world import parse_prompt

    readers = [who for who, on in [
        ("the judge (env.gold)", bool(cfg.env.gold)),
        ("the shapes contrastive source of env.reward",
         uses_shapes_contrastive(OmegaConf.to_container(cfg.env, resolve=True)["reward"])),
    ] if on]
    for key in ("env.prompts", "eval.prompts"):
        source = OmegaConf.select(cfg, key)
        if source is None or isinstance(source, str) and source in SHAPES_PROMPT_SETS:
            continue  # none, or ShapesWorld's own
        try:
            prompts = (load_prompt_set(source, also_allowed=list(SHAPES_PROMPT_SETS)) if isinstance(source, str)
                       else list(source))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{key} = {source} is invalid: {err}") from None
        for prompt in prompts if readers else []:
            try:
                parse_prompt(prompt)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{key} = {source} is invalid: {readers[0]} reads ShapesWorld prompts only, and "
                                 f"{prompt!r} is not one ({err})") from None


def validate(cfg: DictConfig):
    """Build and validate the agent config and the run settings; raise ValueError on bad values."""
    from agents import agent_class

    check_run_settings(cfg)
    if names_the_judge(OmegaConf.to_container(cfg.env, resolve=True)["reward"]):
        raise ValueError(f"env.reward = {OmegaConf.select(cfg, 'env.reward')} is invalid: the judge (gold) is what "
                         "the proxies are measured against and is never optimized; `python "
                         "benchmarks/reward_controls.py --control oracle` trains on it as a control of the optimizer")
    check_monitor(cfg)
    check_output_dir(cfg.output_dir)
    if distributed.launched_rank() == 0:
        check_run_folder(cfg)
    check_prompts(cfg)
    cls = agent_class(cfg.agent.name)
    agent_cfg = cls.config_class.from_dict(OmegaConf.to_container(cfg.agent, resolve=True))
    world = distributed.launched_world_size()
    if world == 1:  # with several processes, each process's share must keep these (checked below)
        for key, count in eval_counts(cfg):
            if not fills_batches(count, cfg.eval.batch_size):
                raise ValueError(f"{key} = {count} is invalid: must be at most eval.batch_size "
                                 f"({cfg.eval.batch_size}) or a multiple of it")
        if not fills_batches(agent_cfg.samples_per_epoch, cfg.env.batch_size):
            raise ValueError(f"agent.samples_per_epoch = {agent_cfg.samples_per_epoch} is invalid: must be at most "
                             f"env.batch_size ({cfg.env.batch_size}) or a multiple of it")
    from t2i_rl.models import check_model_config, latent_side, model_policy, unet_layer_names  # diffusers: last

    check_model_config(cfg.model)
    if model_policy(cfg.model) == "flow":
        raise ValueError(f"model.pipeline = {cfg.model.pipeline} is invalid here: a flow-matching pipeline (SD 3/3.5) "
                         "needs t2i_rl.flow_policy.FlowPolicy, which the env and agents of t2i_rl.train do not drive "
                         "yet; load it with t2i_rl.models.load_pipeline and sample with FlowPolicy")
    if agent_cfg.lora_rank is not None and (layers := unet_layer_names(cfg.model.pipeline)) is not None:
        check_lora_targets(layers, agent_cfg.lora_targets, key="agent.lora_targets")
    if (side := latent_side(cfg.model.pipeline, cfg.model.resolution)) is not None:
        agent_cfg.check_latent_side(side)
    distributed.check_precision(cfg.model.dtype)
    if model_float16(cfg.model, agent_cfg) and cls.own_optimizer_reason:
        raise ValueError(f"model.dtype = float16 is invalid for agent={cfg.agent.name} with LoRA: its float16 "
                         f"gradients need loss scaling, which its optimizer loop does not do "
                         f"({cls.own_optimizer_reason}); use model.dtype=bfloat16 or float32")
    if world > 1:
        distributed.check_launcher()
        if cls.single_process_reason:
            raise ValueError(f"agent={cfg.agent.name} runs in one process; got {world} processes "
                             f"({cls.single_process_reason})")
        if cfg.shard_optimizer and cls.own_optimizer_reason:
            raise ValueError(f"shard_optimizer = true is invalid for agent={cfg.agent.name} "
                             f"({cls.own_optimizer_reason}); use shard_optimizer=false")
        local = agent_cfg.per_process(world)  # each process's share must be a valid config too
        if distributed.deepspeed_launch():
            if cls.own_optimizer_reason:
                raise ValueError(f"DeepSpeed launches are invalid for agent={cfg.agent.name} "
                                 f"({cls.own_optimizer_reason}); launch with --multi_gpu")
            if cfg.shard_optimizer:
                raise ValueError("shard_optimizer = true is invalid in a DeepSpeed launch: its ZeRO engine "
                                 "shards the optimizer already; use shard_optimizer=false")
            if model_float16(cfg.model, agent_cfg):
                raise ValueError("model.dtype = float16 with LoRA is invalid in a DeepSpeed launch: the engine "
                                 "steps unscaled float16 gradients; use model.dtype=bfloat16 or float32")
            distributed.deepspeed_config(local.train_batch_size, local.max_grad_norm)
        share = local.samples_per_epoch
        if not fills_batches(share, cfg.env.batch_size):
            raise ValueError(f"agent.samples_per_epoch = {agent_cfg.samples_per_epoch} is invalid with {world} "
                             f"processes: each process's share ({share}) must be at most env.batch_size "
                             f"({cfg.env.batch_size}) or a multiple of it")
        for key, count in eval_counts(cfg):
            share, batch = count // world, cfg.eval.batch_size
            if count % world or not fills_batches(share, batch):
                raise ValueError(f"{key} = {count} is invalid with {world} processes: must be a multiple of "
                                 f"{world} whose share per process (here {share}) is at most eval.batch_size "
                                 f"({batch}) or a multiple of it")
    return cls, agent_cfg


class Trainer:
    """Wires env, policy, agent, diagnostics, logging and checkpoints for one run.

    Under `accelerate launch` with several processes each process is one data-parallel rank
    (t2i_rl/distributed.py): it samples its share of the epoch and of the held-out prompts with
    its own seeds, gradients are averaged before every optimizer step, metrics are averaged over
    the ranks, and only rank 0 writes logs, sample grids and checkpoints; a resumed run loads the
    same checkpoint in every process, and each process its own random state from it. With
    `shard_optimizer=true` each process keeps its share of the AdamW states (ZeRO stage 1); under
    `--use_deepspeed` DeepSpeed's ZeRO engine (stage 1 or 2) shards them and steps.
    """

    def __init__(self, cfg: DictConfig, validated: tuple | None = None) -> None:
        """`validated`: what `validate(cfg)` returned, when the command has validated `cfg` already
        (the config is validated once per command)."""
        from envs import DenoiseVectorEnv, heldout_counterpart, make_prompt_source, training_eval_prompts
        from t2i_rl.checkpoint import find_checkpoint
        from t2i_rl.diagnostics import EarlyStopper, HackDetector
        from t2i_rl.logger import RunLogger
        from t2i_rl.models import load_pipeline
        from t2i_rl.rewards import make_reward

        cls, agent_cfg = validated or validate(cfg)
        device = distributed.init(cfg.device)
        world, self.is_main = distributed.world_size(), distributed.is_main()
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        if self.is_main:
            runlock.acquire(self.run_dir)  # released when this process ends
            changes = config_changes(cfg)
            if changes:  # validated: resume=force
                tqdm.write(f"resume=force: {self.run_dir} continues with {'; '.join(changes)}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model = cfg.model  # validated: the frozen parts in model.dtype, what trains in float32
        pipe = load_pipeline(model.pipeline, dtype=getattr(torch, model.dtype), device=device,
                             attention=model.attention, gradient_checkpointing=model.gradient_checkpointing,
                             vae_slicing=model.vae_slicing)
        reward = make_reward(cfg.env.reward, device)  # on the run's device, as the images it scores
        gold = make_reward(cfg.env.gold, device) if cfg.env.gold else None
        # a diagnostic: building it (a head's init draws numbers) leaves the run's random stream alone
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            self.monitor = make_reward(cfg.env.monitor, device) if cfg.env.monitor else None
        env_kwargs = dict(pipeline=pipe, reward=reward, gold=gold, num_steps=cfg.env.num_steps,
                          guidance_scale=cfg.env.guidance_scale, eta=cfg.env.eta, resolution=model.resolution)
        local = agent_cfg.per_process(world)
        # env.batch_size is a speed setting, not part of the recipe: a process whose epoch (or share of it)
        # is smaller denoises all of it in lockstep (validated: otherwise a multiple of env.batch_size)
        self.env = DenoiseVectorEnv(num_envs=min(cfg.env.batch_size, local.samples_per_epoch),
                                    prompts=cfg.env.prompts, **env_kwargs)
        self.policy = self.env.policy(lora_rank=agent_cfg.lora_rank, lora_alpha=agent_cfg.lora_alpha,
                                      lora_target_modules=agent_cfg.lora_targets)
        self.agent = cls(local, self.env, self.policy)
        self.agent.health.max_bad_steps = cfg.health.max_bad_steps
        if distributed.deepspeed_launch() and world > 1:
            self.agent.use_deepspeed(distributed.deepspeed_config(self.agent.cfg.train_batch_size,
                                                                  self.agent.cfg.max_grad_norm))
        elif cfg.shard_optimizer and world > 1:  # one process has nothing to shard: AdamW as it is
            self.agent.shard_optimizer()
        # fixed evaluation sets, the training prompts and held-out ones, each sampled with its own fixed
        # noise by an env of its own batch size (each env's seeded reset first draws from the training
        # prompt source, so that source is part of what fixes the x_T stream)
        heldout = cfg.eval.prompts or heldout_counterpart(cfg.env.prompts) or cfg.env.prompts
        self.eval_sets = {}
        for name, prompts, seed in [
            ("train", training_eval_prompts(self.env.prompt_source, cfg.env.prompts, cfg.eval.train_images, cfg.seed),
             cfg.seed + 2),
            ("heldout", make_prompt_source(heldout)(cfg.eval.num_prompts, np.random.default_rng(cfg.seed)),
             cfg.seed + 1),
        ]:
            if prompts:
                batch = min(cfg.eval.batch_size, len(prompts) // world)
                env = DenoiseVectorEnv(num_envs=batch, prompts=self.env.prompt_source, **env_kwargs)
                self.eval_sets[name] = (prompts, seed, env)
        self.hacks = HackDetector(cfg.diagnostics.hacked_quantile)
        self.stopper = EarlyStopper(cfg.early_stop.patience)
        # without a monitor, checkpoints/best keeps the best gold (early stopping on it is refused)
        self.watched = WATCHED["gold" if self.monitor is None else cfg.early_stop.watch]
        self.best_score = -math.inf
        self.start_epoch = 0
        seed = distributed.rank_seed(cfg.seed)
        self.env.reset(seed=seed)
        self.agent.generator.manual_seed(seed)
        last = self.run_dir / "checkpoints" / "last"
        # a save that died between its two renames left the previous checkpoint, which is loaded instead
        resume = bool(cfg.resume and find_checkpoint(last))
        if len(set(distributed.gather_objects(resume))) > 1:
            raise RuntimeError(f"only some processes see {last}: output_dir must be on a filesystem every process reads")
        if resume:
            self._resume(last)
        # the logger drops what the folder holds from start_epoch on (metrics.jsonl and TensorBoard)
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, purge_step=self.start_epoch)
        if self.is_main:  # in one rename: a kill mid-write must not leave a truncated config to resume under
            tmp = self.run_dir / ".config.yaml.tmp"
            OmegaConf.save(cfg, tmp, resolve=True)
            tmp.replace(self.run_dir / "config.yaml")
        if self.start_epoch == 0:
            table = {f"agent.{k}": v for k, v in asdict(agent_cfg).items()}
            table.update({k: v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()
                          if not k.startswith("agent.")})
            self.logger.hparams(table)

    # -- one epoch ------------------------------------------------------------------------------
    def epoch(self, epoch: int) -> dict[str, float]:
        from t2i_rl.diagnostics import kl_to_base, pixel_diversity, rollout_metrics

        start = time.perf_counter()
        rollout = self.agent.collect()
        collect_s = time.perf_counter() - start
        collected = len(rollout)
        rows, nonfinite = self._finite_rows(rollout)
        health = {"health/nonfinite_rewards": float(nonfinite)}
        if not len(rows):  # nothing to learn from: no update, and one bad step
            self.agent.health.allows(math.nan)
            return {**health, "health/skipped_steps": float(self.agent.health.take_skipped())}
        if len(rows) < collected:
            rollout = self.agent.keep_rows(rollout, rows)
        # every process's rewards and verdicts: the hacked threshold is the whole batch's quantile
        rewards = distributed.gather(rollout.rewards)
        info = {k: distributed.gather(v) for k, v in rollout.info.items()}
        metrics = rollout_metrics(rewards, info)
        metrics["overopt/hacked_frac"] = self.hacks(rewards, info.get("gold/correct"))
        metrics.update(pixel_diversity(rollout.images, rollout.prompts))
        k = min(len(rollout), self.cfg.diagnostics.kl_samples)
        metrics["policy/kl_to_base"] = kl_to_base(self.policy, rollout.latents[:k], rollout.embeds[:k],
                                                  self.cfg.diagnostics.kl_every_step)
        metrics.update(self.agent.update(rollout))
        metrics.update(health, **{"health/skipped_steps": float(self.agent.health.take_skipped())})
        metrics["time/samples_per_s"] = collected * distributed.world_size() / collect_s
        metrics["time/epoch_s"] = time.perf_counter() - start
        if self.cfg.samples.every and epoch % self.cfg.samples.every == 0 and self.is_main:
            self._log_samples(epoch, rollout)
        return distributed.mean_metrics(metrics)

    def _finite_rows(self, rollout) -> tuple[torch.Tensor, int]:
        """The rows to train on, those whose reward is finite, and the count of the others in every
        process. Each process keeps as many rows as the one with the fewest (in multiples of the
        agent's `rows_per_update`), so that all of them take the same optimizer steps."""
        finite = torch.isfinite(rollout.rewards).cpu()
        counts = distributed.gather_objects(int(finite.sum()))
        keep = min(counts) // self.agent.rows_per_update * self.agent.rows_per_update
        return finite.nonzero().flatten()[:keep], len(rollout) * len(counts) - sum(counts)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Every evaluation set (`eval/train/*`, `eval/heldout/*`), each with its own fixed x_T and
        sampler noise, so epoch 0 scores the base model on exactly the images later epochs redraw.
        The per-image scores go to `evals/epoch<NNNN>.json` (the prompts in sampling order) and the
        images to `evals/epoch<NNNN>.npz` (uint8 [N, H, W, 3] per set, in the same order), so that two
        evaluations, or two runs of one seed, compare image by image (paired), by eye as well."""
        out: dict[str, float] = {}
        record: dict[str, dict[str, list]] = {}
        pixels: dict[str, np.ndarray] = {}
        for name, (prompts, seed, env) in self.eval_sets.items():
            judged, values, pixels[name] = self._sample_set(prompts, seed, env)
            out.update(score_summary(f"eval/{name}", judged, values, self.cfg.seed))
            record[name] = {"prompts": judged, **{k: v.tolist() for k, v in values.items()}}
        if self.is_main and record:
            # the images first: a json on disk means its images are too (`python -m t2i_rl.audit` reads both);
            # each file in one rename, so a run killed mid-write leaves the previous file or none
            folder, name = self.run_dir / "evals", f"epoch{epoch:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.npz.tmp"
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **pixels)
            tmp.replace(folder / f"{name}.npz")
            tmp = folder / f".{name}.json.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(folder / f"{name}.json")
        return out

    def _sample_set(self, prompts: list[str], seed: int,
                    eval_env) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
        """One image per prompt with the set's fixed noise: (prompts, {proxy, gold, gold_correct, gold_unsure} per image,
        the images as uint8 [N, H, W, 3]). Several processes each sample an equal share; the scores and
        images are gathered in rank order."""
        share = len(prompts) // distributed.world_size()
        mine = prompts[distributed.rank() * share:(distributed.rank() + 1) * share]
        seed = distributed.rank_seed(seed)
        eval_env.reset(seed=seed)
        # the package's sampler for every agent (TRL's and SB3's too), with noise of the set's own
        rollout = run_episodes(eval_env, self.policy, len(mine), torch.Generator().manual_seed(seed), mine)
        values = {"proxy": rollout.rewards}
        if self.monitor is not None:
            values["monitor"] = self.monitor(rollout.images, mine).scores
        if "gold/score" in rollout.info:
            values.update(gold=rollout.info["gold/score"], gold_correct=rollout.info["gold/correct"],
                          gold_unsure=rollout.info["gold/unsure"])
        pixels = (rollout.images.clamp(0, 1) * 255).round().to(torch.uint8)  # 4x less to gather than float
        return (distributed.gather_list(mine),
                {k: distributed.gather(v).double().cpu().numpy() for k, v in values.items()},
                distributed.gather(pixels).permute(0, 2, 3, 1).cpu().numpy())

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        bar = tqdm(range(self.start_epoch, cfg.epochs), initial=self.start_epoch, total=cfg.epochs,
                   desc=f"{cfg.agent.name}/{cfg.env.name}", dynamic_ncols=True, disable=not self.is_main)
        start, last_epoch = time.perf_counter(), cfg.epochs - 1
        for epoch in bar:
            last_epoch = epoch
            evaluating = epoch == 0 or (cfg.eval.every and epoch % cfg.eval.every == 0)
            metrics = self.evaluate(epoch) if evaluating else {}
            self._save_if_best(epoch, metrics)
            try:
                metrics.update(self.epoch(epoch))
            except TrainingDiverged as err:
                self.logger.close()
                last = self.run_dir / "checkpoints" / "last"
                kept = f"{last} (epoch {epoch - 1}) is the last good state" if epoch else "no checkpoint was saved"
                raise TrainingDiverged(f"training diverged at epoch {epoch}: {err}; the run stops, {kept}") from None
            self.logger.log(epoch, metrics)
            bar.set_postfix(proxy=f"{metrics.get('reward/proxy', float('nan')):.3f}",
                            gold=f"{metrics.get('reward/gold', float('nan')):.3f}")
            stop = self.watched in metrics and cfg.early_stop.enabled and self.stopper.update(
                metrics[self.watched], metrics.get("eval/train/proxy", metrics["eval/heldout/proxy"]))
            self._save_last(epoch)
            if stop:
                tqdm.write(f"early stop at epoch {epoch}: {self.watched} fell for {cfg.early_stop.patience} "
                           "evaluations while the proxy rose; checkpoints/best holds the evaluation best on it")
                break
            if cfg.budget_minutes and epoch < cfg.epochs - 1:
                # every process stops after the same epoch: the slowest one's clock decides
                minutes = max(distributed.gather_objects(time.perf_counter() - start)) / 60
                if minutes >= cfg.budget_minutes:
                    tqdm.write(f"time budget of {cfg.budget_minutes:g} min spent after epoch {epoch}")
                    break
        final = self.evaluate(last_epoch + 1)
        self._save_if_best(last_epoch + 1, final)
        if final:
            self.logger.log(last_epoch + 1, final)
        self.logger.close()
        if self.is_main:
            runlock.release(self.run_dir)
        return {**metrics, **{f"final/{k}": v for k, v in final.items()}}

    # -- checkpoints ------------------------------------------------------------------------
    def _save_if_best(self, epoch: int, scores: dict[str, float]) -> None:
        """`checkpoints/best` when the evaluation `scores` of epoch `epoch` beat the best held-out score
        that early stopping watches (`early_stop.watch`) so far: saved right after the evaluation,
        before the epoch's update, so that it holds the weights that earned them, with the scores and
        that epoch as its trainer state."""
        from t2i_rl.checkpoint import save_checkpoint

        score = scores.get(self.watched, math.nan)
        if not score > self.best_score:
            return
        self.best_score = score
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / "best", self.policy, {"epoch": epoch, "scores": scores})

    def _save_last(self, epoch: int) -> None:
        from t2i_rl.checkpoint import save_checkpoint

        # each process's own random streams (sampling noise, prompts), so each resumes its own
        rank_rngs = distributed.gather_objects({"generator": self.agent.generator.get_state(),
                                                "env": self.env.get_rng_state(), "torch": torch.get_rng_state()})
        # a sharded optimizer's states, every rank's shard, go to rank 0's agent.state_dict()
        self.agent.consolidate_optimizer()
        if not self.is_main:
            return
        state = {"epoch": epoch, "agent": self.agent.state_dict(),
                 "hack_threshold": self.hacks.threshold, "stopper": self.stopper.history, "rank_rngs": rank_rngs}
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.policy, state)

    def _resume(self, path: Path) -> None:
        from t2i_rl.checkpoint import find_checkpoint, load_checkpoint, load_trainer_state

        state = load_checkpoint(path, self.policy)
        self.agent.load_state_dict(state["agent"])
        for group in self.agent.optimizer.param_groups:  # the config's (resume=force may change them)
            group.update(adamw_settings(self.agent.cfg))
        self.hacks.threshold = state["hack_threshold"]
        self.stopper.history = state["stopper"]
        best = find_checkpoint(path.parent / "best")  # its score: the final evaluation's may be newer than `last`
        self.best_score = load_trainer_state(best)["scores"].get(self.watched, -math.inf) if best else -math.inf
        self.start_epoch = state["epoch"] + 1
        rank, rank_rngs = distributed.rank(), state.get("rank_rngs", [])
        if rank < len(rank_rngs):
            own = rank_rngs[rank]
            self.agent.generator.set_state(own["generator"])
            self.env.set_rng_state(own["env"])
            torch.set_rng_state(own["torch"])
        elif rank > 0:  # more processes than the run that saved it: a fresh stream of this process's own
            seed = distributed.rank_seed(self.cfg.seed + self.start_epoch)
            self.env.reset(seed=seed)
            self.agent.generator.manual_seed(seed)

    def _log_samples(self, epoch: int, rollout) -> None:
        from t2i_rl.diagnostics import image_grid

        n = min(len(rollout), self.cfg.samples.num)
        gold = rollout.info.get("gold/score", torch.full((n,), float("nan")))
        caption = "\n".join(f"{i}: {rollout.prompts[i]} | proxy {rollout.rewards[i]:.3f} | gold {gold[i]:.2f}  "
                            for i in range(n))
        self.logger.images("samples/train", image_grid(rollout.images[:n]), epoch, caption)


def score_summary(prefix: str, prompts: list[str], values: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Each score's mean and 95% interval: Wilson for the rates (all-correct, taken over the images the
    judge is sure about, and the unsure share), a bootstrap over prompts for the means (the images of
    one prompt are not independent draws of the policy's quality)."""
    from t2i_rl.intervals import bootstrap_mean_interval, wilson_interval

    out = {}
    sure = values["gold_unsure"] < 0.5 if "gold_unsure" in values else None
    for key, v in values.items():
        if key == "gold_correct" and sure is not None:
            v = v[sure]
        if key in ("gold_correct", "gold_unsure"):
            mean = float(v.mean()) if len(v) else float("nan")
            low, high = wilson_interval(v.sum(), len(v)) if len(v) else (float("nan"), float("nan"))
        else:
            mean, (low, high) = float(v.mean()), bootstrap_mean_interval(v, prompts, seed=seed)
        out.update({f"{prefix}/{key}": mean, f"{prefix}/{key}/ci_low": low, f"{prefix}/{key}/ci_high": high})
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run(cfg: DictConfig, validated: tuple | None = None) -> dict[str, float]:
    metrics = Trainer(cfg, validated).fit()
    distributed.shutdown()
    return metrics


def hydra_entry(validated: tuple | None = None) -> Callable[[], None]:
    """The Hydra app that trains: `validated` is `precheck`'s result when it composed and validated
    the config already (Hydra composes the same one), else the app validates it."""
    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        try:
            checked = validated or validate(cfg)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        from t2i_rl.checkpoint import DiskFull  # after validation: it imports diffusers

        try:
            run(cfg, checked)
        except (TrainingDiverged, DiskFull, runlock.RunFolderInUse) as err:  # stopped; or another run took it
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, runlock.RunFolderInUse) else 1)

    return app


def precheck(argv: list[str]) -> tuple:
    """Compose and validate the config as Hydra will, so that any mistake is one line, not a page;
    returns what `validate` returned."""
    return validate(compose_config(argv))


def compose_config(argv: list[str]) -> DictConfig:
    """The config of these overrides, composed as Hydra composes it; a bad override is one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_overrides(argv)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(str(err).splitlines()[0]) from None
    return cfg


def main() -> None:
    argv = sys.argv[1:]
    validated = None
    if not any(a.startswith("-") for a in argv):  # Hydra's own flags (--help, --multirun) go through
        try:
            validated = precheck(argv)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_entry(validated)()


if __name__ == "__main__":
    main()
