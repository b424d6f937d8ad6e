"""DPOK (Fan et al. 2023): policy gradient with a KL regularizer to the pre-trained model.

DPOK maximizes E[r(x_0, y)] - beta * KL(p_theta(x_{0:T} | y) || p_pre(x_{0:T} | y)). Both the
policy and the pre-trained model are Gaussian per denoising step with the same sigma_t, so the KL
of the trajectories is the sum over steps of the closed-form per-step KL
    KL_t = ||mu_theta(x_t) - mu_pre(x_t)||^2 / (2 sigma_t^2),
evaluated at states x_t visited by the current sampler (DPOK's Lemma / eq. 5 upper bound).

Per epoch: collect images with the env, advantages = per-prompt normalized rewards clipped to
+-adv_clip_max, then for `inner_epochs` passes, minibatches of `train_batch_size` samples and a
random `timestep_fraction` of the T steps, minimise (see `dpok_loss`)
    L_t = mean_B max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps)) + beta * mean_B KL_t,
    ratio_t = pi_theta(x_{t-1} | x_t) / pi_old(x_{t-1} | x_t),
with log-probs and KL_t both reduced by the MEAN over latent elements (DDPO's convention, so
beta does not scale with the latent size), averaged over the sampled steps (gradients are
accumulated with weight 1 / n_steps before one optimizer step per minibatch). While the policy
equals the collecting policy (ratio = 1) the policy term's gradient is exactly DPOK's
-A * grad log pi_theta; the ratio clip is the trust region of DPOK's reference implementation
(`clip_range = .inf` turns it off: plain importance weighting).

Differences from the paper, on purpose: no learned value baseline (per-prompt normalization
instead, DDPO-style), and the KL is averaged rather than summed over steps (beta absorbs the
factor T * latent_size; DPOK's beta = 0.01 was on a summed eps-difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Agent, AgentConfig, Rollout, minibatches, per_prompt_normalize


@dataclass
class DPOKConfig(AgentConfig):
    name: str = "dpok"
    kl_beta: float = field(default=0.01, metadata={
        "help": "DPOK's beta: weight of the per-step KL to the pre-trained model, KL_t = "
                "||mu_theta - mu_ref||^2 / (2 sigma_t^2) MEAN-reduced over latent elements and averaged "
                "over the trained steps (agent.kl_coef, if set, adds to it)"})
    clip_range: float = field(default=1e-4, metadata={
        "help": "ratio clip epsilon of the importance-weighted policy term (.inf: no clipping)"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    timestep_fraction: float = field(default=1.0, metadata={
        "help": "fraction of the T denoising steps trained on per minibatch (drawn at random)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("kl_beta", math.isfinite(self.kl_beta) and self.kl_beta >= 0, "must be a finite number >= 0"),
            ("clip_range", self.clip_range > 0, "must be > 0 (.inf: no clipping)"),
            ("adv_clip_max", self.adv_clip_max > 0, "must be > 0"),
            ("inner_epochs", isinstance(self.inner_epochs, int) and self.inner_epochs >= 1, "must be an int >= 1"),
            ("timestep_fraction", 0 < self.timestep_fraction <= 1, "must be in (0, 1]"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"agent.{key} = {getattr(self, key)!r} is invalid: {self.help(key)}; {rule}")


def dpok_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor,
              beta: float, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPOK's loss at one denoising step of a minibatch; every input is [B].

    loss = mean_B max(-A * r, -A * clip(r, 1 - clip_range, 1 + clip_range)) + beta * mean_B kl,
    r = exp(log_prob - old_log_prob). Returns (loss, stats) with detached stats "policy" (the
    first term), "kl" (mean_B kl, before beta), "kl_term" (beta * kl), "approx_kl"
    (0.5 * mean (log r)^2) and "clipfrac" (fraction with |r - 1| > clip_range).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean()
    loss = policy + beta * kl_mean
    stats = {
        "policy": policy.detach(),
        "kl": kl_mean.detach(),
        "kl_term": (beta * kl_mean).detach(),
        "approx_kl": (0.5 * log_ratio.pow(2).mean()).detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
    }
    return loss, stats


class DPOKAgent(Agent):
    config_class = DPOKConfig
    cfg: DPOKConfig

    @property
    def beta(self) -> float:
        """The KL weight: DPOK's kl_beta plus the generic kl_coef (the KL is computed once)."""
        return self.cfg.kl_beta + self.cfg.kl_coef

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        adv = per_prompt_normalize(rollout.prompts, rollout.rewards.float())
        return adv.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    def update(self, rollout: Rollout) -> dict[str, float]:
        adv = self.advantages(rollout).to(rollout.latents.device)
        n_steps = max(1, round(self.cfg.timestep_fraction * self.policy.num_steps))
        beta = self.beta
        stats: dict[str, list[float]] = {"loss/policy": [], "loss/kl": [], "policy/kl_to_ref": [],
                                         "policy/approx_kl": [], "policy/clipfrac": [], "policy/grad_norm": []}
        for _ in range(self.cfg.inner_epochs):
            for idx in minibatches(len(rollout), self.cfg.train_batch_size, self.generator):
                steps = torch.randperm(self.policy.num_steps, generator=self.generator)[:n_steps]
                for i in steps.tolist():
                    x, x_next = rollout.latents[idx, i], rollout.latents[idx, i + 1]
                    embeds = rollout.embeds[idx]
                    if beta > 0:  # one policy forward (and one no-grad reference forward) for both
                        log_prob, kl = self.policy.log_prob_and_kl(x, x_next, i, embeds)
                    else:  # beta = 0: skip the reference model's forward
                        log_prob = self.policy.log_prob(x, x_next, i, embeds)
                        kl = torch.zeros_like(log_prob)
                    loss, s = dpok_loss(log_prob, rollout.log_probs[idx, i].to(log_prob.device), adv[idx], kl,
                                        beta, self.cfg.clip_range)
                    (loss / n_steps).backward()
                    stats["loss/policy"].append(s["policy"].item())
                    stats["loss/kl"].append(s["kl_term"].item())
                    if beta > 0:
                        stats["policy/kl_to_ref"].append(s["kl"].item())
                    stats["policy/approx_kl"].append(s["approx_kl"].item())
                    stats["policy/clipfrac"].append(s["clipfrac"].item())
                stats["policy/grad_norm"].append(self.optimizer_step())
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["policy/advantage_abs"] = adv.abs().mean().item()
        return out
