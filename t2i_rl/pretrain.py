"""Pretrain ShapesWorld's Stable Diffusion from rendered images: `python -m t2i_rl.pretrain`.

Reproducible from the seed and the config file (configs/pretrain/shapes_sd.yaml); any key can be
overridden as `key=value` (e.g. `unet.steps=50`). Stages, in order:

1. tokenizer: byte-level BPE trained on the grammar's prompts (deterministic);
2. VAE: AutoencoderKL on rendered images (MSE + a small KL, as SD's first stage without the GAN);
   the latent scaling factor is then set so that latents have unit variance, as in SD;
3. text encoder + UNet: epsilon-prediction denoising loss on VAE latents of rendered train-split
   images, with the prompt dropped 10% of the time for classifier-free guidance, and an EMA of
   the UNet's weights, which is what gets saved.

The pipeline is saved with `save_pretrained` (atomically, also at checkpoints along the way).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import CONFIG_DIR
from .models import build_pipeline, build_tokenizer, save_pipeline_atomically
from .recipe import load_checked, lr_lambda
from .world import ShapesWorld
from .world.grammar import sample_scenes
from .world.render import render_scenes

DEFAULT_CONFIG = CONFIG_DIR / "pretrain" / "shapes_sd.yaml"


def validate(cfg: DictConfig) -> None:
    """Fail before any work on a config that cannot train."""
    for stage in ("vae", "unet"):
        for key in ("steps", "batch_size"):
            if int(cfg[stage][key]) < 1:
                raise ValueError(f"{stage}.{key} must be >= 1, got {cfg[stage][key]}")
        if float(cfg[stage].lr) <= 0:
            raise ValueError(f"{stage}.lr must be > 0, got {cfg[stage].lr}")
    if not 0 <= float(cfg.unet.cond_dropout) < 1:
        raise ValueError(f"unet.cond_dropout must be in [0, 1), got {cfg.unet.cond_dropout}")
    if not 0 <= float(cfg.unet.ema_decay) < 1:
        raise ValueError(f"unet.ema_decay must be in [0, 1), got {cfg.unet.ema_decay}")


def render_batch(world: ShapesWorld, n: int, rng: np.random.Generator, two_object_prob: float):
    scenes = sample_scenes(n, int(rng.integers(2**31)), "train", two_object_prob)
    images, _ = render_scenes(scenes, world.resolution, rng)
    return images, [s.text() for s in scenes]


def train_vae(pipe, world: ShapesWorld, cfg: DictConfig, rng: np.random.Generator) -> None:
    vae = pipe.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.vae.warmup, cfg.vae.steps))
    bar = tqdm(range(cfg.vae.steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        images, _ = render_batch(world, cfg.vae.batch_size, rng, cfg.two_object_prob)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        images, _ = render_batch(world, 256, rng, cfg.two_object_prob)
        std = vae.encode(images * 2 - 1).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def encode_pool(pipe, world: ShapesWorld, cfg: DictConfig, rng: np.random.Generator):
    """Render a pool of images and cache their latent distributions (as SD caches latents)."""
    means, stds, prompts = [], [], []
    for _ in range(cfg.unet.pool_size // 256):
        images, texts = render_batch(world, 256, rng, cfg.two_object_prob)
        dist = pipe.vae.encode(images * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        prompts += texts
    return torch.cat(means), torch.cat(stds), prompts


def train_unet(pipe, world: ShapesWorld, cfg: DictConfig, rng: np.random.Generator, out: Path) -> None:
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    unet.train()
    text_encoder.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.unet.warmup, cfg.unet.steps))
    scale = pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    bar = tqdm(range(cfg.unet.steps), desc="unet", dynamic_ncols=True)
    for step in bar:
        if step % cfg.unet.pool_refresh == 0:
            means, stds, prompts = encode_pool(pipe, world, cfg, rng)
        idx = torch.randint(len(prompts), (cfg.unet.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        texts = [
            "" if rng.random() < cfg.unet.cond_dropout else prompts[i] for i in idx.tolist()
        ]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        # 1. encode the prompts (trained jointly: there is no pretrained CLIP to freeze)
        context = text_encoder(ids)[0]
        # 2. predict the noise and regress it
        loss = F.mse_loss(unet(noisy, t, context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # 3. EMA of the UNet, with a warm-up so that early weights do not dominate
        decay = min(cfg.unet.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet.steps:
            save_with_ema(pipe, ema, out)
    save_with_ema(pipe, ema, out)


def save_with_ema(pipe, ema, out: Path) -> None:
    trained = pipe.unet
    pipe.unet = ema
    save_pipeline_atomically(pipe, out)
    pipe.unet = trained


def pretrain(cfg: DictConfig) -> Path:
    validate(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    out = Path(cfg.output_dir)
    world = ShapesWorld(resolution=cfg.resolution, two_object_prob=cfg.two_object_prob)
    tokenizer = build_tokenizer()
    m = cfg.model
    pipe = build_pipeline(
        tokenizer, m.text_hidden_size, m.text_layers, tuple(m.vae_channels), tuple(m.unet_channels),
        cfg.resolution, cfg.seed,
    )
    start = time.time()
    train_vae(pipe, world, cfg, rng)
    train_unet(pipe, world, cfg, rng, out)
    OmegaConf.save(cfg, out / "pretrain_config.yaml")
    print(f"saved {out} after {(time.time() - start) / 60:.1f} min")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2i_rl.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("sd", "rewards"), default="sd",
                        help="sd: the Stable Diffusion pipeline (default); rewards: the proxy reward "
                             "models, trained on the shipped pipeline's samples "
                             "(configs/pretrain/rewards.yaml)")
    parser.add_argument("--config", default=None, help="YAML config file (default: the stage's own)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=100")
    args = parser.parse_args(argv)
    if args.stage == "rewards":
        from .rewards.train import main as train_rewards

        return train_rewards(([] if args.config is None else ["--config", args.config]) + args.overrides)
    cfg = load_checked(args.config or DEFAULT_CONFIG, args.overrides, validate)
    if cfg is None:
        return 2
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
