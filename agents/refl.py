"""ReFL (Xu et al. 2023, ImageReward): reward feedback learning through one late denoising step.

For each minibatch of prompts:
  1. sample x_T ~ N(0, I) and run the sampler WITHOUT gradients to a random step index
     i ~ U{T1, ..., T2} of the late window (step indices counted from the start of the chain);
  2. take ONE denoising step WITH gradients (the guided UNet call) and keep its predicted x0
     (DDIM eq. (12), `policy.ddim_moments`);
  3. decode x0 with the VAE, differentiably, and score it with the env's (differentiable) reward;
  4. loss = reward_scale * mean_b phi(r_b), with phi(r) = ReLU(margin - r) ("hinge", the reference
     code's ReLU(2 - r)) or phi(r) = -r ("linear");
     + the base agent's KL penalty at the gradient step (kl_coef * mean KL to the base model)
     + pretrain_beta * (unweighted denoising MSE on ShapesWorld-rendered images of the same prompts).
The reference implementation alternates a pre-training step and a ReFL step; here both terms go
into one optimizer step per minibatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from t2i_rl.policy import encode_images, gaussian_kl

from .base import Agent, AgentConfig, Rollout, minibatches

REFL_LOSSES = ("hinge", "linear")
# the default late window, as fractions of the steps: from 70% of the chain to 90% of it
DEFAULT_WINDOW_FRACTIONS = (0.7, 0.9)


def _invalid(cls: type[AgentConfig], key: str, value, rule: str) -> ValueError:
    return ValueError(f"agent.{key} = {value!r} is invalid: {cls.help(key)}; {rule}")


@dataclass
class ReFLConfig(AgentConfig):
    name: str = field(default="refl", metadata={"help": "the agent's name (its file in agents/)"})
    late_window: list[int] | None = field(default=None, metadata={
        "help": "[T1, T2]: the gradient step index is drawn uniformly from T1..T2 (indices counted from "
                "the first step, 0 <= T1 <= T2 < num_steps); null: the last 30%..10% of the steps"})
    loss: str = field(default="hinge", metadata={
        "help": "phi(r): 'hinge' = ReLU(hinge_margin - r) (ImageReward's ReFL) or 'linear' = -r"})
    hinge_margin: float = field(default=2.0, metadata={"help": "margin of the hinge loss (2.0 in the reference code)"})
    reward_scale: float = field(default=1.0, metadata={
        "help": "multiplies the ReFL loss (the reference code's grad_scale, 1e-3 there at lr 1e-5)"})
    pretrain_beta: float = field(default=0.0, metadata={
        "help": "weight of the pre-training denoising loss on ShapesWorld-rendered images (0: off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.late_window is not None:
            w = self.late_window
            if (not isinstance(w, (list, tuple)) or len(w) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in w)):
                raise _invalid(type(self), "late_window", w, "must be a list of two ints [T1, T2] or null")
            if not 0 <= w[0] <= w[1]:
                raise _invalid(type(self), "late_window", w, "must satisfy 0 <= T1 <= T2")
            self.late_window = [int(w[0]), int(w[1])]
        if self.loss not in REFL_LOSSES:
            raise _invalid(type(self), "loss", self.loss, f"must be one of {REFL_LOSSES}")
        if self.reward_scale <= 0:
            raise _invalid(type(self), "reward_scale", self.reward_scale, "must be > 0")
        if self.pretrain_beta < 0:
            raise _invalid(type(self), "pretrain_beta", self.pretrain_beta, "must be >= 0")


# ---------------------------------------------------------------------- shared with agents/draft.py
def require_differentiable_reward(reward, agent: str) -> None:
    """Reward-backprop agents need gradients of the reward in the image."""
    if not getattr(reward, "differentiable", False):
        name = getattr(reward, "name", None) or type(reward).__name__
        raise ValueError(
            f"agent {agent!r} backpropagates the reward through the sampler, but the env's reward "
            f"{name!r} ({type(reward).__name__}) is not differentiable in the image; use a differentiable "
            "reward model (clip, lee, pairwise, or an ensemble/textnorm of them), or a policy-gradient "
            "agent (ddpo, dpok, rwr)")


def kl_penalty_from_mean(agent: Agent, mean: torch.Tensor, std: torch.Tensor, latents: torch.Tensor,
                         step_index: int, embeds: torch.Tensor) -> torch.Tensor:
    """`agent.kl_penalty(latents, step_index, embeds)` reusing the policy mean already computed with
    gradients (saves one UNet call): kl_coef * mean((mu_theta - mu_ref)^2 / (2 sigma_t^2))."""
    if agent.cfg.kl_coef == 0:
        return mean.new_zeros(())
    ref_mean, _ = agent.policy.step_stats(latents, step_index, embeds, reference=True)
    return agent.cfg.kl_coef * gaussian_kl(mean, ref_mean, std).mean()


def refl_loss(rewards: torch.Tensor, kind: str = "hinge", margin: float = 2.0, scale: float = 1.0) -> torch.Tensor:
    """scale * mean_b phi(r_b): phi = ReLU(margin - r) ("hinge") or -r ("linear")."""
    if kind == "hinge":
        per_sample = F.relu(margin - rewards)
    elif kind == "linear":
        per_sample = -rewards
    else:
        raise ValueError(f"loss must be one of {REFL_LOSSES}, got {kind!r}")
    return scale * per_sample.mean()


class ReFLAgent(Agent):
    config_class = ReFLConfig
    cfg: ReFLConfig

    def __init__(self, cfg: ReFLConfig, env, policy) -> None:
        require_differentiable_reward(env.reward_fn, "refl")
        super().__init__(cfg, env, policy)
        self.window = self._window(cfg.late_window, policy.num_steps)
        self._world = None

    @staticmethod
    def _window(late_window: list[int] | None, num_steps: int) -> tuple[int, int]:
        if late_window is None:
            lo = min(int(DEFAULT_WINDOW_FRACTIONS[0] * num_steps), num_steps - 1)
            hi = min(max(lo, math.ceil(DEFAULT_WINDOW_FRACTIONS[1] * num_steps) - 1), num_steps - 1)
            return lo, hi
        t1, t2 = late_window
        if not 0 <= t1 <= t2 < num_steps:
            raise ValueError(f"agent.late_window = {list(late_window)} is invalid: {ReFLConfig.help('late_window')}; "
                             f"with num_steps = {num_steps} it needs 0 <= T1 <= T2 <= {num_steps - 1}")
        return t1, t2

    # -- the two losses ---------------------------------------------------------------------
    def refl_step(self, prompts: list[str], embeds: torch.Tensor, step_index: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(loss, rewards [B], KL penalty, step index): no-grad sampling to step i, one guided UNet
        call with gradients, pred_x0 -> differentiable decode -> reward -> phi; the KL penalty at x_i."""
        if step_index is None:
            lo, hi = self.window
            step_index = int(torch.randint(lo, hi + 1, (), generator=self.generator))
        x = self.policy.initial_latents(len(prompts), self.env.latent_shape, self.generator)
        with torch.no_grad():
            for i in range(step_index):
                x, _ = self.policy.sample_step(x, i, embeds, generator=self.generator)
        x = x.detach().float()
        model_output = self.policy.noise_pred(x, step_index, embeds)
        mean, std, pred_x0 = self.policy.ddim_moments(x, model_output, step_index)
        penalty = kl_penalty_from_mean(self, mean, std, x, step_index, embeds)
        images = self.policy.decode(pred_x0)
        rewards = self.env.reward_fn(images, list(prompts)).scores.float()
        loss = refl_loss(rewards, self.cfg.loss, self.cfg.hinge_margin, self.cfg.reward_scale)
        return loss, rewards, penalty, step_index

    def pretrain_loss(self, prompts: list[str], embeds: torch.Tensor) -> torch.Tensor:
        """Unweighted denoising MSE of the conditional UNet on VAE latents of ShapesWorld renders of
        the prompts, noised at uniform training timesteps (the target is eps, or v / x0 for such models)."""
        from t2i_rl.world import ShapesWorld

        if self._world is None:
            self._world = ShapesWorld(resolution=self.env.image_size)
        seed = int(torch.randint(2**31 - 1, (), generator=self.generator))
        latents = encode_images(self.policy.pipe, self._world.render(list(prompts), seed), self.generator)
        pred, target = self.policy.denoising_terms(latents, embeds, self.generator)
        return F.mse_loss(pred, target)

    # -- update -----------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> dict[str, float]:
        stats: dict[str, list[float]] = {"loss/refl": [], "loss/pretrain": [], "loss/kl_penalty": [],
                                         "reward/train_step_proxy": [], "policy/grad_norm": [],
                                         "refl/step_index": []}
        for idx in minibatches(len(rollout), self.cfg.train_batch_size, self.generator):
            prompts = [rollout.prompts[i] for i in idx.tolist()]
            embeds = rollout.embeds[idx]
            # 1. sample to a random late step without gradients, one step with them, the reward loss
            loss, rewards, penalty, i = self.refl_step(prompts, embeds)
            total = loss + penalty
            # 2. the pre-training denoising loss on rendered images of the same prompts
            pretrain = None
            if self.cfg.pretrain_beta > 0:
                pretrain = self.pretrain_loss(prompts, embeds)
                total = total + self.cfg.pretrain_beta * pretrain
            # 3. update
            stats["policy/grad_norm"].append(self.optimizer_step(total))
            stats["loss/refl"].append(loss.item())
            stats["loss/pretrain"].append(pretrain.item() if pretrain is not None else 0.0)
            stats["loss/kl_penalty"].append(penalty.item())
            stats["reward/train_step_proxy"].append(rewards.mean().item())
            stats["refl/step_index"].append(float(i))
        return {k: sum(v) / len(v) for k, v in stats.items() if v}


__all__ = ["ReFLAgent", "ReFLConfig", "kl_penalty_from_mean",
           "refl_loss", "require_differentiable_reward"]
