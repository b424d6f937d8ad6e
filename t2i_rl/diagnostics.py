"""Overoptimization diagnostics: what the proxy says against what the gold judge says.

Every number here is measured, never optimized: the gold reward, the KL of the policy to the base
model, sample diversity, and the "hacked" fraction (images the proxy rates above the base
model's 90th percentile while the judge says they are wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def rollout_metrics(rewards: torch.Tensor, info: dict[str, torch.Tensor]) -> dict[str, float]:
    """Map the env's info keys onto the stable TensorBoard tags (listed in the README)."""
    out = {"reward/proxy": rewards.float().mean().item()}
    for key, value in info.items():
        v = value.float().mean().item()
        if key == "gold/score":
            out["reward/gold"] = v
        elif key == "gold/correct":  # a rate over the images the judge is sure about
            sure = info["gold/unsure"] < 0.5 if "gold/unsure" in info else torch.ones_like(value, dtype=torch.bool)
            out["reward/gold_correct"] = value[sure].float().mean().item() if sure.any() else float("nan")
        elif key == "gold/unsure":
            out["reward/gold_unsure"] = v
        elif key.startswith("reward/textnorm/"):
            out["textnorm/" + key.removeprefix("reward/textnorm/")] = v
        elif key.startswith(("reward/", "gold/")):
            out[key] = v
    return out


def pixel_diversity(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Mean pairwise RMS pixel distance over the batch, and among images of the same prompt."""
    flat = images.flatten(1).float()
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = len(prompts)
    off = ~torch.eye(n, dtype=torch.bool)
    out = {"diversity/pixel_rms": dist[off].mean().item() if n > 1 else 0.0}
    same = torch.tensor([[a == b for b in prompts] for a in prompts]) & off
    if same.any():
        out["diversity/same_prompt_pixel_rms"] = dist[same].mean().item()
    return out


@torch.no_grad()
def kl_to_base(policy, latents: torch.Tensor, embeds: torch.Tensor, every: int = 2) -> float:
    """The KL of the policy's path distribution to the base model's, in nats per image.

    Sum over steps of the closed-form per-step KL (summed over latent elements), estimated on
    every `every`-th step of the stored transitions and scaled up. Every (sample, step) pair goes
    through one policy and one reference UNet call (per-row timesteps), not two calls per step: on
    a CPU many small calls cost several times one large one.
    """
    steps = torch.arange(0, policy.num_steps, every)
    n = latents.shape[0]
    rows = latents[:, steps].flatten(0, 1)  # sample-major: (sample 0, every step), (sample 1, ...), ...
    kl = policy.kl_to_reference(rows, steps.repeat(n), embeds.repeat_interleave(len(steps), 0), reduce="sum")
    return kl.view(n, len(steps)).sum(1).mean().item() * policy.num_steps / len(steps)


@dataclass
class HackDetector:
    """Fraction of images whose proxy reward is above the base model's q-quantile while the judge
    says they are wrong. The threshold is fixed from the first (base-model) rollout."""

    quantile: float = 0.9
    threshold: float | None = None

    def __call__(self, proxy: torch.Tensor, gold_correct: torch.Tensor | None) -> float:
        if self.threshold is None:
            self.threshold = float(torch.quantile(proxy.float(), self.quantile))
        if gold_correct is None:
            return float("nan")
        hacked = (proxy.float() > self.threshold) & (gold_correct < 0.5)
        return hacked.float().mean().item()


@dataclass
class EarlyStopper:
    """Stops when the watched score (a held-out monitor reward model, or gold in a study) falls for
    `patience` evaluations in a row while the optimized proxy (on the prompts it is optimized on)
    rises over them."""

    patience: int = 3
    history: list[tuple[float, float]] = field(default_factory=list)

    def update(self, watched: float, proxy: float) -> bool:
        self.history.append((watched, proxy))
        if len(self.history) <= self.patience:
            return False
        recent = self.history[-(self.patience + 1):]
        scores = [w for w, _ in recent]
        proxies = [p for _, p in recent]
        return all(b < a for a, b in zip(scores, scores[1:])) and proxies[-1] > proxies[0]


def image_grid(images: torch.Tensor, ncol: int = 8, pad: int = 2) -> torch.Tensor:
    """Images [N, 3, H, W] -> one grid [3, rows*(H+pad)+pad, ncol*(W+pad)+pad], white padding."""
    n, c, h, w = images.shape
    ncol = min(ncol, n)
    nrow = int(np.ceil(n / ncol))
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k, img in enumerate(images.float().cpu()):
        r, q = divmod(k, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid
