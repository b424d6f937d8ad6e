"""DDPO (Black et al. 2023): PPO-clip on the per-step Gaussian log-probs of a stochastic DDIM sampler.

Per epoch: collect images, turn rewards into advantages (per-prompt statistics, or GRPO-style
groups of k samples per prompt), then for a few inner epochs re-evaluate the stored transitions
under the current policy and minimise the clipped surrogate
    L = mean_t max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps)),  ratio_t = pi/pi_old,
accumulating over a random `timestep_fraction` of the steps before each optimizer step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from t2i_rl import distributed

from .base import Agent, AgentConfig, Rollout, minibatches, per_prompt_normalize


@dataclass
class DDPOConfig(AgentConfig):
    name: str = "ddpo"
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon (.inf: no clip, plain "
                                                               "importance weighting)", "inf_ok": True})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    timestep_fraction: float = field(default=1.0, metadata={
        "help": "fraction of the trained steps sampled per minibatch"})
    train_steps: int = field(default=0, metadata={
        "help": "train on the first k denoising steps only (0: all T). The early, noisiest steps decide the "
                "layout; late steps barely change the reward but, with their small sigma_t, dominate the "
                "score-function gradient with noise"})
    per_prompt_stat_tracking: bool = field(default=True, metadata={
        "help": "normalize rewards by running statistics of the same prompt (else by the batch)"})
    stat_buffer_size: int = field(default=32, metadata={"help": "rewards kept per prompt"})
    stat_min_count: int = field(default=16, metadata={"help": "fewer rewards of a prompt: use the batch"})
    group_size: int = field(default=0, metadata={
        "help": "GRPO-style: k samples per prompt, advantages relative to the group (0: off)"})
    shared_noise: bool = field(default=False, metadata={
        "help": "the samples of a group start from the same x_T (DanceGRPO, Xue et al. 2025): their rewards "
                "then differ only by the sampler's noise, the actions the log-probs score, and not by a "
                "starting point the policy cannot choose. Needs group_size dividing env.batch_size"})
    antithetic: bool = field(default=False, metadata={
        "help": "mirrored pairs: samples 2j and 2j+1 of a group start from the same x_T, take opposite "
                "noise (z, -z) on the trained steps and the same noise on the others, so that their "
                "reward difference is the trained steps' doing alone and the score-function gradient of "
                "a pair, (A_2j - A_2j+1) z / sigma, loses the reward noise of every other source. Each "
                "sample is still a draw of the policy. Needs an even group_size"})
    score_pool: int = field(default=1, metadata={
        "help": "the trained steps' log-probs are those of the action's k x k average pools over the latent "
                "pixels (1: the whole action, DDPO as published). The score-function gradient A z / sigma "
                "carries noise in every latent dimension while the reward is decided by the coarse layout; "
                "the pooled action's score keeps 1/k^2 of the dimensions (it is the whole score projected on "
                "block-constant moves of the mean, so ratios and clip_range keep their scale), and drops the "
                "fine detail's share of the gradient. The old log-probs are re-evaluated before the update "
                "(one extra forward of the trained steps). Must divide the latents' height and width"})
    step_chunk: int = field(default=0, metadata={
        "help": "denoising steps re-evaluated per UNet call in the update (0: all sampled steps of a "
                "minibatch in one call; 1: one step per call, as TRL does); the gradient is the same"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_range <= 0:
            raise ValueError(f"agent.clip_range = {self.clip_range} is invalid: must be > 0")
        if self.adv_clip_max <= 0:
            raise ValueError(f"agent.adv_clip_max = {self.adv_clip_max} is invalid: must be > 0")
        if self.inner_epochs < 1:
            raise ValueError(f"agent.inner_epochs = {self.inner_epochs} is invalid: must be >= 1")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"agent.timestep_fraction = {self.timestep_fraction} is invalid: must be in (0, 1]")
        if self.train_steps < 0:
            raise ValueError(f"agent.train_steps = {self.train_steps} is invalid: must be >= 0 (0: all steps)")
        if self.stat_buffer_size < 1 or self.stat_min_count < 1:
            raise ValueError("agent.stat_buffer_size and agent.stat_min_count must be >= 1")
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(f"agent.group_size = {self.group_size} is invalid: 0 (off) or >= 2")
        if self.score_pool < 1:
            raise ValueError(f"agent.score_pool = {self.score_pool} is invalid: must be >= 1 (1: the whole action)")
        if self.step_chunk < 0:
            raise ValueError(f"agent.step_chunk = {self.step_chunk} is invalid: must be >= 0 (0: all steps)")
        if self.shared_noise and not self.group_size:
            raise ValueError("agent.shared_noise = true needs agent.group_size >= 2 (the groups that share x_T)")
        if self.antithetic and (not self.group_size or self.group_size % 2):
            raise ValueError(f"agent.antithetic = true needs an even agent.group_size (mirrored pairs within "
                             f"a group), got {self.group_size}")
        if self.group_size and self.samples_per_epoch % self.group_size:
            raise ValueError(f"agent.samples_per_epoch ({self.samples_per_epoch}) must be a multiple of "
                             f"agent.group_size ({self.group_size})")

    def check_latent_side(self, side: int) -> None:
        if side % self.score_pool:
            divisors = ", ".join(str(k) for k in range(1, side + 1) if side % k == 0)
            raise ValueError(f"agent.score_pool = {self.score_pool} is invalid: it must divide the latents' side "
                             f"({side} pixels), for example {divisors}")

    def minibatch_unit(self) -> int:
        """The rows an optimizer step takes together: with antithetic pairs, whole pairs (2), else any
        rows (1). A pair's gradient is (A_2j - A_2j+1) z / sigma only when both share a step: split
        over two steps, each step carries their common reward noise. Whole groups are not kept
        together: a step of one group would train on one prompt alone."""
        return 2 if self.antithetic and self.train_batch_size % 2 == 0 else 1


class PerPromptStatTracker:
    """Running reward statistics per prompt (DDPO): a prompt's advantage is its reward standardized
    by the last `buffer_size` rewards of that prompt, or by the batch until it has `min_count`."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add the batch's rewards to their prompts' buffers, then standardize by the buffers."""
        for p, r in zip(prompts, rewards.tolist()):
            self.buffers.setdefault(p, deque(maxlen=self.buffer_size)).append(r)
        history = {p: torch.tensor(list(self.buffers[p])) for p in dict.fromkeys(prompts)}
        return per_prompt_normalize(prompts, rewards, min_count=self.min_count, history=history)

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate, its approx KL (0.5 E[(log ratio)^2]) and clip fraction."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clipfrac.detach()


