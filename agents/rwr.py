"""Reward-weighted regression (Lee et al. 2023, "Aligning Text-to-Image Models using Human Feedback").

The model is fine-tuned with the denoising loss on its own samples, each weighted by its reward,
plus beta times the ordinary denoising loss on pre-training data, which keeps image fidelity:
    L = E_{(x0, y) ~ model samples}[ w(r(x0, y)) * ||eps - eps_theta(x_t, t, y)||^2 ]
        + pretrain_beta * E_{(x0, y) ~ pre-training data}[ ||eps - eps_theta(x_t, t, y)||^2 ],
with t ~ U{0, ..., num_train_timesteps - 1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t), the
conditional model output (no guidance) of the policy's trainable UNet. Both terms are reduced by
the MEAN over latent elements, then the mean over the batch (see `weighted_denoising_loss`). For
v-prediction / sample-prediction models the target is the velocity / x0 instead of eps.

Weights (`reward_weights`): "reward" uses the reward itself as in Lee et al. (whose rewards are
probabilities in [0, 1]); negative rewards are clamped to 0, since a negative weight would turn
the regression into an unbounded ascent of the denoising error. "softmax" uses
B * softmax(r / temperature) over the rollout (mean weight 1, scale-free in the reward).
"group_top" collects groups of `group_size` samples of one prompt and keeps the best
`top_fraction` of each group (weight 1 / top_fraction, the rest 0: mean weight 1), and the update
regresses on the kept samples alone, each with weight 1: filtered fine-tuning on the best of n
(RAFT, Dong et al. 2023; ReST-style), which moves the model towards the part of its own
distribution that the reward ranks first, prompt by prompt, and is blind to the reward's scale.

The generic `kl_coef` (AgentConfig) adds kl_coef * KL_t to the base model at one random sampler
step of each minibatch's trajectories (0 by default: Lee et al. regularize with the pre-training
term only).

Lee et al. collect one offline data set and train on it; here each epoch collects a fresh rollout
with the current model (online / iterated RWR), like every agent in this package.

Pre-training data (`pretrain_data`): "shapes" renders ground-truth images of ShapesWorld train
prompts (the data the shipped pipeline was pretrained on); a PATH is a folder of images with a
`captions.json` mapping file name -> caption (for SD-scale pipelines), loaded with PIL, RGB,
center-cropped to a square and resized to the pipeline's image size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2i_rl import distributed
from t2i_rl.policy import encode_images

from .base import Agent, AgentConfig, Rollout, minibatches

WEIGHTINGS = ("reward", "softmax", "group_top")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class RWRConfig(AgentConfig):
    name: str = "rwr"
    weighting: str = field(default="reward", metadata={
        "help": "per-sample weight of the denoising loss: 'reward' (Lee et al.: the reward itself, "
                "negatives clamped to 0) or 'softmax' (B * softmax(reward / temperature) over the rollout)"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature (weighting='softmax' only)"})
    group_size: int = field(default=0, metadata={
        "help": "samples per prompt collected together (0: the env's own prompt draws); weighting='group_top' "
                "needs groups"})
    top_fraction: float = field(default=0.25, metadata={
        "help": "the share of each group kept, weight 1 / top_fraction (weighting='group_top' only)"})
    pretrain_beta: float = field(default=1.0, metadata={
        "help": "weight of the unweighted denoising loss on pre-training data (Lee et al.'s beta; 1.0 "
                "as in the paper; 0: off)"})
    pretrain_batch_size: int = field(default=8, metadata={"help": "pre-training images per gradient step"})
    pretrain_data: str = field(default="shapes", metadata={
        "help": "pre-training data: 'shapes' (rendered ShapesWorld train prompts) or a folder of images "
                "with captions.json {filename: caption}"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})

    per_process_fields = (*AgentConfig.per_process_fields, "pretrain_batch_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("weighting", self.weighting in WEIGHTINGS, f"must be one of {WEIGHTINGS}"),
            ("temperature", self.temperature > 0, "must be a finite number > 0"),
            ("pretrain_beta", self.pretrain_beta >= 0, "must be a finite number >= 0"),
            ("pretrain_batch_size", isinstance(self.pretrain_batch_size, int) and self.pretrain_batch_size >= 1,
             "must be an int >= 1"),
            ("pretrain_data", isinstance(self.pretrain_data, str) and (
                self.pretrain_data == "shapes" or (Path(self.pretrain_data) / "captions.json").is_file()),
             "must be 'shapes' or a folder that holds captions.json"),
            ("inner_epochs", isinstance(self.inner_epochs, int) and self.inner_epochs >= 1, "must be an int >= 1"),
            ("group_size", isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
             and (self.group_size == 0 or self.group_size >= 2 and self.samples_per_epoch % self.group_size == 0),
             f"must be 0 (off) or an int >= 2 dividing agent.samples_per_epoch ({self.samples_per_epoch})"),
            ("top_fraction", 0 < self.top_fraction <= 1, "must be in (0, 1]"),
            ("weighting", self.weighting != "group_top" or self.group_size >= 2,
             "group_top needs agent.group_size >= 2 (the groups it ranks)"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"agent.{key} = {getattr(self, key)!r} is invalid: {self.help(key)}; {rule}")


# ------------------------------------------------------------------------------ pure functions
def reward_weights(rewards: torch.Tensor, weighting: str, temperature: float = 1.0, group_size: int = 0,
                   top_fraction: float = 1.0) -> torch.Tensor:
    """Per-sample weights [B] from rewards [B] (no gradient): see the module docstring. For
    "group_top" the rows are groups of `group_size` consecutive samples; ties keep the earlier row."""
    r = rewards.detach().float()
    if weighting == "reward":
        return r.clamp(min=0.0)
    if weighting == "softmax":
        return len(r) * torch.softmax(r / temperature, dim=0)
    if weighting == "group_top":
        if group_size < 2 or len(r) % group_size:
            raise ValueError(f"group_top needs groups of >= 2 dividing the {len(r)} rewards, got {group_size}")
        keep = max(1, round(top_fraction * group_size))
        groups = r.view(-1, group_size)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :keep]
        weights = torch.zeros_like(groups).scatter_(1, order, group_size / keep)
        return weights.flatten()
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def weighted_denoising_loss(pred: torch.Tensor, target: torch.Tensor,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b w_b * mean_{c,h,w} (pred_b - target_b)^2 (plain MSE when `weights` is None)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample) * per_sample).mean()


# ------------------------------------------------------------------------------ pre-training data
class CaptionFolder:
    """A folder of images and `captions.json` ({filename: caption}); images load on demand."""

    def __init__(self, root: str | Path, resolution: int) -> None:
        self.root = Path(root)
        path = self.root / "captions.json"
        if not path.is_file():
            raise FileNotFoundError(f"no captions.json in {self.root}")
        captions = json.loads(path.read_text())
        if not isinstance(captions, dict) or not captions:
            raise ValueError(f"{path} must be a non-empty JSON object {{filename: caption}}")
        missing = [f for f in captions if not (self.root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) named in {path} are missing, e.g. {missing[0]!r}")
        self.files = sorted(captions)
        self.captions = [str(captions[f]) for f in self.files]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Image `index` as [3, S, S] in [0, 1]: RGB, center square crop, resized."""
        import numpy as np
        from PIL import Image

        with Image.open(self.root / self.files[index]) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((self.resolution, self.resolution), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(self), (n,), generator=generator).tolist()
        return torch.stack([self.load(i) for i in idx]), [self.captions[i] for i in idx]


