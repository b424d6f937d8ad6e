"""DRaFT-K (Clark et al. 2023) and AlignProp (Prabhudesai et al. 2023): backpropagate the reward
through the last K steps of the sampler.

For each minibatch of prompts: sample x_T ~ N(0, I), run the first T - K steps of the stochastic
DDIM sampler WITHOUT gradients, the last K steps WITH gradients (x_{t-1} = mu_theta(x_t) + sigma_t z,
the noise z drawn outside the differentiable step), decode x_0 with the VAE differentiably, score it
with the env's differentiable reward and minimise
    L = -reward_scale * mean_b r_b  +  mean over the K differentiable steps of the base KL penalty
(the KL penalty is the base agent's, kl_coef * mean (mu_theta - mu_ref)^2 / 2 sigma_t^2, at each
differentiable step's input latents, from the same UNet call; its gradient also flows through them).
Each differentiable step runs under `torch.utils.checkpoint` (non-reentrant), so only its input
latents are kept for the backward pass and the activation memory does not grow with K.
K = 1 is DRaFT-1; `truncated_backprop_random` draws K uniformly from 1..k_last per minibatch
(AlignProp's randomized truncated backpropagation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

from .base import Agent, AgentConfig, Rollout, minibatches
from .refl import _invalid, kl_penalty_from_mean, require_differentiable_reward


@dataclass
class DRaFTConfig(AgentConfig):
    name: str = field(default="draft", metadata={"help": "the agent's name (its file in agents/)"})
    k_last: int = field(default=1, metadata={
        "help": "K: gradients flow through the last K sampler steps (1: DRaFT-1; <= num_steps)"})
    truncated_backprop_random: bool = field(default=False, metadata={
        "help": "AlignProp: draw K uniformly from 1..k_last for each minibatch"})
    reward_scale: float = field(default=1.0, metadata={"help": "the loss is -reward_scale * mean reward"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "recompute each differentiable step in the backward pass (memory O(1) in K)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k_last, bool) or not isinstance(self.k_last, int) or self.k_last < 1:
            raise _invalid(type(self), "k_last", self.k_last, "must be an int >= 1")
        if not isinstance(self.truncated_backprop_random, bool):
            raise _invalid(type(self), "truncated_backprop_random", self.truncated_backprop_random,
                           "must be true or false")
        if not isinstance(self.gradient_checkpointing, bool):
            raise _invalid(type(self), "gradient_checkpointing", self.gradient_checkpointing,
                           "must be true or false")
        if self.reward_scale <= 0:
            raise _invalid(type(self), "reward_scale", self.reward_scale, "must be > 0")


class DRaFTAgent(Agent):
    config_class = DRaFTConfig
    cfg: DRaFTConfig

    def __init__(self, cfg: DRaFTConfig, env, policy) -> None:
        require_differentiable_reward(env.reward_fn, "draft")
        if cfg.k_last > policy.num_steps:
            raise ValueError(f"agent.k_last = {cfg.k_last} is invalid: {DRaFTConfig.help('k_last')}; "
                             f"the sampler has only num_steps = {policy.num_steps}")
        super().__init__(cfg, env, policy)

    def _step(self, latents: torch.Tensor, noise: torch.Tensor, embeds: torch.Tensor, step_index: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One differentiable sampler step x_{t-1} = mu_theta(x_t) + sigma_t * noise (guided UNet), and
        the KL penalty at x_t from the same UNet call."""
        mean, std = self.policy.step_stats(latents, step_index, embeds)
        return mean + std * noise, kl_penalty_from_mean(self, mean, std, latents, step_index, embeds)

    def draw_k(self) -> int:
        if self.cfg.truncated_backprop_random:
            return int(torch.randint(1, self.cfg.k_last + 1, (), generator=self.generator))
        return self.cfg.k_last

    def draft_step(self, prompts: list[str], embeds: torch.Tensor, k: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, rewards [B], KL penalty): the whole chain, gradients through the last k steps."""
        k = self.draw_k() if k is None else k
        n_steps = self.policy.num_steps
        if not 1 <= k <= n_steps:
            raise ValueError(f"k must be in [1, {n_steps}], got {k}")
        x = self.policy.initial_latents(len(prompts), self.env.latent_shape, self.generator)
        with torch.no_grad():
            for i in range(n_steps - k):
                x, _ = self.policy.sample_step(x, i, embeds, generator=self.generator)
        x = x.detach().float()
        penalty = x.new_zeros(())
        for i in range(n_steps - k, n_steps):
            # the noise is drawn here (as sample_step draws it), so a recomputation sees the same z
            z = randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=torch.float32)
            if self.cfg.gradient_checkpointing:
                x, kl = checkpoint(self._step, x, z, embeds, i, use_reentrant=False)
            else:
                x, kl = self._step(x, z, embeds, i)
            penalty = penalty + kl / k
        images = self.policy.decode(x)
        rewards = self.env.reward_fn(images, list(prompts)).scores.float()
        loss = -self.cfg.reward_scale * rewards.mean()
        return loss, rewards, penalty

    def update(self, rollout: Rollout) -> dict[str, float]:
        stats: dict[str, list[float]] = {"loss/draft": [], "loss/kl_penalty": [], "reward/train_step_proxy": [],
                                         "policy/grad_norm": [], "draft/k": []}
        for idx in minibatches(len(rollout), self.cfg.train_batch_size, self.generator):
            prompts = [rollout.prompts[i] for i in idx.tolist()]
            # 1. the whole chain again, gradients through its last k steps, and the reward loss
            k = self.draw_k()
            loss, rewards, penalty = self.draft_step(prompts, rollout.embeds[idx], k)
            # 2. update
            stats["policy/grad_norm"].append(self.optimizer_step(loss + penalty))
            stats["loss/draft"].append(loss.item())
            stats["loss/kl_penalty"].append(penalty.item())
            stats["reward/train_step_proxy"].append(rewards.mean().item())
            stats["draft/k"].append(float(k))
        return {key: sum(v) / len(v) for key, v in stats.items() if v}


__all__ = ["DRaFTAgent", "DRaFTConfig"]
