"""Lee et al. 2023 ("Aligning Text-to-Image Models using Human Feedback"): a reward model from
binary feedback.

An MLP on frozen CLIP embeddings predicts whether an image is right for its prompt. Loss:
MSE to the binary label + lambda x the cross-entropy of picking the true prompt among itself and
N-1 perturbed prompts, with a softmax of r / T (T = 2, lambda = 0.5 in the paper). As in the paper
the prompt-classification term is taken on the images labelled good (for a bad image the true
prompt need not be the best description); `train_lee` can take it on all images instead.
Here the labels are ShapesWorld's judge on base-model samples and the perturbations are
`ShapesWorld.contrastive` prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import positive_float
from .clip_style import ShapesCLIP
from .head import CLIPHeadReward, FeatureHead


def lee_loss(
    set_scores: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    classify: torch.Tensor | None = None,
    temperature: float = 2.0,
    lam: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Lee et al.'s loss.

    Args:
        set_scores: [B, N] rewards of each image against its true prompt (column 0) and N-1
            perturbed prompts.
        labels: [B] binary labels (1: the image is right for its true prompt).
        mask: [B, N] True where a prompt is real (rows may have fewer perturbations).
        classify: [B] bool, the rows that enter the prompt-classification term (default: all).
    Returns {"loss", "mse", "ce"} (ce is 0 when no row is classified).
    """
    mse = F.mse_loss(set_scores[:, 0], labels.to(set_scores.dtype))
    logits = set_scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    ce_rows = -torch.log_softmax(logits, dim=1)[:, 0]
    if classify is not None:
        ce_rows = ce_rows[classify.to(ce_rows.device)]
    ce = ce_rows.mean() if ce_rows.numel() else set_scores.new_zeros(())
    return {"loss": mse + lam * ce, "mse": mse, "ce": ce}


class LeeReward(CLIPHeadReward):
    """r(x, y) ~ P(image x is right for prompt y), an MLP head on frozen ShapesCLIP embeddings.

    `temperature` and `lam` are the training constants (kept with the model); `default_tau`
    is the temperature, the one its prompt-classification softmax was trained with.
    """

    name = "lee"
    kind = "lee"

    def __init__(self, clip: ShapesCLIP, head: FeatureHead, temperature: float = 2.0, lam: float = 0.5) -> None:
        temperature = positive_float(temperature, "temperature")
        lam = positive_float(lam, "lam", allow_zero=True)
        super().__init__(clip, head, temperature=temperature, lam=lam)

    @property
    def temperature(self) -> float:
        return self.settings["temperature"]

    @property
    def lam(self) -> float:
        return self.settings["lam"]

    @property
    def default_tau(self) -> float:
        return self.temperature

    def loss(self, set_scores, labels, mask=None, classify=None) -> dict[str, torch.Tensor]:
        return lee_loss(set_scores, labels, mask, classify, self.temperature, self.lam)