class ShapesData:
    """Ground-truth renders of ShapesWorld train prompts (the shipped pipeline's pre-training data)."""

    def __init__(self, resolution: int) -> None:
        from t2i_rl.world import ShapesWorld

        self.world = ShapesWorld(resolution=resolution)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        prompts = self.world.sample_prompts(n, seed=seed, split="train")
        return self.world.render(prompts, seed=seed), prompts


def make_pretrain_data(spec: str, resolution: int):
    return ShapesData(resolution) if spec == "shapes" else CaptionFolder(spec, resolution)


# ------------------------------------------------------------------------------ agent
class RWRAgent(Agent):
    config_class = RWRConfig
    cfg: RWRConfig

    def __init__(self, cfg: RWRConfig, env, policy) -> None:
        super().__init__(cfg, env, policy)
        self.pretrain_data = make_pretrain_data(cfg.pretrain_data, env.image_size) if cfg.pretrain_beta > 0 else None

    # -- the denoising loss ---------------------------------------------------------------
    @torch.no_grad()
    def pretrain_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, prompt embeds) of `pretrain_batch_size` pre-training images."""
        images, prompts = self.pretrain_data.sample(self.cfg.pretrain_batch_size, self.generator)
        return encode_images(self.policy.pipe, images, self.generator), self.policy.encode_prompts(prompts)

    # -- collect and update ---------------------------------------------------------------
    def collect(self, prompts: list[str] | None = None) -> Rollout:
        """An epoch's samples, in groups of `group_size` samples of one prompt when set."""
        if prompts is None and self.cfg.group_size:
            prompts = self.grouped_prompts(self.cfg.group_size)
        return super().collect(prompts)

    def update(self, rollout: Rollout) -> dict[str, float]:
        # 1. weights from the rewards, over every process's samples (a softmax spans the batch); this
        #    process keeps its rows
        all_weights = reward_weights(distributed.gather(rollout.rewards), self.cfg.weighting, self.cfg.temperature,
                                     self.cfg.group_size, self.cfg.top_fraction)
        weights = distributed.local_rows(all_weights).to(rollout.latents.device)
        rows = torch.arange(len(rollout))
        if self.cfg.weighting == "group_top":  # the kept samples alone, each with weight 1
            rows = torch.nonzero(weights > 0).flatten().cpu()
            weights = torch.ones_like(weights)
        stats: dict[str, list[float]] = {"loss/reward_weighted": [], "loss/pretrain": [], "loss/kl_penalty": [],
                                         "policy/grad_norm": []}
        for _ in range(self.cfg.inner_epochs):
            for idx in (rows[i] for i in minibatches(len(rows), self.cfg.train_batch_size, self.generator)):
                # 2. the reward-weighted denoising loss on the samples' final latents
                pred, target = self.policy.denoising_terms(rollout.latents[idx, -1], rollout.embeds[idx],
                                                            self.generator)
                loss = weighted_denoising_loss(pred, target, weights[idx])
                stats["loss/reward_weighted"].append(loss.item())
                # 3. plus beta x the plain denoising loss on pre-training images
                if self.pretrain_data is not None:
                    latents, embeds = self.pretrain_batch()
                    pre_pred, pre_target = self.policy.denoising_terms(latents, embeds, self.generator)
                    pre_loss = weighted_denoising_loss(pre_pred, pre_target)
                    stats["loss/pretrain"].append(pre_loss.item())
                    loss = loss + self.cfg.pretrain_beta * pre_loss
                if self.cfg.kl_coef > 0:  # the generic KL to the base model, at one random sampler step
                    i = int(torch.randint(self.policy.num_steps, (1,), generator=self.generator))
                    penalty = self.kl_penalty(rollout.latents[idx, i], i, rollout.embeds[idx])
                    stats["loss/kl_penalty"].append(penalty.item())
                    loss = loss + penalty
                # 4. update
                stats["policy/grad_norm"].append(self.optimizer_step(loss))
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["rwr/weight_mean"] = all_weights.mean().item()
        out["rwr/weight_max"] = all_weights.max().item()
        return out
