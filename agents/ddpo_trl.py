"""DDPO through TRL's `DDPOTrainer` (trl==0.23.1, the last TRL that has it): the same algorithm as
`agents.ddpo`, run by TRL's code, on our pipeline, policy weights, prompts and reward.

How an epoch maps onto TRL:

- `collect()` runs TRL's sampler, `DDPOTrainer._generate_samples` (TRL's `pipeline_step`, its
  stochastic DDIM `scheduler_step` with log-probs), then `DDPOTrainer.compute_rewards` with our
  reward adapted to TRL's `reward_function(images, prompts, metadata) -> (rewards, metadata)`.
  Prompts come from the env through TRL's `prompt_function`: each batch is one `env.reset()`,
  which draws the prompts and x_T exactly as the native agent's episodes do, and x_T is handed to
  TRL's pipeline. The gold judge (a diagnostic, never a reward) scores the images afterwards.
- `update(rollout)` is one `DDPOTrainer.step(epoch, global_step)`: advantages (TRL's per-prompt
  stat tracker), shuffling, re-batching, `_train_batched_samples` -> `calculate_loss` with
  accelerate's gradient accumulation over the trained timesteps, clipping, AdamW. The trainer's
  sampling and reward hooks replay the rollout instead of sampling again, so the epoch trains on
  exactly the transitions the Trainer logged (and on any Rollout, also one collected natively).

TRL's pipeline wraps the env's very modules (UNet with the policy's LoRA adapter, VAE, text
encoder), so TRL's optimizer updates exactly `policy.trainable_parameters()`, and the policy's
KL to the base model, the evaluation and checkpoints all see TRL's updates (the Trainer evaluates
with the package's sampler, `agents.base.run_episodes`, as it does every agent). TRL's metrics arrive
through an in-memory accelerate tracker (its `accelerator.log` calls) and its `image_samples_hook`.

Several processes (`accelerate launch`): TRL's accelerator joins the launch's process group, TRL
gathers every process's rewards and prompts for its advantages and keeps its own rows, and the
gradients are averaged over the processes where TRL clips them (`_average_gradients_before_clipping`).

TRL draws its sampling noise and its shuffles from torch's global RNG; they are drawn here from
the agent's own generator (the global RNG is swapped in and restored), so runs are reproducible
and checkpoints resume exactly; on the CPU, with the same seeds, TRL samples the very x_T and
noise that the native agent samples.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2i_rl import distributed
from t2i_rl.policy import prompt_ids

from .base import Agent, Rollout
from .ddpo import DDPOConfig

# Keys that TRL logs after each optimizer step, and the names they get here (the README's stable tags).
_TRL_TAGS = {"loss": "loss/policy", "approx_kl": "policy/approx_kl", "clipfrac": "policy/clipfrac"}


@dataclass
class TRLDDPOConfig(DDPOConfig):
    """The native DDPO config (same fields, same meaning) plus what TRL's trainer needs.

    Mapping onto `trl.DDPOConfig`: lr -> train_learning_rate, weight_decay ->
    train_adam_weight_decay, max_grad_norm -> train_max_grad_norm (0: inf), train_batch_size,
    clip_range -> train_clip_range, adv_clip_max -> train_adv_clip_max, inner_epochs ->
    train_num_inner_epochs, timestep_fraction -> train_timestep_fraction, per_prompt_stat_tracking
    (+ stat_buffer_size, stat_min_count -> per_prompt_stat_tracking_buffer_size / _min_count);
    samples_per_epoch / env batch -> sample_num_batches_per_epoch; the env gives sample_num_steps,
    sample_guidance_scale, sample_eta, sample_batch_size; train_cfg = (guidance > 1), as sampled.
    """

    name: str = "ddpo_trl"
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "TRL's train_gradient_accumulation_steps: minibatches of train_batch_size per optimizer "
                "step (1: one optimizer step per minibatch, as the native agent does)"})
    seed: int = field(default=0, metadata={
        "help": "TRL's config seed (its set_seed at construction; the global RNG is restored afterwards)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"agent.gradient_accumulation_steps = {self.gradient_accumulation_steps} is "
                             f"invalid: {self.help('gradient_accumulation_steps')}; must be >= 1")
        if self.seed < 0:
            raise ValueError(f"agent.seed = {self.seed} is invalid: must be >= 0")
        # What TRL's DDPOTrainer cannot do: say so instead of silently training something else.
        if self.kl_coef != 0:
            raise ValueError(f"agent.kl_coef = {self.kl_coef} is invalid for ddpo_trl: TRL's DDPO loss has no KL "
                             "penalty; use kl_coef=0 (or agent=ddpo / agent=dpok for a KL term)")
        if self.train_steps != 0:
            raise ValueError(f"agent.train_steps = {self.train_steps} is invalid for ddpo_trl: TRL samples the trained "
                             "steps from all T; use train_steps=0 (or agent=ddpo)")
        if self.score_pool != 1:
            raise ValueError(f"agent.score_pool = {self.score_pool} is invalid for ddpo_trl: TRL's loss scores the "
                             "whole action; use score_pool=1 (or agent=ddpo)")
        if self.group_size != 0:
            raise ValueError(f"agent.group_size = {self.group_size} is invalid for ddpo_trl: TRL draws one prompt "
                             "per sample and has no GRPO-style groups; use group_size=0 (or agent=ddpo)")


def _memory_tracker():
    """An accelerate tracker that keeps TRL's `accelerator.log` calls in memory (the class is made
    here so that importing this module does not import accelerate)."""
    from accelerate.tracking import GeneralTracker

    class MemoryTracker(GeneralTracker):
        name = "t2i_rl_memory"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.config: dict[str, Any] = {}
            self.records: list[tuple[int | None, dict[str, Any]]] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            self.config = dict(values)

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.records.append((step, dict(values)))

        def pop(self) -> list[tuple[int | None, dict[str, Any]]]:
            out, self.records = self.records, []
            return out

    return MemoryTracker()


def _shared_pipeline_class():
    """TRL's default DDPO pipeline, built around an existing StableDiffusionPipeline's modules
    instead of `from_pretrained` (no download, and the very weights our policy trains)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from trl.models.modeling_sd_base import DefaultDDPOStableDiffusionPipeline, pipeline_step

    class SharedDDPOPipeline(DefaultDDPOStableDiffusionPipeline):
        def __init__(self, pipe, trainable: list[torch.nn.Parameter], num_steps: int, initial_latents) -> None:
            # Not super().__init__: that loads from a name or path. Same modules, own scheduler, so
            # TRL's set_timesteps never moves the env's or the policy's schedule.
            self.sd_pipeline = StableDiffusionPipeline(
                vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            self.sd_pipeline.scheduler.set_timesteps(num_steps, device=pipe.device)
            self.sd_pipeline.set_progress_bar_config(disable=True)
            # TRL's use_lora path would add its own adapter (rank 4, gaussian) and optimize the whole
            # UNet module; here the policy owns the adapter and TRL gets exactly its trainable
            # parameters as a list (TRL's `not use_lora` branch), whatever lora_rank is.
            self.use_lora = False
            self.pretrained_model = getattr(pipe, "name_or_path", None) or "t2i_rl"
            self.pretrained_revision = "main"
            self._trainable = trainable
            self._initial_latents = initial_latents  # () -> x_T [B, C, h, w] for the next batch

        def __call__(self, *args, **kwargs):
            if kwargs.get("latents") is None:
                kwargs["latents"] = self._initial_latents()
            return pipeline_step(self.sd_pipeline, *args, **kwargs)

        def get_trainable_layers(self):
            return self._trainable

        @property
        def autocast(self):
            return contextlib.nullcontext

        def set_progress_bar_config(self, *args, **kwargs):
            # TRL turns the per-sampling tqdm bar on; one bar per batch would flood the run's log.
            self.sd_pipeline.set_progress_bar_config(disable=True)

    return SharedDDPOPipeline


def _replaying_trainer_class():
    from trl import DDPOTrainer

    class ReplayingDDPOTrainer(DDPOTrainer):
        """`DDPOTrainer` whose `step` can train on samples collected beforehand: while `replay` is
        set, the sampling and reward hooks of `step` return it instead of sampling again."""

        replay: tuple[list[dict], list[list], tuple] | None = None

        def _generate_samples(self, iterations, batch_size):
            if self.replay is None:
                return super()._generate_samples(iterations, batch_size)
            samples, image_data, _ = self.replay
            return samples, image_data

        def compute_rewards(self, prompt_image_pairs, is_async=False):
            if self.replay is None:
                return super().compute_rewards(prompt_image_pairs, is_async=is_async)
            return self.replay[2]

    return ReplayingDDPOTrainer


def _average_gradients_before_clipping(accelerator) -> None:
    """Average the gradients over the processes where TRL clips them, once per optimizer step.

    TRL hands accelerate a list of parameters, which `accelerator.prepare` leaves as it is (no DDP
    wrapper; TRL also calls the bare UNet), so nothing else would synchronize them; averaging
    before the clip is what DDP and the native agents do."""
    clip = accelerator.clip_grad_norm_

    def average_then_clip(parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        distributed.average_gradients(parameters)
        return clip(parameters, max_norm, norm_type)

    accelerator.clip_grad_norm_ = average_then_clip


@contextlib.contextmanager
def rng_from(generator: torch.Generator) -> Iterator[None]:
    """Run code that draws from torch's global RNG (TRL's noise, shuffles) on `generator`'s stream:
    the global state is swapped in from `generator`, written back to it afterwards, and the global
    RNG is restored. On CUDA the device RNG is seeded from one draw of `generator`."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    cuda_seed = int(torch.randint(2**62, (1,), generator=generator)) if devices else None
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(generator.get_state())
        if cuda_seed is not None:
            torch.cuda.manual_seed(cuda_seed)
        try:
            yield
        finally:
            generator.set_state(torch.get_rng_state())


@contextlib.contextmanager
def _restore_global_rngs() -> Iterator[None]:
    """TRL's constructor calls accelerate's set_seed (python, numpy, torch); keep the run's RNGs."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class TRLDDPOAgent(Agent):
    """DDPO by TRL's DDPOTrainer on the env's pipeline, the policy's weights and the env's reward."""

    config_class = TRLDDPOConfig
    cfg: TRLDDPOConfig
    own_optimizer_reason = "TRL's DDPOTrainer builds and steps its own (accelerate-wrapped) optimizer"

    def __init__(self, cfg: TRLDDPOConfig, env, policy) -> None:
        super().__init__(cfg, env, policy)
        from accelerate import PartialState
        from trl import DDPOConfig as TRLConfig

        pipe = env.pipe
        if policy.unet is not pipe.unet:
            raise ValueError("the policy must be built on the env's pipeline (env.policy(...)): TRL samples "
                             "with the env's modules and must train the policy's weights")
        if (policy.num_steps, policy.guidance_scale, policy.eta) != (env.num_steps, float(env.guidance_scale),
                                                                     float(env.eta)):
            raise ValueError("the policy's num_steps, guidance_scale and eta must be the env's")
        if pipe.unet.dtype != torch.float32:
            raise ValueError(f"ddpo_trl needs a float32 pipeline (model.dtype=float32), got {pipe.unet.dtype}: "
                             "TRL casts the pipeline to its inference dtype, and mixed precision is off here")
        batch = env.num_envs
        if batch % cfg.train_batch_size:
            raise ValueError(f"env.batch_size ({batch}) must be a multiple of agent.train_batch_size "
                             f"({cfg.train_batch_size}): TRL re-batches each sampling batch")
        n_batches = cfg.samples_per_epoch // batch
        if (cfg.samples_per_epoch // cfg.train_batch_size) % cfg.gradient_accumulation_steps:
            raise ValueError(f"agent.samples_per_epoch / agent.train_batch_size "
                             f"({cfg.samples_per_epoch // cfg.train_batch_size}) must be a multiple of "
                             f"agent.gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")
        self.num_train_timesteps = int(env.num_steps * cfg.timestep_fraction)  # TRL truncates, native rounds
        if self.num_train_timesteps < 1:
            raise ValueError(f"agent.timestep_fraction ({cfg.timestep_fraction}) x env.num_steps ({env.num_steps}) "
                             "trains on no step in TRL (it truncates); raise timestep_fraction")

        on_cpu = pipe.device.type == "cpu"
        state = PartialState(cpu=on_cpu)  # before the trainer: accelerate's logger needs a state
        self.tracker = _memory_tracker()
        self.trl_config = TRLConfig(
            exp_name="t2i_rl-ddpo_trl", seed=cfg.seed, log_with=self.tracker,
            accelerator_kwargs={"cpu": on_cpu}, num_epochs=1 << 30, save_freq=1 << 30,
            mixed_precision="no", allow_tf32=False,
            sample_num_steps=env.num_steps, sample_eta=float(env.eta),
            sample_guidance_scale=float(env.guidance_scale), sample_batch_size=batch,
            sample_num_batches_per_epoch=n_batches,
            train_batch_size=cfg.train_batch_size, train_learning_rate=cfg.lr,
            train_adam_weight_decay=cfg.weight_decay, train_adam_beta1=cfg.adam_beta1,
            train_max_grad_norm=cfg.max_grad_norm or math.inf,
            train_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            train_num_inner_epochs=cfg.inner_epochs, train_cfg=float(env.guidance_scale) > 1.0,
            train_adv_clip_max=cfg.adv_clip_max, train_clip_range=cfg.clip_range,
            train_timestep_fraction=cfg.timestep_fraction,
            per_prompt_stat_tracking=cfg.per_prompt_stat_tracking,
            per_prompt_stat_tracking_buffer_size=cfg.stat_buffer_size,
            per_prompt_stat_tracking_min_count=cfg.stat_min_count,
            negative_prompts=None,  # the unconditional half of guidance is "", as the policy's
        )
        self.trl_pipeline = _shared_pipeline_class()(pipe, self.params, env.num_steps, self._next_initial_latents)
        self._prompts: deque[str] = deque()
        self._latents: deque[torch.Tensor] = deque()
        self.last_image_data: list[list] = []
        with _restore_global_rngs(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DDPOTrainer is deprecated", category=DeprecationWarning)
            self.trainer = _replaying_trainer_class()(
                self.trl_config, reward_function=self._reward_function, prompt_function=self._prompt_function,
                sd_pipeline=self.trl_pipeline,
                # accelerate gives trackers to the main process only, and TRL hands the hook trackers[0]
                image_samples_hook=self._image_samples_hook if state.is_main_process else None,
            )
        self.optimizer = self.trainer.optimizer  # TRL's AdamW (accelerate-wrapped) over self.params
        self.guard_steps(self.optimizer.optimizer)  # the AdamW itself: accelerate calls it once per optimizer step
        # TRL re-batches the rollout and accumulates over whole optimizer steps
        self.rows_per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps
        if state.num_processes > 1:
            _average_gradients_before_clipping(self.trainer.accelerator)
        self.epoch = 0
        self.global_step = 0

    # -- TRL's hooks ---------------------------------------------------------------------------------
    def _draw_batch(self, prompts: list[str] | None = None) -> None:
        """One env.reset(): the prompts and x_T of the next sampling batch, as the native agent draws them."""
        obs, info = self.env.reset(options=None if prompts is None else {"prompts": prompts})
        self._prompts.extend(info["prompt"])
        self._latents.append(obs["latents"] / self.policy.scheduler.init_noise_sigma)

    def _prompt_function(self) -> tuple[str, dict]:
        """TRL's prompt_function: the env's next prompt (a batch is drawn when none is queued)."""
        if not self._prompts:
            self._draw_batch()
        return self._prompts.popleft(), {}

    def _next_initial_latents(self) -> torch.Tensor:
        if not self._latents:
            raise RuntimeError("TRL sampled a batch whose prompts did not come from the env's prompt function")
        return self._latents.popleft()

    def _reward_function(self, images: torch.Tensor, prompts, metadata) -> tuple[torch.Tensor, dict]:
        """TRL's reward_function: the env's reward on TRL's images ([0, 1] tensors); its components ride
        in the reward metadata."""
        out = self.env.reward_fn(images.float(), list(prompts))
        return out.scores.detach().float(), {f"reward/{k}": v.detach().float() for k, v in out.components.items()}

    def _image_samples_hook(self, prompt_image_data: list[list], global_step: int, tracker) -> None:
        """TRL's image_samples_hook: [images, prompts, prompt metadata, rewards, reward metadata] per
        batch. The Trainer logs image grids from the rollout; here the batches are kept for inspection
        and their reward statistics go to TRL's tracker."""
        self.last_image_data = prompt_image_data
        rewards = torch.cat([torch.as_tensor(d[3]).flatten().float() for d in prompt_image_data])
        tracker.log({"hook/images": float(rewards.numel()), "hook/reward_mean": rewards.mean().item()},
                    step=global_step)

    # -- 1. collect: TRL's sampler and reward ----------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str] | None = None) -> Rollout:
        batch = self.env.num_envs
        n = len(prompts) if prompts is not None else self.cfg.samples_per_epoch
        if n % batch:
            raise ValueError(f"{n} prompts are not a multiple of the env's batch size {batch}")
        self._prompts.clear()
        self._latents.clear()
        for start in range(0, n, batch):
            self._draw_batch(None if prompts is None else list(prompts[start:start + batch]))
        with rng_from(self.generator):
            samples, image_data = self.trainer._generate_samples(iterations=n // batch, batch_size=batch)
        rewards, reward_meta = self.trainer.compute_rewards(image_data)
        parts = []
        for sample, (images, batch_prompts, _), r, meta in zip(samples, image_data, rewards, reward_meta):
            info = {k: v.to(r.device) for k, v in meta.items()}
            if self.env.gold_fn is not None:  # diagnostics only: never reaches TRL's reward
                gold = self.env.gold_fn(images.float(), list(batch_prompts))
                info.update({k: v.detach().float().to(r.device) for k, v in gold.components.items()})
            latents = torch.cat([sample["latents"], sample["next_latents"][:, -1:]], dim=1)
            parts.append(Rollout(list(batch_prompts), sample["prompt_embeds"], latents,
                                 sample["log_probs"].float(), r.float(), images.float(), info))
        return Rollout.cat(parts)

    def trl_samples(self, rollout: Rollout) -> tuple[list[dict], list[list], tuple]:
        """A Rollout as TRL's (samples, prompt_image_data, (rewards, reward_metadata)) of one batch."""
        trainer, b = self.trainer, len(rollout)
        device = trainer.accelerator.device
        ids = prompt_ids(self.policy.pipe, rollout.prompts).to(device)
        timesteps = self.trl_pipeline.scheduler.timesteps.to(device).repeat(b, 1)
        samples = {
            "prompt_ids": ids,
            "prompt_embeds": rollout.embeds.to(device),
            "timesteps": timesteps,
            "latents": rollout.latents[:, :-1].to(device),
            "next_latents": rollout.latents[:, 1:].to(device),
            "log_probs": rollout.log_probs.to(device),
            "negative_prompt_embeds": trainer.neg_prompt_embed.repeat(b, 1, 1),
        }
        meta = {k: v for k, v in rollout.info.items() if k.startswith("reward/")}
        return [samples], [[rollout.images, tuple(rollout.prompts), ({},) * b]], ((rollout.rewards.to(device),), (meta,))

    # -- 2. update: one DDPOTrainer.step on the rollout ------------------------------------------------
    def update(self, rollout: Rollout) -> dict[str, float]:
        if len(rollout) % self.cfg.train_batch_size:
            raise ValueError(f"a rollout of {len(rollout)} samples is not a multiple of agent.train_batch_size "
                             f"({self.cfg.train_batch_size})")
        trainer = self.trainer
        # accelerate's gradient state is a process-wide singleton: another TRL agent may have set it
        trainer.accelerator.gradient_accumulation_steps = (self.cfg.gradient_accumulation_steps
                                                           * self.num_train_timesteps)
        trainer.accelerator.step = 0
        self.tracker.pop()
        trainer.replay = self.trl_samples(rollout)
        first_step = self.global_step
        try:
            with rng_from(self.generator):
                self.global_step = trainer.step(self.epoch, self.global_step)
        finally:
            trainer.replay = None
        self.epoch += 1
        records = [values for _, values in self.tracker.pop()]
        out: dict[str, float] = {}
        for key, tag in _TRL_TAGS.items():
            vals = [float(torch.as_tensor(r[key]).detach().float().mean()) for r in records if key in r]
            if vals:
                out[tag] = sum(vals) / len(vals)
        steps = [r for r in records if "reward_mean" in r]
        if steps:
            out["trl/reward_mean"] = float(steps[-1]["reward_mean"])
            out["trl/reward_std"] = float(steps[-1]["reward_std"])
        # TRL counts one global step per optimizer step (its logs reach the main process only)
        out["trl/optimizer_steps"] = float(self.global_step - first_step)
        return out

    # -- 3. state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        tracker = getattr(self.trainer, "stat_tracker", None)
        return {
            **super().state_dict(),
            "trl_stat_tracker": {} if tracker is None else {str(p): [float(x) for x in b]
                                                         for p, b in tracker.stats.items()},
            "epoch": self.epoch,
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        tracker = getattr(self.trainer, "stat_tracker", None)
        if tracker is not None:
            tracker.stats = {p: deque(v, maxlen=tracker.buffer_size) for p, v in state["trl_stat_tracker"].items()}
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
