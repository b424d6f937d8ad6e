"""ImageReward (Xu et al. 2023) on transformers' BLIP modules.

The `image-reward` package needs torchvision, which cannot be installed beside this torch, so the
model is rebuilt from transformers parts with the same maths as its `ImageReward.score`:

    image_embeds = BLIP ViT-L/16 (all tokens, after the final LayerNorm)
    h = BLIP text encoder(prompt tokens, cross-attending to image_embeds)[:, 0]   ([CLS])
    reward = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

with the prompt tokenized by BERT's uncased tokenizer (ImageReward's adds [DEC] and [ENC], which
no prompt contains), truncated to 35 tokens. ImageReward pads to 35; padded positions are masked
out of the attention, so padding to the longest prompt gives the same [CLS] feature. Images are
preprocessed like its `_transform(224)`: bicubic resize of the shortest side, center crop, OpenAI
CLIP's mean and std (BLIP's own constants are the same numbers).

`ImageRewardModel.from_original` maps the original checkpoint (`ImageReward.pt` + `med_config.json`,
hub repository THUDM/ImageReward) onto the transformers modules; `save_pretrained` writes a
transformers folder that `from_pretrained` reads without converting again.
"""

import json
import math
import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer, BlipConfig, BlipTextModel, BlipVisionModel
from transformers.models.blip.modeling_blip import BlipPreTrainedModel

from .common import (
    ImageTransform,
    PretrainedReward,
    RewardMLP,
    check_weights_fit,
    has_tokenizer,
    load,
    load_state_dict,
    local_path,
    parse_dtype,
    resolve_file,
)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35

_VISION = {
    "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
# In the checkpoint but not in the score: BLIP's contrastive projections, and a buffer that
# transformers rebuilds (the position ids 0..max_position_embeddings - 1).
UNUSED = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
          "blip.text_encoder.embeddings.position_ids")
_TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")


class ImageRewardModel(BlipPreTrainedModel):
    """BLIP's ViT, BLIP's text encoder (with cross-attention to the image) and ImageReward's MLP.
    The MLP stays in float32 when the rest loads in half precision, as ImageReward computes it."""

    config: BlipConfig  # a real annotation (no `from __future__ import annotations`): transformers reads it
    _keep_in_fp32_modules = ["mlp"]

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(config.text_config.hidden_size)
        self.post_init()

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """The un-normalized reward [N] of N (image tokens [N, P, D], prompt) pairs."""
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, is_decoder=False,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return self.mlp(out.last_hidden_state[:, 0].float())

    @classmethod
    def original_config(cls, state: dict[str, torch.Tensor], med_config: dict) -> BlipConfig:
        """The BlipConfig of an original checkpoint: the ViT's sizes from its tensors (heads =
        width / 64, as BLIP's ViT-B and ViT-L; LayerNorm eps 1e-6 as BLIP's ViT), the text
        encoder's from `med_config`, cross-attending to the ViT's width."""
        prefix = "blip.visual_encoder."
        needed = [prefix + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")]
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"not an ImageReward checkpoint: missing {missing}")
        width = state[prefix + "cls_token"].shape[-1]
        patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
        positions = state[prefix + "pos_embed"].shape[1] - 1
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise ValueError(f"pos_embed has {positions} patch positions, not a square number")
        layers = {int(m.group(1)) for k in state if k.startswith(prefix)
                  and (m := _BLOCK.fullmatch(k[len(prefix):])) is not None}
        vision = dict(hidden_size=width, intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
                      num_hidden_layers=len(layers), num_attention_heads=max(1, width // 64),
                      image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        lacking = sorted(set(_TEXT_CONFIG_KEYS) - set(med_config))
        if lacking:
            raise ValueError(f"med_config lacks {lacking}")
        text = {k: med_config[k] for k in _TEXT_CONFIG_KEYS}
        text.update(is_decoder=True, encoder_hidden_size=width)  # is_decoder: build the cross-attention layers
        return BlipConfig(text_config=text, vision_config=vision)

    @classmethod
    def from_original(cls, state: dict[str, torch.Tensor], med_config: dict,
                      dtype: torch.dtype = torch.float32) -> "ImageRewardModel":
        """The model holding an original ImageReward state dict (see `convert_original_state_dict`)."""
        config = cls.original_config(state, med_config)
        weights = convert_original_state_dict(state)
        with init_empty_weights():  # parameters on the meta device: nothing is initialized only to be overwritten
            model = cls(config)
        check_weights_fit(weights, model, "the ImageReward checkpoint does not fit the BLIP modules")
        model.load_state_dict({k: v.float() if k.startswith("mlp.") else v.to(dtype) for k, v in weights.items()},
                              assign=True)
        return model.eval()


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ImageReward keys -> ImageRewardModel keys.

    blip.visual_encoder.* (BLIP's timm-style ViT) -> vision_model.*; blip.text_encoder.* (BLIP's
    BERT "med", the same names) -> text_encoder.*; mlp.layers.* -> mlp.layers.*. The keys in
    `UNUSED` are dropped; any other key is a ValueError naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in UNUSED:
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VISION:
                out["vision_model." + _VISION[rest]] = value
                continue
            m = _BLOCK.fullmatch(rest)
            if m is not None and m.group(2) in _VISION_BLOCK:
                out[f"vision_model.encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"] = value
                continue
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key[len("blip.text_encoder."):]] = value
            continue
        elif key.startswith("mlp.layers."):
            out[key] = value
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"keys an ImageReward checkpoint should not have: {sorted(unknown)[:10]}")
    return out


