"""Tiny, randomly initialized instances of each published reward's architecture, saved where its
`from_pretrained` reads them: for smoke runs of the env configs and for tests, with no download.

    save_tiny_reward("imagereward", "runs/tiny/imagereward")
    python -m t2i_rl.train env=imagereward env.reward.path=runs/tiny/imagereward ...

Their scores mean nothing; their shapes, preprocessing, tokenizers and file layouts are the real ones
at 32x32 pixels and widths of 32.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval, BlipConfig, BlipImageProcessorPil, CLIPImageProcessorPil,
    CLIPModel,
)

from ...models import build_tokenizer
from ..clip_style import _pooled, clip_config
from .common import RewardMLP
from .imagereward import ImageReward, ImageRewardModel

IMAGE_SIZE = 32
WIDTH = 32
INIT_STD = 0.2  # BLIP's defaults (0.02; 1e-10 for the ViT) make a tiny random model's score all but constant
TINY_NAMES = ("clipscore", "pickscore", "hpsv2", "aesthetic", "imagereward", "blip2")


def bert_tokenizer() -> BertTokenizer:
    """An uncased WordPiece tokenizer over single characters: any ASCII prompt tokenizes, in BERT's
    special-token layout ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4)."""
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + string.punctuation)
    vocab += ["##" + c for c in chars]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def _tiny_clip(seed: int) -> tuple[CLIPModel, object]:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = clip_config(tokenizer, image_size=IMAGE_SIZE, patch_size=8, vision_hidden=WIDTH, vision_layers=1,
                         text_hidden=WIDTH, text_layers=1, projection_dim=16, heads=2)
    return CLIPModel(config), tokenizer


@torch.no_grad()
def _make_cosines_positive(model: CLIPModel, tokenizer) -> None:
    """A random CLIP's image-text cosines share one sign; flip the image projection if it is
    negative, so that CLIPScore's max(cos, 0) is not 0 for every image."""
    tok = tokenizer(["one red circle on a white background", "two blue squares"], padding=True, return_tensors="pt")
    pixels = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    img = F.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(_pooled(model.get_text_features(**tok)), dim=-1)
    if (img @ txt.T).mean() < 0:
        model.visual_projection.weight.neg_()


def save_clip_folder(model: CLIPModel, tokenizer, path: str | os.PathLike) -> None:
    """A CLIP reward's folder as `from_pretrained` reads it: the model, its tokenizer and an image
    processor for the model's image size."""
    size = model.config.vision_config.image_size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)


def _blip_text(tokenizer: BertTokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=2 * WIDTH, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                initializer_range=INIT_STD,
                bos_token_id=None, eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id)


def _blip_vision(**extra) -> dict:
    return dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8, initializer_range=INIT_STD, **extra)


def save_tiny_reward(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random `name` reward model (one of TINY_NAMES) to the folder `path`."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(TINY_NAMES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if name in ("clipscore", "pickscore", "hpsv2", "aesthetic"):
        model, tokenizer = _tiny_clip(seed)
        if name == "clipscore":
            _make_cosines_positive(model, tokenizer)
        save_clip_folder(model, tokenizer, path)
        if name == "aesthetic":
            head = RewardMLP(model.config.projection_dim)
            weights = {k: v.contiguous() for k, v in head.state_dict().items()}
            save_file(weights, str(path / "aesthetic_head.safetensors"))
        return path
    tokenizer = bert_tokenizer()
    torch.manual_seed(seed)
    if name == "imagereward":
        config = BlipConfig(text_config=dict(_blip_text(tokenizer), is_decoder=True),
                            vision_config=_blip_vision(layer_norm_eps=1e-6), initializer_range=INIT_STD)
        model = ImageRewardModel(config)
        for layer in model.mlp.layers[::2]:  # variance-preserving, so that the image moves the score
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        ImageReward(model, tokenizer).save_pretrained(path)
        return path
    qformer = dict(_blip_text(tokenizer), encoder_hidden_size=WIDTH, use_qformer_text_input=True)
    config = Blip2Config(vision_config=_blip_vision(), qformer_config=qformer, num_query_tokens=4,
                         image_text_hidden_size=16, initializer_range=INIT_STD)
    Blip2ForImageTextRetrieval(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path
