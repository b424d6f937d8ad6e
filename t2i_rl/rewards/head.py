"""Reward models that are an MLP head on frozen ShapesCLIP embeddings (Lee et al., ImageReward).

A saved head-reward folder is self-contained: `config.json` (kind, sizes, training constants),
`head.safetensors` (the MLP) and `clip/` (the frozen ShapesCLIP it reads, tokenizer included).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..world.judge import check_images
from ._common import check_prompt_sets
from .base import RawReward
from .clip_style import ShapesCLIP


class FeatureHead(nn.Module):
    """MLP on (image embedding, text embedding, their product) -> a scalar.

    Embeddings are unit vectors, so each block is rescaled to about unit size per coordinate
    (x sqrt(D) for the embeddings, x D for the product) before the MLP.
    """

    def __init__(self, embed_dim: int, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"embed_dim, hidden and layers must be >= 1, got {embed_dim}, {hidden}, {layers}")
        self.embed_dim = embed_dim
        dims = [3 * embed_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            mods += [nn.Linear(a, b), nn.GELU()]
        mods.append(nn.Linear(dims[-1], 1))
        self.mlp = nn.Sequential(*mods)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """img, txt: [..., D] (broadcastable) -> [...]."""
        img, txt = torch.broadcast_tensors(img, txt)
        s = math.sqrt(self.embed_dim)
        feats = torch.cat([img * s, txt * s, img * txt * self.embed_dim], dim=-1)
        return self.mlp(feats).squeeze(-1)


class CLIPHeadReward(RawReward):
    """r(x, y) = head(clip.image_embeds(x), clip.text_embeds(y)). Gradients reach the image;
    the CLIP model and (unless `unfreeze()`d) the head are frozen."""

    differentiable = True
    kind = "head"
    default_tau = 1.0

    def __init__(self, clip: ShapesCLIP, head: FeatureHead, **settings) -> None:
        if not isinstance(clip, ShapesCLIP):
            raise ValueError(f"clip must be a ShapesCLIP, got {type(clip).__name__}")
        if head.embed_dim != clip.embed_dim:
            raise ValueError(f"head expects {head.embed_dim}-d embeddings, the CLIP model gives {clip.embed_dim}")
        self.clip = clip.freeze()
        self.head = head.to(clip.device)
        self.settings = dict(settings)
        self.freeze()

    @classmethod
    def build(cls, clip: ShapesCLIP, hidden: int = 128, layers: int = 2, seed: int = 0, **settings):
        """A randomly initialized head on `clip`."""
        torch.manual_seed(seed)
        return cls(clip, FeatureHead(clip.embed_dim, hidden, layers), **settings)

    def freeze(self) -> "CLIPHeadReward":
        self.head.eval().requires_grad_(False)
        return self

    def unfreeze(self) -> "CLIPHeadReward":
        self.head.train().requires_grad_(True)
        return self

    def to(self, device: str | torch.device) -> "CLIPHeadReward":
        self.clip.to(device)
        self.head.to(device)
        return self

    def score_embeds(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """img [B, D] and txt [B, K, D] -> scores [B, K]."""
        return self.head(img.unsqueeze(1), txt)

    def score_prompts(self, images: torch.Tensor, prompt_sets: list[list[str]]) -> torch.Tensor:
        check_images(images)
        k = check_prompt_sets(images, prompt_sets)
        if k == 0:
            return torch.zeros(0, 0, device=self.clip.device)
        img = self.clip.image_embeds(images)
        txt = self.clip.text_embeds([p for s in prompt_sets for p in s]).view(len(prompt_sets), k, -1)
        return self.score_embeds(img, txt.to(img.dtype))

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(path / "clip")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(path / "head.safetensors"))
        lin = [m for m in self.head.mlp if isinstance(m, nn.Linear)]
        config = {"kind": self.kind, "embed_dim": self.head.embed_dim, "hidden": lin[0].out_features,
                  "layers": len(lin) - 1, "settings": self.settings}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no {cls.kind} reward model at {path} (config.json is missing)")
        config = json.loads((path / "config.json").read_text())
        if config.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a {config.get('kind')!r} reward model, not {cls.kind!r}")
        clip = ShapesCLIP.from_pretrained(path / "clip")
        head = FeatureHead(config["embed_dim"], config["hidden"], config["layers"])
        head.load_state_dict(load_file(str(path / "head.safetensors")))
        return cls(clip, head, **config.get("settings", {})).to(device)
