"""Rewards on CLIP embeddings: CLIPScore, PickScore, HPSv2 and LAION's aesthetic predictor.

The first three are one formula, r(x, y) = scale * cos(image embedding, text embedding), with
their own weights and scale:

- CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0), on OpenAI CLIP (they used ViT-B/32; the
  default here is ViT-L/14, the CLIP of Stable Diffusion 1.x; any CLIPModel folder works);
- PickScore (Kirstain et al. 2023): logit_scale.exp() * cos, as the PickScore repository scores,
  on a fine-tuned CLIP-H whose tokenizer and image processor are LAION's CLIP-ViT-H-14;
- HPSv2 (Wu et al. 2023): 100 * cos. The HPSv2 package returns the cosine (about 0.27 for a good
  image); its benchmark tables print it x 100, which is what this returns. The weights are an
  open_clip ViT-H-14 checkpoint, converted on load (see `open_clip.py`), or a converted folder.

`default_tau` is scale / logit_scale.exp(): at that temperature TextNorm's softmax over prompts
is the model's own contrastive softmax. All four preprocess like OpenAI CLIP (bicubic resize of
the shortest side, center crop, OpenAI mean and std), from the processor config when there is one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

from .._common import positive_float
from ..clip_style import _pooled
from .common import (
    ImageTransform, PretrainedReward, RewardMLP, has_tokenizer, load, load_state_dict, local_dir, local_path,
    parse_dtype, processor_transform, resolve_file,
)
from .open_clip import clip_from_open_clip


def load_clip(path: str | os.PathLike, model_class=CLIPModel, dtype: torch.dtype = torch.float32):
    folder = local_dir(path)
    if folder is not None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model in {str(path)!r} (config.json is missing)")
    return load("CLIP model", path, model_class.from_pretrained, dtype=dtype)


class CLIPReward(PretrainedReward):
    """r(x, y) = scale * cos(image, text) of a transformers CLIPModel, or scale * max(cos, 0)
    with `clamp` (CLIPScore). Subclasses fix the scale, the hub ids and how weights load."""

    name = "clip-cosine"
    hub_id: str = "openai/clip-vit-large-patch14"
    processor_hub_id: str | None = None  # tokenizer + image processor when the model repo has none

    def __init__(self, model: CLIPModel, tokenizer, transform: ImageTransform, scale: float,
                 clamp: bool = False, cache_size: int = 65536) -> None:
        if not isinstance(model, CLIPModel):
            raise ValueError(f"model must be a transformers CLIPModel, got {type(model).__name__}")
        super().__init__(model, tokenizer, transform, cache_size)
        self.scale = positive_float(scale, "scale")
        self.clamp = bool(clamp)
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @property
    def default_tau(self) -> float:
        return self.scale / float(self.model.logit_scale.detach().float().exp())

    @classmethod
    def settings(cls, model: CLIPModel) -> dict:
        """The scale (and clamp) of this reward for a loaded model."""
        return {"scale": 1.0}

    @classmethod
    def load_model(cls, path: str | os.PathLike, dtype: torch.dtype) -> CLIPModel:
        return load_clip(path, CLIPModel, dtype)

    @classmethod
    def processor_source(cls, path: str | os.PathLike) -> str | os.PathLike:
        """Where the tokenizer and image processor come from when `processor` is not given: the
        model's own folder if it has a tokenizer, else `processor_hub_id` (or the model's hub id)."""
        local = local_path(path)
        folder = local if local is None or local.is_dir() else local.parent
        if has_tokenizer(folder):
            return folder
        return cls.processor_hub_id or path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, processor: str | os.PathLike | None = None):
        """Load from a local folder or a hub id (default `hub_id`); `processor` is where the
        tokenizer and image processor are (default: see `processor_source`)."""
        path = path or cls.hub_id
        model = cls.load_model(path, parse_dtype(dtype))
        source = processor or cls.processor_source(path)
        tokenizer = load("tokenizer", source, AutoTokenizer.from_pretrained)
        transform = processor_transform(source, CLIPImageProcessorPil, model.config.vision_config.image_size)
        return cls(model, tokenizer, transform, **cls.settings(model)).to(device)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings [B, D], differentiable in the images."""
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=self.preprocess(images))), dim=-1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts, self.max_length)
        return F.normalize(_pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalized text embeddings [N, D], cached by prompt."""
        return self.cached(prompts, self._encode_text)

    def score(self, images: torch.Tensor, prompts: list[str], k: int) -> torch.Tensor:
        img = self.image_embeds(images)
        txt = self.text_embeds(prompts).view(img.shape[0], k, -1).to(img.dtype)
        cos = torch.einsum("bd,bkd->bk", img, txt)
        return self.scale * (cos.clamp_min(0) if self.clamp else cos)


class CLIPScore(CLIPReward):
    """CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0); in [0, 2.5]."""

    name = "clipscore"
    WEIGHT = 2.5

    @classmethod
    def settings(cls, model: CLIPModel) -> dict:
        return {"scale": cls.WEIGHT, "clamp": True}


class PickScore(CLIPReward):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos, about 20 for a good image."""

    name = "pickscore"
    hub_id = "yuvalkirstain/PickScore_v1"
    processor_hub_id = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    @classmethod
    def settings(cls, model: CLIPModel) -> dict:
        return {"scale": float(model.logit_scale.detach().float().exp())}


