"""Convert an open_clip CLIP state dict (HPSv2's ViT-H-14) into a transformers `CLIPModel`.

open_clip itself needs torchvision, which cannot be installed beside this torch, so HPSv2's
weights are read as plain tensors and renamed. The architecture is the same; what differs:

- attention: open_clip's `nn.MultiheadAttention` packs q, k, v into `in_proj_weight` [3W, W] and
  `in_proj_bias` [3W] (in that order); transformers has separate `q_proj`, `k_proj`, `v_proj`;
- projections: open_clip multiplies `x @ proj` with `visual.proj` and `text_projection` [W, E];
  transformers' bias-free `Linear` stores the transpose [E, W];
- embeddings: `visual.class_embedding`, `visual.positional_embedding` and `positional_embedding`
  are bare parameters; `visual.conv1` has no bias, as transformers' patch embedding;
- text pooling: open_clip takes the token with the largest id (the end-of-text token, the last of
  the vocabulary); transformers takes the first `eos_token_id`, so it is set to vocab_size - 1;
- what the state dict cannot say: attention heads (ViT-H-14: 16 and 16, with head width 80 in
  the image tower) and the activation (open_clip's `nn.GELU`, unless a model forces QuickGELU).
"""

from __future__ import annotations

import math
import re

import torch
from accelerate import init_empty_weights
from transformers import CLIPConfig, CLIPModel

from .common import check_weights_fit

_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_DERIVED = {"attn_mask", "visual.attn_mask"}  # causal masks some open_clip versions save: rebuilt, not loaded


def _layers(state: dict[str, torch.Tensor], visual: bool) -> int:
    ids = {int(m.group(2)) for k in state if (m := _BLOCK.fullmatch(k)) and bool(m.group(1)) == visual}
    if ids != set(range(len(ids))) or not ids:
        tower = "image" if visual else "text"
        raise ValueError(f"the {tower} tower's resblocks must be numbered 0..N-1, got {sorted(ids)}")
    return len(ids)


def open_clip_config(
    state: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
) -> CLIPConfig:
    """The CLIPConfig of an open_clip state dict; heads default to width / 64 (open_clip's default
    head width; ViT-H-14's image tower needs vision_heads=16)."""
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict: missing {missing}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError(f"visual.positional_embedding has {state['visual.positional_embedding'].shape[0]} rows, "
                         "not 1 + a square number of patches")
    vocab, text_width = state["token_embedding.weight"].shape
    proj_dim = state["visual.proj"].shape[1]
    if state["text_projection"].shape != (text_width, proj_dim):
        raise ValueError(f"text_projection has shape {tuple(state['text_projection'].shape)}, "
                         f"expected ({text_width}, {proj_dim})")
    vision = dict(
        hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(state, True), num_attention_heads=vision_heads or max(1, width // 64),
        image_size=grid * patch, patch_size=patch, projection_dim=proj_dim, hidden_act=hidden_act,
    )
    text = dict(
        vocab_size=vocab, hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(state, False), num_attention_heads=text_heads or max(1, text_width // 64),
        max_position_embeddings=state["positional_embedding"].shape[0], projection_dim=proj_dim,
        hidden_act=hidden_act, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj_dim)


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip key names and layouts -> transformers CLIPModel ones. Every key is used, except
    saved causal masks (rebuilt by transformers); an unknown key is a ValueError naming it."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _DERIVED:
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := _BLOCK.fullmatch(key)) is not None:
            prefix = f"{'vision_model' if m.group(1) else 'text_model'}.encoder.layers.{m.group(2)}."
            part = m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if part.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[prefix + _BLOCK_PARTS[part]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip keys this converter does not know (layer scale, attention pooling, "
                         f"a timm or HF text tower?): {sorted(unknown)[:10]}")
    return out


def clip_from_open_clip(
    state: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    dtype: torch.dtype = torch.float32,
) -> CLIPModel:
    """A transformers CLIPModel holding an open_clip state dict's weights (strictly: every
    parameter of the model is set, in the shape open_clip had)."""
    config = open_clip_config(state, vision_heads, text_heads, hidden_act)
    weights = convert_open_clip_state_dict(state)
    with init_empty_weights():  # parameters on the meta device: nothing is initialized only to be overwritten
        model = CLIPModel(config)
    check_weights_fit(weights, model, "open_clip weights do not fit the inferred CLIPConfig")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return model.eval()