class DDPOAgent(Agent):
    config_class = DDPOConfig
    cfg: DDPOConfig

    def __init__(self, cfg: DDPOConfig, env, policy) -> None:
        super().__init__(cfg, env, policy)
        if cfg.train_steps > policy.num_steps:
            raise ValueError(f"agent.train_steps = {cfg.train_steps} is invalid: the sampler has only "
                             f"{policy.num_steps} steps (env.num_steps)")
        cfg.check_latent_side(env.latent_shape[-1])
        if cfg.antithetic and env.num_envs % 2:
            raise ValueError(f"agent.antithetic = true needs an even env.batch_size (pairs share a reset), "
                             f"got {env.num_envs}")
        if cfg.shared_noise and env.num_envs % cfg.group_size:
            raise ValueError(f"agent.shared_noise = true needs agent.group_size ({cfg.group_size}) to divide "
                             f"env.batch_size ({env.num_envs}): a group's samples share one reset")
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
        self._mirroring = False  # True while collecting the training groups of an antithetic run

    def collect(self, prompts: list[str] | None = None) -> Rollout:
        """An epoch's samples: groups of `group_size` samples of one prompt (in mirrored pairs when
        `antithetic`), else the env's own prompt draws."""
        if prompts is None and self.cfg.group_size:
            k = self.cfg.group_size
            prompts = self.grouped_prompts(k)
            noise_group = k if self.cfg.shared_noise else 2 if self.cfg.antithetic else 1
            self._mirroring = self.cfg.antithetic
            try:
                return super().collect(prompts, noise_group=noise_group)
            finally:
                self._mirroring = False
        return super().collect(prompts)

    def step_noise(self, step: int, shape: torch.Size) -> torch.Tensor | None:
        """Antithetic pairs (`antithetic`): one draw per pair, negated for the second sample on the
        trained steps and shared on the others; else None (the policy draws)."""
        if not self._mirroring:
            return None
        z = torch.randn((shape[0] // 2, *shape[1:]), generator=self.generator)
        sign = -1.0 if step < (self.cfg.train_steps or self.policy.num_steps) else 1.0
        return torch.stack([z, sign * z], 1).flatten(0, 1)

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """The rollout's advantages, from the statistics of every process's samples (in a
        multi-process run each process holds a share of the batch and keeps its own rows)."""
        prompts, rewards = distributed.gather_list(rollout.prompts), distributed.gather(rollout.rewards)
        if self.cfg.group_size:
            adv = per_prompt_normalize(prompts, rewards)
        elif self.cfg.per_prompt_stat_tracking:
            adv = self.tracker.update(prompts, rewards)
        else:
            adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        return distributed.local_rows(adv).clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    def step_loss(self, x: torch.Tensor, x_next: torch.Tensor, i: int | torch.Tensor, embeds: torch.Tensor,
                  old_log_prob: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of transitions at denoising step(s) i, one int or one per row (DPOK adds its KL)."""
        log_prob = self.policy.log_prob(x, x_next, i, embeds, pool=self.cfg.score_pool)
        loss, approx_kl, clipfrac = ppo_clip_loss(log_prob, old_log_prob, adv, self.cfg.clip_range)
        penalty = self.kl_penalty(x, i, embeds)
        return loss + penalty, {"loss/policy": loss.item(), "loss/kl_penalty": float(penalty.detach()),
                                "policy/approx_kl": approx_kl.item(), "policy/clipfrac": clipfrac.item()}

    def update(self, rollout: Rollout) -> dict[str, float]:
        # 1. advantages: group-relative (or per-prompt running statistics), clipped
        adv = self.advantages(rollout)
        trained = self.cfg.train_steps or self.policy.num_steps  # the first steps, those trained on
        n_steps = max(1, round(self.cfg.timestep_fraction * trained))
        unit = self.cfg.minibatch_unit() if len(rollout) == self.cfg.samples_per_epoch else 1  # rows dropped: 1
        old_log_probs = self.pooled_log_probs(rollout, trained) if self.cfg.score_pool > 1 else rollout.log_probs
        stats: dict[str, list[float]] = {}
        for _ in range(self.cfg.inner_epochs):
            # 2. minibatches of whole units (a mirrored pair stays in one step)
            for idx in minibatches(len(rollout), self.cfg.train_batch_size, self.generator, unit):
                steps = torch.randperm(trained, generator=self.generator)[:n_steps]
                chunk = self.cfg.step_chunk or n_steps
                for start in range(0, n_steps, chunk):
                    # 3. the PPO-clip loss of the stored transitions at these steps, re-evaluated under the
                    #    current policy: rows = (sample, step) pairs, sample-major, in one UNet call
                    s = steps[start:start + chunk]
                    k = len(s)
                    step_index = int(s[0]) if k == 1 else s.repeat(len(idx))
                    loss, step_stats = self.step_loss(
                        rollout.latents[idx][:, s].flatten(0, 1), rollout.latents[idx][:, s + 1].flatten(0, 1),
                        step_index, rollout.embeds[idx].repeat_interleave(k, 0),
                        old_log_probs[idx][:, s].flatten(), adv[idx].repeat_interleave(k))
                    # 4. one optimizer step per minibatch, on the mean over its sampled steps
                    part = loss * k / n_steps
                    if start + chunk < n_steps:
                        self.backward(part)
                    else:
                        stats.setdefault("policy/grad_norm", []).append(self.optimizer_step(part))
                    for key, v in step_stats.items():
                        stats.setdefault(key, []).append(v)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/advantage_abs"] = adv.abs().mean().item()
        return out

    @torch.no_grad()
    def pooled_log_probs(self, rollout: Rollout, trained: int) -> torch.Tensor:
        """The sampling policy's log-probs of the pooled actions at the first `trained` steps [N, T]
        (the later columns stay the rollout's: never trained on). Called before the update's first
        step, so the policy still is the one that sampled."""
        out = rollout.log_probs.clone()
        for start in range(0, len(rollout), self.env.num_envs):  # the sampler's batch: it fits in memory
            rows = slice(start, start + self.env.num_envs)
            for step in range(trained):
                out[rows, step] = self.policy.log_prob(rollout.latents[rows, step], rollout.latents[rows, step + 1],
                                                       step, rollout.embeds[rows], pool=self.cfg.score_pool)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