class HPSv2(CLIPReward):
    """HPSv2 (Wu et al. 2023): 100 * cos of an open_clip ViT-H-14 fine-tuned on human preferences.

    `path`: a converted CLIPModel folder (config.json), an open_clip checkpoint file, or a folder
    or hub repository holding one of `CHECKPOINTS` (the hub's xswu/HPSv2 gives the first; pass
    "xswu/HPSv2/HPS_v2.1_compressed.pt" for v2.1).
    """

    name = "hpsv2"
    hub_id = "xswu/HPSv2"
    processor_hub_id = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    CHECKPOINTS = ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt", "HPS_v2.pt")
    SCALE = 100.0
    VIT_H_14 = {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"}  # open_clip's ViT-H-14.json

    @classmethod
    def settings(cls, model: CLIPModel) -> dict:
        return {"scale": cls.SCALE}

    @classmethod
    def load_model(cls, path: str | os.PathLike, dtype: torch.dtype) -> CLIPModel:
        local = Path(path).expanduser()
        if local.is_dir() and (local / "config.json").is_file():
            return load_clip(local, CLIPModel, dtype)
        file = resolve_file(path, cls.CHECKPOINTS, "HPSv2 open_clip checkpoint")
        state = load_state_dict(file)
        # ViT-H-14's image tower (1280 wide) has 16 heads of 80; open_clip's default head width is 64
        heads = cls.VIT_H_14 if state.get("visual.conv1.weight", torch.empty(0)).shape[:1] == (1280,) else {}
        try:
            return clip_from_open_clip(state, dtype=dtype, **heads)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e


class AestheticPredictor(nn.Module):
    """LAION's improved aesthetic predictor: RewardMLP(L2-normalized CLIP image embedding)."""

    def __init__(self, vision: CLIPVisionModelWithProjection, head: RewardMLP) -> None:
        super().__init__()
        dim = vision.config.projection_dim
        if head.in_features != dim:
            raise ValueError(f"the aesthetic head takes {head.in_features}-d embeddings, the CLIP model gives {dim}")
        self.vision = vision
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.vision(pixel_values=pixel_values).image_embeds, dim=-1)
        return self.head(emb.to(self.head.layers[0].weight.dtype))


class AestheticReward(PretrainedReward):
    """LAION aesthetic score (1 to 10, about 5 to 6.5 for typical photos) of CLIP ViT-L/14.

    Prompt-independent: `score_prompts` gives every prompt of an image the same score, so TextNorm
    over it is the constant 1/K (K prompts per image): use it raw, or in an Ensemble.
    `path`: the CLIP model (a folder or hub id); `head`: the MLP's .pth or .safetensors file, a
    folder or a hub repository holding one of `HEAD_FILES` (default: `path` when it is a folder
    that holds one, else `head_hub_id`).
    """

    name = "aesthetic"
    hub_id = "openai/clip-vit-large-patch14"
    head_hub_id = "camenduru/improved-aesthetic-predictor"
    HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors")

    def __init__(self, model: AestheticPredictor, transform: ImageTransform) -> None:
        if not isinstance(model, AestheticPredictor):
            raise ValueError(f"model must be an AestheticPredictor, got {type(model).__name__}")
        super().__init__(model, None, transform, cache_size=0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, head: str | os.PathLike | None = None):
        path = path or cls.hub_id
        dtype = parse_dtype(dtype)
        vision = load_clip(path, CLIPVisionModelWithProjection, dtype)
        folder = local_dir(path)
        if head is None:
            head = folder if folder is not None and any((folder / f).is_file() for f in cls.HEAD_FILES) \
                else cls.head_hub_id
        file = resolve_file(head, cls.HEAD_FILES, "aesthetic MLP")
        state = load_state_dict(file)
        if "layers.0.weight" not in state:
            raise ValueError(f"{file} is not an aesthetic MLP state dict (no layers.0.weight): {sorted(state)[:5]}")
        mlp = RewardMLP(state["layers.0.weight"].shape[1])
        try:
            mlp.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{file} does not fit the aesthetic MLP: {e}") from e
        transform = processor_transform(path, CLIPImageProcessorPil, vision.config.image_size)
        return cls(AestheticPredictor(vision, mlp.to(dtype)), transform).to(device)

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Aesthetic scores [B], differentiable in the images."""
        return self.model(self.preprocess(images))

    def score(self, images: torch.Tensor, prompts: list[str], k: int) -> torch.Tensor:
        return self.image_scores(images).unsqueeze(1).expand(-1, k)
