"""DPOK (Fan et al. 2023): policy gradient with a KL regularizer to the pre-trained model.

DPOK maximizes E[r(x_0, y)] - beta * KL(p_theta(x_{0:T} | y) || p_pre(x_{0:T} | y)). Both the
policy and the pre-trained model are Gaussian per denoising step with the same sigma_t, so the KL
of the trajectories is the sum over steps of the closed-form per-step KL
    KL_t = ||mu_theta(x_t) - mu_pre(x_t)||^2 / (2 sigma_t^2),
evaluated at states x_t visited by the current sampler (DPOK's Lemma / eq. 5 upper bound).

It is DDPO's loop (agents/ddpo.py: the same collection, advantages, inner epochs, minibatches
and random `timestep_fraction` of the T steps) with DDPO's per-step loss replaced by (see `dpok_loss`)
    L_t = mean_B max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps)) + beta * mean_B KL_t,
    ratio_t = pi_theta(x_{t-1} | x_t) / pi_old(x_{t-1} | x_t),
with log-probs and KL_t both reduced by the MEAN over latent elements (DDPO's convention, so
beta does not scale with the latent size), averaged over the sampled steps (gradients are
accumulated with weight 1 / n_steps before one optimizer step per minibatch). While the policy
equals the collecting policy (ratio = 1) the policy term's gradient is exactly DPOK's
-A * grad log pi_theta; the ratio clip is the trust region of DPOK's reference implementation
(`clip_range = .inf` turns it off: plain importance weighting).

Differences from the paper, on purpose: no learned value baseline (per-prompt statistics
instead, DDPO-style), and the KL is averaged rather than summed over steps (beta absorbs the
factor T * latent_size; DPOK's beta = 0.01 was on a summed eps-difference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ddpo import DDPOAgent, DDPOConfig, ppo_clip_loss


@dataclass
class DPOKConfig(DDPOConfig):
    name: str = "dpok"
    kl_beta: float = field(default=0.01, metadata={
        "help": "DPOK's beta: weight of the per-step KL to the pre-trained model, KL_t = "
                "||mu_theta - mu_ref||^2 / (2 sigma_t^2) MEAN-reduced over latent elements and averaged "
                "over the trained steps (agent.kl_coef, if set, adds to it)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_beta < 0:
            raise ValueError(f"agent.kl_beta = {self.kl_beta!r} is invalid: {self.help('kl_beta')}; "
                             "must be a finite number >= 0")


def dpok_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor,
              beta: float, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPOK's loss at one denoising step of a minibatch; every input is [B].

    loss = mean_B max(-A * r, -A * clip(r, 1 - clip_range, 1 + clip_range)) + beta * mean_B kl,
    r = exp(log_prob - old_log_prob). Returns (loss, stats) with detached stats "policy" (the
    first term), "kl" (mean_B kl, before beta), "kl_term" (beta * kl), "approx_kl"
    (0.5 * mean (log r)^2) and "clipfrac" (fraction with |r - 1| > clip_range).
    """
    policy, approx_kl, clipfrac = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range)
    kl_mean = kl.mean()
    stats = {"policy": policy.detach(), "kl": kl_mean.detach(), "kl_term": (beta * kl_mean).detach(),
             "approx_kl": approx_kl, "clipfrac": clipfrac}
    return policy + beta * kl_mean, stats


class DPOKAgent(DDPOAgent):
    config_class = DPOKConfig
    cfg: DPOKConfig

    @property
    def beta(self) -> float:
        """The KL weight: DPOK's kl_beta plus the generic kl_coef (the KL is computed once)."""
        return self.cfg.kl_beta + self.cfg.kl_coef

    def step_loss(self, x, x_next, i, embeds, old_log_prob, adv):
        if self.beta > 0:  # one policy forward (and one no-grad reference forward) for both
            log_prob, kl = self.policy.log_prob_and_kl(x, x_next, i, embeds, pool=self.cfg.score_pool)
        else:  # beta = 0: skip the reference model's forward
            log_prob = self.policy.log_prob(x, x_next, i, embeds, pool=self.cfg.score_pool)
            kl = torch.zeros_like(log_prob)
        loss, s = dpok_loss(log_prob, old_log_prob, adv, kl, self.beta, self.cfg.clip_range)
        stats = {"loss/policy": s["policy"].item(), "loss/kl": s["kl_term"].item(),
                 "policy/approx_kl": s["approx_kl"].item(), "policy/clipfrac": s["clipfrac"].item()}
        if self.beta > 0:
            stats["policy/kl_to_ref"] = s["kl"].item()
        return loss, stats
