"""Stable Diffusion 1.5's and 2.1's architectures with random weights, where no checkpoint can be
downloaded: the values of the checkpoints' own config.json files, built at full size (GPU
measurements, benchmarks/sd15_on_gpu.py) or with the widths scaled down (tests/test_sd_models.py),
and saved with `save_pretrained` so that `load_pipeline` reads them the way it reads real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from .models import build_tokenizer, text_encoder_config

# stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json, scheduler_config.json
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower (SD 1.5); SD 2.1 uses OpenCLIP ViT-H/14's (1024 wide, 23 layers, gelu)
SD15_TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 (768, v-prediction): what differs from SD 1.5
SD21_UNET = {**SD15_UNET, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}
SD21_TEXT = dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16)
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# scaled down for CPU tests (`save_random_sd(name, path, 64, **SCALED_DOWN[name])`): widths / 20 (/ 16 for
# SD 2.1, whose 5, 10, 20 heads must divide them), with SD's layout of blocks, layers and heads kept
SCALED_DOWN_VAE = {"block_out_channels": (8, 16, 32, 32), "norm_num_groups": 8}
SCALED_DOWN = {
    "sd15": dict(unet={"block_out_channels": (16, 32, 64, 64), "norm_num_groups": 8}, vae=SCALED_DOWN_VAE,
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "sd21": dict(unet={"block_out_channels": (20, 40, 80, 80), "norm_num_groups": 10}, vae=SCALED_DOWN_VAE,
                 text=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)),
}
ARCHITECTURES = {
    "sd15": (SD15_UNET, SD15_TEXT, PNDMScheduler, SD15_SCHEDULER),
    "sd21": (SD21_UNET, SD21_TEXT, DDIMScheduler, SD21_SCHEDULER),
}


def save_random_sd(name: str, path: str | Path, resolution: int, unet: dict | None = None, vae: dict | None = None,
                   text: dict | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save `name`'s pipeline ("sd15" or "sd21") with random weights to the folder `path`, for
    `resolution`-pixel images. `unet`, `vae` and `text` override config values (smaller widths);
    the text encoder takes ShapesWorld's offline tokenizer (SD's vocabulary needs its hub files)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    unet_config, text_config, scheduler_class, scheduler_config = ARCHITECTURES[name]
    unet_config = {**unet_config, **(unet or {}), "sample_size": resolution // 8}
    text_config = {**text_config, **(text or {})}
    tokenizer = build_tokenizer()
    encoder = text_encoder_config(tokenizer, text_config["hidden_size"], text_config["num_hidden_layers"])
    for key, value in text_config.items():
        setattr(encoder, key, value)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**{**SD_VAE, **(vae or {}), "sample_size": resolution}),
        text_encoder=CLIPTextModel(encoder),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**{**unet_config, "cross_attention_dim": text_config["hidden_size"]}),
        scheduler=scheduler_class.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype).save_pretrained(path, safe_serialization=True)
    return Path(path)
