"""Train a policy: `python -m t2i_rl.train agent=ddpo env=textnorm [model=shapes] [key=value ...]`.

A run folder (`output_dir`) holds TensorBoard events (tb/), `metrics.jsonl` (one JSON object per
epoch, the same numbers), the resolved `config.yaml`, checkpoints (checkpoints/last, and
checkpoints/best by held-out gold) and sample grids. Running the same command again resumes from
checkpoints/last and continues the same run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from t2i_rl import distributed

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("agent", "env", "model")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Unknown group options fail in one line before Hydra prints a page about them."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in GROUPS and value not in group_options(key):
            raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(group_options(key))}")


def eval_counts(cfg: DictConfig) -> list[tuple[str, int]]:
    """The image counts of the evaluation sets, which batches of eval.batch_size must fill."""
    return [("eval.train_images", cfg.eval.train_images), ("eval.num_prompts", cfg.eval.num_prompts)]


def model_float16(model: DictConfig, agent_cfg) -> bool:
    """Whether the UNet will run in float16: LoRA over float16 weights (full fine-tuning trains a
    float32 UNet whatever model.dtype says)."""
    return model.dtype == "float16" and agent_cfg.lora_rank is not None


def validate(cfg: DictConfig):
    """Build and validate the agent config and the run settings; raise ValueError on bad values."""
    from agents import agent_class
    from envs import make_prompt_source
    from t2i_rl.models import check_model_config

    cls = agent_class(cfg.agent.name)
    agent_cfg = cls.config_class.from_dict(OmegaConf.to_container(cfg.agent, resolve=True))
    check_model_config(cfg.model)
    try:  # a prompt file that is missing or unreadable fails here, in one line, not after the models load
        make_prompt_source(cfg.env.prompts)
    except FileNotFoundError as err:
        raise ValueError(f"env.prompts = {cfg.env.prompts} is invalid: {err}") from None
    world = distributed.launched_world_size()
    distributed.check_precision(cfg.model.dtype)
    if model_float16(cfg.model, agent_cfg) and cls.own_optimizer_reason:
        raise ValueError(f"model.dtype = float16 is invalid for agent={cfg.agent.name} with LoRA: its float16 "
                         f"gradients need loss scaling, which its optimizer loop does not do "
                         f"({cls.own_optimizer_reason}); use model.dtype=bfloat16 or float32")
    for key, ok, rule in [
        ("epochs", cfg.epochs >= 1, ">= 1"),
        ("env.batch_size", cfg.env.batch_size >= 1, ">= 1"),
        ("env.num_steps", cfg.env.num_steps >= 1, ">= 1"),
        ("env.eta", 0 < cfg.env.eta <= 1, "in (0, 1]"),
        ("env.guidance_scale", cfg.env.guidance_scale >= 0, ">= 0"),
        ("budget_minutes", cfg.budget_minutes >= 0, ">= 0 (0: no time limit)"),
        ("shard_optimizer", isinstance(cfg.shard_optimizer, bool), "true or false"),
        ("eval.every", cfg.eval.every >= 0, ">= 0 (0: only at epoch 0)"),
        ("eval.num_prompts", cfg.eval.num_prompts >= 0, ">= 0"),
        ("eval.train_images", cfg.eval.train_images >= 0, ">= 0"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, ">= 1"),
        # one process's rule; with several, each process's share must keep it (checked below)
        *[(key, world > 1 or count <= cfg.eval.batch_size or count % cfg.eval.batch_size == 0,
           f"at most eval.batch_size ({cfg.eval.batch_size}) or a multiple of it")
          for key, count in eval_counts(cfg)],
    ]:
        if not ok:
            raise ValueError(f"{key} = {OmegaConf.select(cfg, key)} is invalid: must be {rule}")
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
        if local.samples_per_epoch % cfg.env.batch_size:
            raise ValueError(f"agent.samples_per_epoch = {agent_cfg.samples_per_epoch} is invalid with {world} "
                             f"processes: each process's share ({local.samples_per_epoch}) must be a multiple of "
                             f"env.batch_size ({cfg.env.batch_size})")
        for key, count in eval_counts(cfg):
            share, batch = count // world, cfg.eval.batch_size
            if count % world or not (share <= batch or share % batch == 0):
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

    def __init__(self, cfg: DictConfig) -> None:
        from envs import DenoiseVectorEnv, heldout_counterpart, make_prompt_source, training_eval_prompts
        from t2i_rl.checkpoint import find_checkpoint
        from t2i_rl.diagnostics import EarlyStopper, HackDetector
        from t2i_rl.logger import RunLogger, truncate_jsonl
        from t2i_rl.models import load_pipeline
        from t2i_rl.rewards import make_reward

        cls, agent_cfg = validate(cfg)
        device = distributed.init(cfg.device)
        world, self.is_main = distributed.world_size(), distributed.is_main()
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model = cfg.model  # validated: the frozen parts in model.dtype, what trains in float32
        pipe = load_pipeline(model.pipeline, dtype=getattr(torch, model.dtype), device=device,
                             attention=model.attention, gradient_checkpointing=model.gradient_checkpointing,
                             vae_slicing=model.vae_slicing)
        reward = make_reward(cfg.env.reward)
        gold = make_reward(cfg.env.gold) if cfg.env.gold else None
        env_kwargs = dict(pipeline=pipe, reward=reward, gold=gold, num_steps=cfg.env.num_steps,
                          guidance_scale=cfg.env.guidance_scale, eta=cfg.env.eta, resolution=model.resolution)
        self.env = DenoiseVectorEnv(num_envs=cfg.env.batch_size, prompts=cfg.env.prompts, **env_kwargs)
        self.policy = self.env.policy(lora_rank=agent_cfg.lora_rank, lora_alpha=agent_cfg.lora_alpha)
        self.agent = cls(agent_cfg.per_process(world), self.env, self.policy)
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
        self.best_gold = -1.0
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
            if self.is_main:
                truncate_jsonl(self.run_dir / "metrics.jsonl", self.start_epoch - 1)
        self.logger = RunLogger(self.run_dir, enabled=self.is_main,
                                purge_step=self.start_epoch if self.start_epoch else None)
        if self.is_main:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
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
        metrics["time/samples_per_s"] = len(rollout) * distributed.world_size() / collect_s
        metrics["time/epoch_s"] = time.perf_counter() - start
        if self.cfg.samples.every and epoch % self.cfg.samples.every == 0 and self.is_main:
            self._log_samples(epoch, rollout)
        return distributed.mean_metrics(metrics)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Every evaluation set (`eval/train/*`, `eval/heldout/*`), each with its own fixed x_T and
        sampler noise, so epoch 0 scores the base model on exactly the images later epochs redraw.
        The per-image scores go to `evals/epoch<NNNN>.json` (the prompts in sampling order), so that
        two evaluations, or two runs of one seed, compare image by image (paired)."""
        out: dict[str, float] = {}
        record: dict[str, dict[str, list]] = {}
        for name, (prompts, seed, env) in self.eval_sets.items():
            judged, values = self._sample_set(prompts, seed, env)
            out.update(score_summary(f"eval/{name}", judged, values, self.cfg.seed))
            record[name] = {"prompts": judged, **{k: v.tolist() for k, v in values.items()}}
        if self.is_main and record:
            path = self.run_dir / "evals" / f"epoch{epoch:04d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
        return out

    def _sample_set(self, prompts: list[str], seed: int, eval_env) -> tuple[list[str], dict[str, np.ndarray]]:
        """One image per prompt with the set's fixed noise: (prompts, {proxy, gold, gold_correct} per image).
        Several processes each sample an equal share; the scores are gathered in rank order."""
        share = len(prompts) // distributed.world_size()
        mine = prompts[distributed.rank() * share:(distributed.rank() + 1) * share]
        seed = distributed.rank_seed(seed)
        saved = self.agent.generator.get_state()
        self.agent.generator.manual_seed(seed)
        eval_env.reset(seed=seed)
        env, self.agent.env = self.agent.env, eval_env
        try:
            rollout = self.agent.collect(mine)
        finally:
            self.agent.env = env
            self.agent.generator.set_state(saved)
        values = {"proxy": rollout.rewards}
        if "gold/score" in rollout.info:
            values.update(gold=rollout.info["gold/score"], gold_correct=rollout.info["gold/correct"])
        return (distributed.gather_list(mine),
                {k: distributed.gather(v).double().cpu().numpy() for k, v in values.items()})

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
            metrics.update(self.epoch(epoch))
            self.logger.log(epoch, metrics)
            bar.set_postfix(proxy=f"{metrics['reward/proxy']:.3f}",
                            gold=f"{metrics.get('reward/gold', float('nan')):.3f}")
            stop = False
            if "eval/heldout/gold" in metrics:
                if metrics["eval/heldout/gold_correct"] > self.best_gold:
                    self.best_gold = metrics["eval/heldout/gold_correct"]
                    self._save("best", epoch)
                stop = cfg.early_stop.enabled and self.stopper.update(metrics["eval/heldout/gold"],
                                                                      metrics["eval/heldout/proxy"])
            self._save("last", epoch)
            if stop:
                tqdm.write(f"early stop at epoch {epoch}: held-out gold fell for {cfg.early_stop.patience} "
                           "evaluations while the proxy rose; the best-gold checkpoint is checkpoints/best")
                break
            if cfg.budget_minutes and epoch < cfg.epochs - 1:
                # every process stops after the same epoch: the slowest one's clock decides
                minutes = max(distributed.gather_objects(time.perf_counter() - start)) / 60
                if minutes >= cfg.budget_minutes:
                    tqdm.write(f"time budget of {cfg.budget_minutes:g} min spent after epoch {epoch}")
                    break
        final = self.evaluate(last_epoch + 1)
        if final:
            self.logger.log(last_epoch + 1, final)
        self.logger.close()
        return {**metrics, **{f"final/{k}": v for k, v in final.items()}}

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, name: str, epoch: int) -> None:
        from t2i_rl.checkpoint import save_checkpoint

        # each process's own random streams (sampling noise, prompts), so each resumes its own
        rank_rngs = distributed.gather_objects({"generator": self.agent.generator.get_state(),
                                                "env": self.env.get_rng_state(), "torch": torch.get_rng_state()})
        # a sharded optimizer's states, every rank's shard, go to rank 0's agent.state_dict()
        self.agent.consolidate_optimizer()
        if not self.is_main:
            return
        state = {"epoch": epoch, "agent": self.agent.state_dict(), "torch_rng": torch.get_rng_state(),
                 "hack_threshold": self.hacks.threshold, "stopper": self.stopper.history,
                 "best_gold": self.best_gold, "rank_rngs": rank_rngs}
        save_checkpoint(self.run_dir / "checkpoints" / name, self.policy, state)

    def _resume(self, path: Path) -> None:
        from t2i_rl.checkpoint import load_checkpoint

        state = load_checkpoint(path, self.policy)
        self.agent.load_state_dict(state["agent"])
        torch.set_rng_state(state["torch_rng"])
        self.hacks.threshold = state["hack_threshold"]
        self.stopper.history = state["stopper"]
        self.best_gold = state["best_gold"]
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
    """Each score's mean and 95% interval: Wilson for the all-correct rate, a bootstrap over prompts
    for the means (the images of one prompt are not independent draws of the policy's quality)."""
    from t2i_rl.intervals import bootstrap_mean_interval, wilson_interval

    out = {}
    for key, v in values.items():
        low, high = (wilson_interval(v.sum(), len(v)) if key == "gold_correct"
                     else bootstrap_mean_interval(v, prompts, seed=seed))
        out.update({f"{prefix}/{key}": float(v.mean()), f"{prefix}/{key}/ci_low": low,
                    f"{prefix}/{key}/ci_high": high})
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


def run(cfg: DictConfig) -> dict[str, float]:
    metrics = Trainer(cfg).fit()
    distributed.shutdown()
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    run(cfg)


def precheck(argv: list[str]) -> None:
    """Compose and validate the config as Hydra will, so that any mistake is one line, not a page."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_overrides(argv)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(str(err).splitlines()[0]) from None
    validate(cfg)


def main() -> None:
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):  # Hydra's own flags (--help, --multirun) go through
        try:
            precheck(argv)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
