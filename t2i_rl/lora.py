"""Where the LoRA adapter goes: its default layers and the check of a chosen list, apart from the
policy so that the training command validates them without importing diffusers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# every attention projection, self- and cross-attention: the adapter of the DDPO and DPOK papers
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# the layer types PEFT's LoRA can wrap; a target that names anything else (a block, a norm, a list
# of layers) makes PEFT refuse the whole adapter
ADAPTABLE = ("Linear", "Conv1d", "Conv2d", "Embedding")


def check_lora_targets(layers: Mapping[str, str], targets: Sequence[str], key: str = "lora_target_modules") -> None:
    """One ValueError naming a target that matches no layer, or that matches a module LoRA cannot
    wrap (PEFT's rule: a target matches a module whose dotted path is it or ends in "." + it), before
    an adapter is half made. `layers` maps each module's path to its class name."""
    def matches(target: str) -> list[str]:
        return [n for n in layers if n == target or n.endswith("." + target)]

    for target in targets:
        found = matches(target)
        if not found:
            raise ValueError(f"{key} = {list(targets)} is invalid: {target!r} matches no layer of the UNet; a name "
                             "matches the layers whose path ends in it, for example to_k (every attention's key "
                             "projection), attn2.to_k (cross-attention only) or conv1 (the ResNet blocks)")
        blocks = sorted({layers[n] for n in found if layers[n] not in ADAPTABLE})
        if blocks:
            raise ValueError(f"{key} = {list(targets)} is invalid: {target!r} names {', '.join(blocks)} modules, "
                             "which LoRA cannot wrap; name the Linear, Conv1d, Conv2d or Embedding layers inside "
                             "them, for example attn2.to_k")