class ImageReward(PretrainedReward):
    """ImageReward's score, differentiable in the image (ReFL's reward): about N(0, 1) over the
    images of its training prompts, higher is better.

    `path`: a folder written by `save_pretrained` (config.json), or the original checkpoint: a
    folder or hub repository holding `ImageReward.pt` and `med_config.json`, or the .pt file
    itself (with med_config.json beside it). `tokenizer`: where BERT's tokenizer is (default: the
    folder when it has one, else bert-base-uncased).
    """

    name = "imagereward"
    hub_id = "THUDM/ImageReward"
    tokenizer_hub_id = "bert-base-uncased"
    CHECKPOINT = "ImageReward.pt"
    MED_CONFIG = "med_config.json"

    def __init__(self, model: ImageRewardModel, tokenizer, cache_size: int = 0) -> None:
        if not isinstance(model, ImageRewardModel):
            raise ValueError(f"model must be an ImageRewardModel, got {type(model).__name__}")
        super().__init__(model, tokenizer, ImageTransform.square(model.config.vision_config.image_size), cache_size)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """A transformers folder (config, weights, tokenizer) that `from_pretrained` loads as is."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, tokenizer: str | os.PathLike | None = None):
        path = path or cls.hub_id
        dtype = parse_dtype(dtype)
        local = local_path(path)
        folder = local if local is None or local.is_dir() else local.parent
        if folder is not None and (folder / "config.json").is_file():
            model = load("ImageReward model", folder, ImageRewardModel.from_pretrained, dtype=dtype)
        else:
            checkpoint = resolve_file(path, (cls.CHECKPOINT,), "ImageReward checkpoint")
            med = resolve_file(folder or path, (cls.MED_CONFIG,), "BLIP text config (med_config.json)")
            try:
                model = ImageRewardModel.from_original(load_state_dict(checkpoint), json.loads(Path(med).read_text()),
                                                       dtype)
            except ValueError as e:
                raise ValueError(f"{checkpoint}: {e}") from e
        source = tokenizer or (folder if has_tokenizer(folder) else cls.tokenizer_hub_id)
        return cls(model, load("tokenizer", source, AutoTokenizer.from_pretrained)).to(device)

    def score(self, images: torch.Tensor, prompts: list[str], k: int) -> torch.Tensor:
        image_embeds = self.model.vision_model(pixel_values=self.preprocess(images)).last_hidden_state
        ids, mask = self.tokenize(prompts, MAX_LENGTH)
        raw = self.model(image_embeds.repeat_interleave(k, dim=0), ids, mask)
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).view(images.shape[0], k)
