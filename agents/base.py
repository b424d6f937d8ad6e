"""What every agent shares: its config, collecting rollouts through the env, one optimizer step,
and its state for checkpoints. Each algorithm is one file that adds its `update`.

The policy acts (t2i_rl.policy.DiffusionPolicy); the agent updates it (Stable-Baselines3's split).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from t2i_rl import distributed
from t2i_rl.lora import LORA_TARGETS


@dataclass
class AgentConfig:
    """Hyperparameters common to every agent. Every field is validated in `__post_init__`."""

    name: str = field(default="base", metadata={"help": "the agent's name (its file in agents/)"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={
        "help": "AdamW's beta1, the momentum's decay: its average spans about 1/(1 - beta1) steps, over "
                "which the noise of single-batch gradients cancels while their common direction adds up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    samples_per_epoch: int = field(default=32, metadata={"help": "images collected per epoch"})
    train_batch_size: int = field(default=8, metadata={"help": "samples per gradient step"})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of the per-step KL to the base model "
                                                           "added to the loss (any agent)"})
    lora_rank: int | None = field(default=8, metadata={"help": "LoRA rank; null: full fine-tuning"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "the UNet layers that carry the LoRA adapter, as PEFT's target_modules: a name matches "
                "every layer whose path ends in it (to_k: every attention's key projection; attn2.to_k: "
                "the cross-attention's only, where the prompt enters)"})

    # sample counts that hold for the whole run: with N processes each process takes 1/N of them
    per_process_fields: ClassVar[tuple[str, ...]] = ("samples_per_epoch", "train_batch_size")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, Sequence) and not isinstance(self.lora_targets, str):
            self.lora_targets = list(self.lora_targets)  # a tuple, or Hydra's ListConfig
        for f in fields(self):  # NaN or inf would reach the weights in one step; +inf only where it means "off"
            value, inf_ok = getattr(self, f.name), f.metadata.get("inf_ok", False)
            if isinstance(value, float) and not (math.isfinite(value) or value == math.inf and inf_ok):
                raise ValueError(f"agent.{f.name} = {value!r} is invalid: {self.help(f.name)}; must be a finite "
                                 f"number{' or .inf' if inf_ok else ''}")
        checks = {
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "adam_beta1": 0 <= self.adam_beta1 < 1,
            "max_grad_norm": self.max_grad_norm >= 0,
            "samples_per_epoch": self.samples_per_epoch >= 1,
            "train_batch_size": self.train_batch_size >= 1,
            "kl_coef": self.kl_coef >= 0,
            "lora_rank": self.lora_rank is None or self.lora_rank >= 1,
            "lora_targets": (isinstance(self.lora_targets, list) and len(self.lora_targets) > 0
                             and all(isinstance(t, str) and t.strip() for t in self.lora_targets)),
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"agent.{key} = {getattr(self, key)!r} is invalid: {self.help(key)}; "
                                 f"{_RULES.get(key, 'must be positive')}")

    def check_latent_side(self, side: int) -> None:
        """Refuse settings that the latents' size (side x side) does not allow; none here."""

    @classmethod
    def help(cls, key: str) -> str:
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == key)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AgentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown agent option(s) {unknown} for {cls.__name__}; allowed: {sorted(known)}")
        return cls(**values)

    def per_process(self, num_processes: int) -> "AgentConfig":
        """One process's config when `num_processes` train together: each samples its equal share
        of `per_process_fields`, so the epoch and each optimizer step see as many samples as in one
        process (the gradients are averaged over the processes)."""
        if num_processes == 1:
            return self
        for key in self.per_process_fields:
            if getattr(self, key) % num_processes:
                raise ValueError(f"agent.{key} = {getattr(self, key)} is invalid with {num_processes} processes: "
                                 f"must be a multiple of {num_processes} (each process takes an equal share)")
        try:
            return replace(self, **{k: getattr(self, k) // num_processes for k in self.per_process_fields})
        except ValueError as err:
            raise ValueError(f"{err} (in each process's share, with {num_processes} processes)") from None


_RULES = {
    "weight_decay": "must be >= 0",
    "adam_beta1": "must be in [0, 1)",
    "max_grad_norm": "must be >= 0",
    "kl_coef": "must be >= 0",
    "lora_rank": "must be >= 1 or null",
    "lora_targets": "must be a non-empty list of layer names, for example [to_q, to_k, to_v, to_out.0]",
}


class TrainingDiverged(RuntimeError):
    """`StepHealth.max_bad_steps` optimizer steps in a row were skipped: the run stops, since its
    weights no longer learn (its checkpoints hold the last weights that were finite)."""


@dataclass
class StepHealth:
    """The optimizer steps skipped for a non-finite loss or gradient norm, counted for the logs
    (`health/skipped_steps`); `max_bad_steps` of them in a row raise `TrainingDiverged`."""

    max_bad_steps: int = 10
    skipped: int = 0  # since the last `take_skipped`
    in_a_row: int = 0

    def allows(self, norm: float) -> bool:
        """Whether a step whose gradients have this norm may go ahead (a non-finite loss comes as inf)."""
        if math.isfinite(norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                                   f"norm (health.max_bad_steps = {self.max_bad_steps})")
        return False

    def take_skipped(self) -> int:
        """The steps skipped since the last call."""
        skipped, self.skipped = self.skipped, 0
        return skipped


@dataclass
class Rollout:
    """Episodes collected with the current policy, batched along dim 0."""

    prompts: list[str]
    embeds: torch.Tensor  # [B, L, D]
    latents: torch.Tensor  # [B, T + 1, C, h, w]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T], at collection time
    rewards: torch.Tensor  # [B], the optimized (proxy) reward
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    info: dict[str, torch.Tensor]  # reward components and gold verdicts, each [B]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout of these rows (indices into dim 0), in their order."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows.to(t.device)]
        return Rollout([self.prompts[i] for i in rows.tolist()], take(self.embeds), take(self.latents),
                       take(self.log_probs), take(self.rewards), take(self.images),
                       {k: take(v) for k, v in self.info.items()})

    @staticmethod
    def cat(parts: list["Rollout"]) -> "Rollout":
        keys = parts[0].info.keys()
        return Rollout(
            prompts=[p for r in parts for p in r.prompts],
            embeds=torch.cat([r.embeds for r in parts]),
            latents=torch.cat([r.latents for r in parts]),
            log_probs=torch.cat([r.log_probs for r in parts]),
            rewards=torch.cat([r.rewards for r in parts]),
            images=torch.cat([r.images for r in parts]),
            info={k: torch.cat([r.info[k] for r in parts]) for k in keys},
        )


class Agent(ABC):
    """Collects with the env and the policy; subclasses implement `update`."""

    config_class: ClassVar[type[AgentConfig]] = AgentConfig
    # why the agent cannot train data-parallel over several processes (None: it can)
    single_process_reason: ClassVar[str | None] = None
    # why the agent steps an optimizer of its own rather than `optimizer_step`'s AdamW, which
    # shard_optimizer, DeepSpeed and float16 loss scaling need (None: it uses `optimizer_step`)
    own_optimizer_reason: ClassVar[str | None] = None
    # `update` takes rollouts of a multiple of this many samples (after the Trainer drops some)
    rows_per_update: int = 1

    def __init__(self, cfg: AgentConfig, env, policy) -> None:
        if cfg.samples_per_epoch % env.num_envs:
            raise ValueError(f"agent.samples_per_epoch ({cfg.samples_per_epoch}) must be a multiple of "
                             f"env.batch_size ({env.num_envs})")
        self.cfg = cfg
        self.env = env
        self.policy = policy
        self.params = policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, **adamw_settings(cfg))
        # a float16 UNet backpropagates in float16, where small gradients underflow to 0 unless the
        # loss is scaled up first (a no-op for bfloat16 and float32, whose range needs none)
        self.scaler = torch.amp.GradScaler(self.params[0].device.type, enabled=policy.computes_in_float16)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(0)
        self.engine = None  # DeepSpeed's ZeRO engine, when a DeepSpeed launch trains (`use_deepspeed`)
        self._gathered_optimizer: list[dict] | None = None
        self.health = StepHealth()

    def shard_optimizer(self) -> None:
        """ZeRO stage 1 for a run of several processes (`shard_optimizer=true`): the same AdamW with
        each process keeping its share of the states, to fit full fine-tuning of a large UNet. Called
        before the first step, while AdamW holds no state yet."""
        _require_adamw(self, "shard_optimizer=true is invalid", "use shard_optimizer=false")
        self.optimizer = distributed.zero_optimizer(self.params, torch.optim.AdamW, **adamw_settings(self.cfg))

    def use_deepspeed(self, config: dict[str, Any]) -> None:
        """Hand the gradient averaging, clipping and step to DeepSpeed's ZeRO engine (stage 1 or 2,
        `distributed.deepspeed_config`) over this AdamW. The agents still call the UNet themselves
        (sampling, guidance, the reference model): stages 1 and 2 keep every weight whole on every
        process and reduce the gradients through hooks on the trainable parameters. Called before the
        first step, while AdamW holds no state yet."""
        _require_adamw(self, "DeepSpeed launches are invalid", "launch with --multi_gpu")
        if self.scaler.is_enabled():
            raise ValueError("DeepSpeed launches are invalid for a float16 UNet: the engine would step unscaled "
                             "float16 gradients; use model.dtype=bfloat16 or float32")
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.policy.unet, optimizer=self.optimizer,
                                                                 config=config)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.env.reset(seed=seed)

    # 1. collect ---------------------------------------------------------------------------
    def collect(self, prompts: list[str] | None = None, noise_group: int = 1) -> Rollout:
        """`samples_per_epoch` episodes (or one per prompt of `prompts`) in the training env with the
        current policy; `noise_group` consecutive samples start from the same x_T."""
        n = len(prompts) if prompts is not None else self.cfg.samples_per_epoch
        return run_episodes(self.env, self.policy, n, self.generator, prompts, noise_group, self.step_noise)

    def grouped_prompts(self, k: int) -> list[str]:
        """An epoch's prompts in groups of k samples of one prompt (GRPO-style): samples_per_epoch / k
        prompts drawn from the env, each k times in a row."""
        return [p for p in self.env.sample_prompts(self.cfg.samples_per_epoch // k) for _ in range(k)]

    def step_noise(self, step: int, shape: torch.Size) -> torch.Tensor | None:
        """The sampler noise z of denoising step `step` for a batch, or None: the policy draws it
        from `self.generator` (what every agent but one that designs its rollouts' noise does)."""
        return None

    # 2. update ----------------------------------------------------------------------------
    def keep_rows(self, rollout: Rollout, rows: torch.Tensor) -> Rollout:
        """The rollout that `update` will train on: these rows of it, some left out (the Trainer drops
        the samples whose reward is not finite)."""
        return rollout.select(rows)

    @abstractmethod
    def update(self, rollout: Rollout) -> dict[str, float]:
        """Improve the policy on a rollout; return the losses and statistics to log."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one part of the coming optimizer step's loss; the step's last
        part goes to `optimizer_step`."""
        if self.engine is None:
            self.scaler.scale(loss).backward()
            return
        self.engine.set_gradient_accumulation_boundary(False)
        self.engine.backward(loss)

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward `loss`, the last part of the step's loss (earlier parts went to `backward`),
        average the gradients over the processes of a multi-process run, clip, step, zero the
        gradients.

        A step whose loss or gradient norm is not finite is skipped (`health` counts it), in every
        process alike. Returns the gradient norm before clipping (inf for a non-finite loss)."""
        if self.engine is not None:  # DeepSpeed reduces (over its partitions), clips, steps and zeroes
            if not bool(torch.isfinite(loss.detach())):
                # its ZeRO optimizer skips a step whose gradient norm is not finite, but a NaN loss can have
                # finite gradients: backward inf gradients instead, which every process then reduces
                loss = sum((p * math.inf).sum() for p in self.params)
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(loss)
            self.engine.step()
            norm = float(self.engine.get_global_grad_norm())
            self.health.allows(norm)
            return norm
        self.scaler.scale(loss).backward()
        if not bool(torch.isfinite(loss.detach())):
            # inf gradients make the average inf in every process, so that every process skips this step
            for p in self.params:
                p.grad = torch.full_like(p, math.inf)
        distributed.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or math.inf))
        if self.health.allows(norm):  # a float16 overflow is skipped too, and the scaler halves its scale
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def guard_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Put `health`'s check before every step of an optimizer that a library steps in its own loop
        (TRL, SB3): a step whose gradients are not finite zeroes them instead. The library computed
        the loss, so a non-finite loss is caught by the gradients it gives."""
        step = optimizer.step

        @functools.wraps(step)
        def checked(*args, **kwargs):
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.health.allows(float(torch.nn.utils.get_total_norm(grads))):
                return step(*args, **kwargs)
            optimizer.zero_grad(set_to_none=True)
            return None

        optimizer.step = checked

    def kl_penalty(self, latents: torch.Tensor, step_index: int, embeds: torch.Tensor) -> torch.Tensor:
        """The per-step KL to the base model (mean over elements), 0 when kl_coef is 0."""
        if self.cfg.kl_coef == 0:
            return latents.new_zeros(())
        return self.cfg.kl_coef * self.policy.kl_to_reference(latents, step_index, embeds).mean()

    # 3. state -----------------------------------------------------------------------------
    def consolidate_optimizer(self) -> None:
        """Before a checkpoint, on every process (a collective): bring a sharded optimizer's states to
        rank 0, whose `state_dict()` then holds them all. A ZeroRedundancyOptimizer gathers them
        itself; DeepSpeed's shards are kept as they are, one per rank, in rank order."""
        if self.engine is None:
            distributed.consolidate_optimizer(self.optimizer)
        else:
            # a checkpoint holds data only: DeepSpeed's own objects are left out, its loss scaler (static
            # at 1 in float32; loading keeps the engine's own when it finds none) and the parameter slice
            # maps of its universal checkpoints, which loading a shard does not read
            shard = {k: v for k, v in self.optimizer.state_dict().items()
                     if k not in ("loss_scaler", "param_slice_mappings")}
            self._gathered_optimizer = distributed.gather_to_main(shard)

    def state_dict(self) -> dict[str, Any]:
        """What the agent has learned besides the weights (optimizer, loss scaler), for a resumed run;
        the random streams (the agent's generator, the env's) are each process's own and the Trainer
        keeps them, once per process, beside this."""
        if self.engine is None:
            optimizer = self.optimizer.state_dict()
        elif self._gathered_optimizer is None:
            raise RuntimeError("a DeepSpeed run's optimizer states are sharded: call consolidate_optimizer() on "
                               "every process first")
        else:
            optimizer, self._gathered_optimizer = self._gathered_optimizer, None
        return {
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a `state_dict` (after the weights: DeepSpeed takes its float32 master copy from them)."""
        optimizer = state["optimizer"]
        sharded = isinstance(optimizer, list)  # DeepSpeed's shards, one per rank
        if sharded != (self.engine is not None):
            saved, now = ("a DeepSpeed", "without DeepSpeed") if sharded else ("a non-DeepSpeed", "with DeepSpeed")
            raise ValueError(f"this checkpoint was saved by {saved} run and cannot resume {now}: its optimizer "
                             "states are laid out differently; resume with the launch that saved it")
        if sharded:
            if len(optimizer) != distributed.world_size():
                raise ValueError(f"this checkpoint's optimizer states are sharded over {len(optimizer)} DeepSpeed "
                                 f"processes; resume it with {len(optimizer)}, not {distributed.world_size()}")
            self.optimizer.load_state_dict(optimizer, load_from_fp32_weights=False)
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(state.get("scaler", {}))


@torch.no_grad()
def run_episodes(env, policy, n: int, generator: torch.Generator, prompts: list[str] | None = None,
                 noise_group: int = 1, step_noise=None) -> Rollout:
    """`n` episodes of `policy` in `env`, batch by batch (one `env.reset` per batch of `env.num_envs`).

    The one loop that turns the MDP's steps into a Rollout: agents collect with it, and the Trainer
    evaluates every agent's policy with it in its own fixed-noise env (so that agents are compared on
    one sampler). `prompts` (n of them) replace the env's prompt draws; `noise_group` consecutive
    samples start from one x_T; `step_noise(step, shape)` may give the sampler noise z of a step
    (None: the policy draws it from `generator`)."""
    if n % env.num_envs:
        raise ValueError(f"{n} prompts do not fill batches of the env's {env.num_envs}")
    parts = []
    for start in range(0, n, env.num_envs):
        options = {} if prompts is None else {"prompts": prompts[start:start + env.num_envs]}
        if noise_group > 1:
            options["noise_group"] = noise_group
        obs, _ = env.reset(options=options or None)
        embeds = obs["prompt_embeds"]
        latents, log_probs = [obs["latents"]], []
        for i in range(policy.num_steps):
            noise = None if step_noise is None else step_noise(i, obs["latents"].shape)
            action, logp = policy.sample_step(obs["latents"], i, embeds, generator=generator, noise=noise)
            obs, rewards, terminated, _, info = env.step(action)
            latents.append(action)
            log_probs.append(logp)
        assert bool(terminated.all()), "the env must end after the policy's num_steps"
        info = {k: v.float() for k, v in info.items() if isinstance(v, torch.Tensor)}
        parts.append(Rollout(list(env.prompts), embeds, torch.stack(latents, 1), torch.stack(log_probs, 1),
                             rewards.float(), env.images, info))
    return Rollout.cat(parts)


def adamw_settings(cfg: AgentConfig) -> dict[str, Any]:
    """AdamW's settings from the agent's config (also applied to a resumed optimizer's groups)."""
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (cfg.adam_beta1, 0.999)}


def _require_adamw(agent: Agent, refusal: str, instead: str) -> None:
    """Sharding replaces the base agent's AdamW; an agent stepping another optimizer is refused
    rather than trained unsharded."""
    if type(agent.optimizer) is not torch.optim.AdamW:
        raise ValueError(f"{refusal} for agent={agent.cfg.name}: it steps {type(agent.optimizer).__name__}, "
                         f"not the AdamW that can be sharded; {instead}")


def minibatches(n: int, size: int, generator: torch.Generator, unit: int = 1) -> list[torch.Tensor]:
    """Shuffled index batches covering range(n). With `unit` > 1 the blocks of `unit` consecutive rows
    (a group, a mirrored pair) are shuffled whole and never split over two batches; `unit` must
    divide both n and size."""
    if n % unit or size % unit:
        raise ValueError(f"minibatch unit {unit} must divide the rows ({n}) and the batch size ({size})")
    blocks = torch.randperm(n // unit, generator=generator)
    order = (blocks[:, None] * unit + torch.arange(unit)).flatten()
    return [order[i:i + size] for i in range(0, n, size)]


def per_prompt_normalize(prompts: list[str], rewards: torch.Tensor, eps: float = 1e-6, min_count: int = 2,
                         history: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(r - mean) / std per prompt (GRPO's group-relative advantage; DDPO's per-prompt statistics),
    the statistics taken over `history[prompt]` (default: the prompt's samples in this batch); a
    prompt with fewer than `min_count` of those uses the whole batch's."""
    adv = torch.empty_like(rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for prompt, idx in groups.items():
        r = rewards[idx]
        stats_of = r if history is None else history[prompt]
        if len(stats_of) >= min_count:
            mean, std = stats_of.mean(), stats_of.std(unbiased=False)
        else:
            mean, std = batch_mean, batch_std
        adv[idx] = (r - mean) / (std + eps)
    return adv
