"""Where the LoRA adapter goes: its default layers and the check of a chosen list, apart from the
policy so that the training command validates them without importing diffusers."""

from __future__ import annotations

from collections.abc import Sequence

# every attention projection, self- and cross-attention: the adapter of the DDPO and DPOK papers
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def check_lora_targets(layer_names: Sequence[str], targets: Sequence[str], key: str = "lora_target_modules") -> None:
    """One ValueError naming the targets that match no layer (PEFT's rule: a target matches a layer
    whose dotted path is it or ends in "." + it), before an adapter is half made."""
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layer_names)]
    if unmatched:
        raise ValueError(f"{key} = {list(targets)} is invalid: {', '.join(map(repr, unmatched))} matches no layer of "
                         "the UNet; a name matches the layers whose path ends in it, for example to_k (every "
                         "attention's key projection), attn2.to_k (cross-attention only) or conv1 (the ResNet blocks)")
