"""A CLIP-style contrastive dual encoder for ShapesWorld, usable as a reward: cos(image, text).

The model is a transformers `CLIPModel` built from a small `CLIPConfig` (a ViT on 32x32 images in
4x4 patches, and a text transformer on the ShapesWorld BPE tokenizer), trained by
`t2i_rl.rewards.train.train_clip` with the symmetric InfoNCE loss on rendered images and their
captions. Like real CLIP it learns what captions make easy to contrast (colours, backgrounds,
shapes) much better than what they rarely contrast within a batch (counts): that weakness is
what lets a policy overoptimize it.

Preprocessing is done in torch so that gradients reach the image (ReFL, DRaFT): resize to the
model's image size (bilinear, antialiased) and normalize with OpenAI CLIP's mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from ..models import build_tokenizer, text_encoder_config
from ..world.judge import check_images
from ._common import TextCache, check_prompt_sets, prompt_index
from .base import RawReward

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(
    tokenizer: CLIPTokenizer,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 2,
    projection_dim: int = 64,
    heads: int = 4,
) -> CLIPConfig:
    """A small CLIPConfig whose text side uses the tokenizer's vocabulary and special-token ids."""
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    for what, hidden in (("vision_hidden", vision_hidden), ("text_hidden", text_hidden)):
        if hidden % heads:
            raise ValueError(f"{what} ({hidden}) must be a multiple of heads ({heads})")
    text = text_encoder_config(tokenizer, text_hidden, text_layers)
    text.num_attention_heads = heads
    text.projection_dim = projection_dim
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        projection_dim=projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def _pooled(out) -> torch.Tensor:
    """`get_*_features` return a tensor in older transformers and an output object in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ShapesCLIP(RawReward):
    """r(x, y) = cosine similarity of CLIP image and text embeddings, in [-1, 1].

    The wrapped model is frozen (eval mode, no parameter gradients) unless `unfreeze()` is called;
    gradients always flow to the images. While frozen, text embeddings are cached by prompt, so
    the contrastive prompts TextNorm scores again and again are encoded once.

    `default_tau` is the temperature the model was trained with (1 / its logit scale): the
    natural TextNorm temperature for it.
    """

    name = "clip"
    differentiable = True

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, cache_size: int = 65536) -> None:
        if not isinstance(model, CLIPModel):
            raise ValueError(f"model must be a transformers CLIPModel, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self._cache = TextCache(cache_size, chunk=1024)
        self.freeze()

    # ---------------------------------------------------------------- construction and saving
    @classmethod
    def build(cls, tokenizer: CLIPTokenizer | None = None, seed: int = 0, **sizes) -> "ShapesCLIP":
        """A randomly initialized model; `sizes` are `clip_config`'s keyword arguments."""
        tokenizer = tokenizer or build_tokenizer()
        torch.manual_seed(seed)
        return cls(CLIPModel(clip_config(tokenizer, **sizes)), tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ShapesCLIP":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model at {path} (config.json is missing)")
        model = CLIPModel.from_pretrained(str(path))
        tokenizer = CLIPTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer).to(device)

    # ---------------------------------------------------------------- state
    def freeze(self) -> "ShapesCLIP":
        """Eval mode and no parameter gradients (how a reward model is used); clears the cache."""
        self.model.eval().requires_grad_(False)
        self._cache.clear()
        return self

    def unfreeze(self) -> "ShapesCLIP":
        """Train mode with parameter gradients (for `train_clip`); disables the text cache."""
        self.model.train().requires_grad_(True)
        self._cache.clear()
        return self

    @property
    def frozen(self) -> bool:
        return not self.model.training and not any(p.requires_grad for p in self.model.parameters())

    def to(self, device: str | torch.device) -> "ShapesCLIP":
        self.model.to(device)
        self._cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def default_tau(self) -> float:
        return float(1.0 / self.model.logit_scale.detach().exp().item())

    # ---------------------------------------------------------------- encoders
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP pixel values, differentiably."""
        x = images.to(self.device, self.model.dtype)
        size = self.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = x.new_tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings [B, D]."""
        check_images(images)
        feats = _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(feats, dim=-1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="longest", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        feats = _pooled(self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)))
        return F.normalize(feats, dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalized text embeddings [N, D]; repeated prompts are encoded once."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings, got {prompts!r}")
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        if not self.frozen:  # training: with gradients, nothing kept
            unique, idx = prompt_index(list(prompts))
            return self._encode_text(unique)[idx.to(self.device)]
        return self._cache(prompts, self._encode_text, self.device)

    # ---------------------------------------------------------------- reward
    def score_prompts(self, images: torch.Tensor, prompt_sets: list[list[str]]) -> torch.Tensor:
        check_images(images)
        k = check_prompt_sets(images, prompt_sets)
        if k == 0:
            return torch.zeros(0, 0, device=self.device)
        img = self.image_embeds(images)  # [B, D]
        txt = self.text_embeds([p for s in prompt_sets for p in s]).view(len(prompt_sets), k, -1)
        return torch.einsum("bd,bkd->bk", img, txt.to(img.dtype))
