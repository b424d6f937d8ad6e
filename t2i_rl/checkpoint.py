"""Checkpoints of a run: weights in safetensors, written atomically.

A checkpoint folder holds either `pytorch_lora_weights.safetensors` (LoRA, in the diffusers
format that `StableDiffusionPipeline.load_lora_weights` reads) or `unet/` (full fine-tuning,
`save_pretrained`), and `trainer_state.pt` (optimizer, random states, epoch, statistics) so that a
resumed run continues exactly. It is written into a temporary sibling folder and renamed into
place, so a crash leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "trainer_state.pt"


def save_checkpoint(path: str | Path, policy, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        if policy.lora_rank is not None:
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy.unet))
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        else:
            policy.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        torch.save(state, tmp / STATE_FILE)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: str | Path, policy) -> dict[str, Any]:
    """Load the weights into the policy's UNet; return the trainer state."""
    path = Path(path)
    if policy.lora_rank is not None:
        if not (path / LORA_FILE).exists():
            raise FileNotFoundError(f"{path} holds no {LORA_FILE}; was the run trained with full fine-tuning?")
        raw = load_file(path / LORA_FILE)
        unet_sd = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(policy.unet, convert_unet_state_dict_to_peft(unet_sd), "default")
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"checkpoint {path} does not match the policy's LoRA layers: {missing[:3]}")
    else:
        from diffusers import UNet2DConditionModel

        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path} holds no unet/; was the run trained with LoRA?")
        loaded = UNet2DConditionModel.from_pretrained(path / "unet")
        policy.unet.load_state_dict(loaded.state_dict())
    return torch.load(path / STATE_FILE, weights_only=False)
