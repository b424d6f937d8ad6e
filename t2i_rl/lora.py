"""Where the LoRA adapter goes: its default layers and the check of a chosen list, apart from the
policy so that the training command validates them without importing diffusers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# every attention projection, self- and cross-attention: the adapter of the DDPO and DPOK papers
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# an MMDiT's (SD 3/3.5) joint attention: the image stream's projections and the text stream's (add_*),
# the layers diffusers' SD3 LoRA recipe (train_dreambooth_lora_sd3.py) and Flow-GRPO adapt; the
# flow policy keeps those the transformer has (the last block of SD 3 has no to_add_out)
FLOW_LORA_TARGETS = (*LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# the layer types PEFT's LoRA can wrap; a target that names anything else (a block, a norm, a list
# of layers) makes PEFT refuse the whole adapter
ADAPTABLE = ("Linear", "Conv1d", "Conv2d", "Embedding")


def check_lora_targets(layers: Mapping[str, str], targets: Sequence[str], key: str = "lora_target_modules",
                       model: str = "UNet") -> None:
    """One ValueError naming a target that matches no layer, or that matches a module LoRA cannot
    wrap (PEFT's rule: a target matches a module whose dotted path is it or ends in "." + it), before
    an adapter is half made. `layers` maps each module's path to its class name; `model` names the
    network in the message (the UNet, or a flow model's transformer)."""
    def matches(target: str) -> list[str]:
        return [n for n in layers if n == target or n.endswith("." + target)]

    for target in targets:
        found = matches(target)
        if not found:
            raise ValueError(f"{key} = {list(targets)} is invalid: {target!r} matches no layer of the {model}; a name "
                             "matches the layers whose path ends in it, for example to_k (every attention's key "
                             "projection), attn2.to_k (cross-attention only) or conv1 (the ResNet blocks)")
        blocks = sorted({layers[n] for n in found if layers[n] not in ADAPTABLE})
        if blocks:
            raise ValueError(f"{key} = {list(targets)} is invalid: {target!r} names {', '.join(blocks)} modules, "
                             "which LoRA cannot wrap; name the Linear, Conv1d, Conv2d or Embedding layers inside "
                             "them, for example attn2.to_k")
