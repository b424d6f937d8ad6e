"""BLIP-2 image-text matching (Li et al. 2023) as a reward, on transformers' Blip2ForImageTextRetrieval.

Two scores, the two heads BLIP-2's Q-Former was trained with (the same maths as the model's
`forward` with `use_image_text_matching_head` True or False):

- "itm" (default): the probability that the text matches the image, softmax of the ITM head's
  logits averaged over the query tokens, which attend to the text and cross-attend to the image;
  in [0, 1]. TextNorm over probabilities needs a small tau (about 0.05 to 0.1).
- "itc": the contrastive cosine, the largest over the query tokens of cos(projected query
  output, projected text [CLS]); in [-1, 1]. Text features are cached by prompt.

The image is encoded once per image whatever the number of prompts. Preprocessing is the
checkpoint's BlipImageProcessor (a bicubic resize to a square, no crop, OpenAI CLIP's mean and
std), text is truncated to 32 tokens as in LAVIS.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessorPil

from .common import ImageTransform, PretrainedReward, load, local_dir, parse_dtype, processor_transform

BLIP2_MODES = ("itm", "itc")
MAX_LENGTH = 32


class BLIP2Reward(PretrainedReward):
    """BLIP-2's image-text matching probability ("itm") or contrastive cosine ("itc")."""

    name = "blip2"
    hub_id = "Salesforce/blip2-itm-vit-g"

    def __init__(self, model: Blip2ForImageTextRetrieval, tokenizer, transform: ImageTransform,
                 mode: str = "itm", cache_size: int = 65536) -> None:
        if not isinstance(model, Blip2ForImageTextRetrieval):
            raise ValueError(f"model must be a transformers Blip2ForImageTextRetrieval, got {type(model).__name__}")
        if mode not in BLIP2_MODES:
            raise ValueError(f"unknown BLIP-2 mode {mode!r}; allowed: {', '.join(BLIP2_MODES)}")
        if not model.config.qformer_config.use_qformer_text_input:
            raise ValueError("this BLIP-2 checkpoint's Q-Former has no text layers (use_qformer_text_input is "
                             "false); use an image-text retrieval checkpoint such as Salesforce/blip2-itm-vit-g")
        super().__init__(model, tokenizer, transform, cache_size)
        self.mode = mode

    @property
    def dtype(self) -> torch.dtype:
        """The image encoder's dtype (the Q-Former stays in float32, as transformers keeps it)."""
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, mode: str = "itm"):
        path = path or cls.hub_id
        dtype = parse_dtype(dtype)
        if mode not in BLIP2_MODES:  # before loading gigabytes
            raise ValueError(f"unknown BLIP-2 mode {mode!r}; allowed: {', '.join(BLIP2_MODES)}")
        folder = local_dir(path)
        if folder is not None and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no BLIP-2 model in {str(path)!r} (config.json is missing)")
        model = load("BLIP-2 model", path, Blip2ForImageTextRetrieval.from_pretrained, dtype=dtype)
        tokenizer = load("tokenizer", path, AutoTokenizer.from_pretrained)
        size = model.config.vision_config.image_size
        transform = processor_transform(path, BlipImageProcessorPil, size, crop=False)
        return cls(model, tokenizer, transform, mode).to(device)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's output tokens [B, P, D] that the Q-Former cross-attends to."""
        return self.model.vision_model(pixel_values=self.preprocess(images)).last_hidden_state

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts, MAX_LENGTH)
        out = self.model.qformer(query_embeds=self.model.embeddings(input_ids=ids), query_length=0,
                                 attention_mask=mask).last_hidden_state
        return F.normalize(self.model.text_projection(out[:, 0].to(self.model.text_projection.weight.dtype)), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str], k: int) -> torch.Tensor:
        m = self.model
        tokens = self.image_tokens(images)
        b, n_query = tokens.shape[0], m.query_tokens.shape[1]
        if self.mode == "itc":
            queries = m.qformer(query_embeds=m.query_tokens.expand(b, -1, -1), encoder_hidden_states=tokens,
                                encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long,
                                                                  device=tokens.device)).last_hidden_state
            img = F.normalize(m.vision_projection(queries.to(m.vision_projection.weight.dtype)), dim=-1)
            txt = self.cached(prompts, self._encode_text).view(b, k, -1).to(img.dtype)
            return torch.einsum("bqe,bke->bqk", img, txt).max(dim=1).values
        tokens = tokens.repeat_interleave(k, dim=0)
        ids, mask = self.tokenize(prompts, MAX_LENGTH)
        query_mask = torch.ones(b * k, n_query, dtype=mask.dtype, device=mask.device)
        hidden = m.qformer(
            query_embeds=m.embeddings(input_ids=ids, query_embeds=m.query_tokens.expand(b * k, -1, -1)),
            query_length=n_query, attention_mask=torch.cat([query_mask, mask], dim=1),
            encoder_hidden_states=tokens,
            encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long, device=tokens.device),
        ).last_hidden_state[:, :n_query]
        logits = m.itm_head(hidden.to(m.itm_head.weight.dtype)).mean(dim=1)
        return logits.float().softmax(dim=-1)[:, 1].view(b, k)
