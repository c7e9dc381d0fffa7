"""One training step's model computation: what DistributedDataParallel wraps (TrainStep), the request-word
dropout applied to its text, and the stand-in batch that keeps every process's calls in step."""

from __future__ import annotations

import torch
from torch import nn

from converseg_core.modeling.converseg import ImageFeatures
from converseg_core.modeling.text_encoder import sentence_embedding

from .losses import DenseGroundingHead, dense_grounding_loss
from .text_cache import TextFeatureCache


def finish_text(model: nn.Module, text: torch.Tensor, am: torch.Tensor, start: int | None) -> torch.Tensor:
    """Cached text features -> MiniLM's final features (runs the trained layers when start is not None)."""
    return text if start is None else model.text_encoder.run_layers(text, am, start)


class TrainStep(nn.Module):
    """What DDP wraps: image encoding + decoding for one query per image (text features come cached; the
    MiniLM layers a run trains, if any, run here on them)."""

    def __init__(
        self,
        model: nn.Module,
        train_image_encoder: bool,
        text_start: int | None = None,
        dense_head: DenseGroundingHead | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_image_encoder = train_image_encoder
        self.text_start = text_start
        self.dense_head = dense_head

    def forward(
        self,
        images: torch.Tensor | list[torch.Tensor],
        image_index: torch.Tensor,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        dense_target: torch.Tensor | None = None,
    ):
        """images: B x 3 x S x S, or a frozen trunk's cached features (training.trunk_cache); image_index: Q
        (which image each query asks about); text: Q x T x 384; dense_target: Q x 1 x h x w answer coverage
        of each embedding cell (with a dense head). Returns mask logits, IoU predictions, presence logits and
        the dense grounding loss (None without a dense head)."""
        if isinstance(images, list):  # cached trunk features: only the neck and detail path run
            def encode(feats: list[torch.Tensor]) -> ImageFeatures:
                return ImageFeatures(*self.model.image_encoder.heads(feats))
        else:
            encode = self.model.encode_image
        if self.train_image_encoder:
            emb = encode(images)
        else:
            with torch.no_grad():
                emb = encode(images)
        text = finish_text(self.model, text, attention_mask, self.text_start)
        out = self.model.decode(emb, text, attention_mask, image_index=image_index)
        dense = None
        if self.dense_head is not None and dense_target is not None:
            sentences = sentence_embedding(text, attention_mask).detach()
            dense = dense_grounding_loss(self.dense_head(emb.embedding), sentences, dense_target, image_index)
        return out.low_res_logits, out.iou_scores, out.presence_logits, dense


def drop_tokens(attention_mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """attention_mask: Q x T (1 = token, right-padded) -> a copy with each word token hidden with probability
    p. The first token ([CLS]) and the last real one ([SEP]) are kept, and so is at least one word per row:
    a row that would lose every word keeps its original mask."""
    if p <= 0:
        return attention_mask
    am = attention_mask.clone()
    lengths = attention_mask.sum(1)
    positions = torch.arange(am.shape[1], device=am.device).unsqueeze(0)
    words = (attention_mask > 0) & (positions > 0) & (positions < (lengths - 1).unsqueeze(1))
    hide = words & (torch.rand(am.shape, generator=generator).to(am.device) < p)
    keeps_a_word = (words & ~hide).any(1, keepdim=True)
    am[hide & keeps_a_word] = 0
    return am


def blank_batch(config, cache: TextFeatureCache) -> dict:
    """One black image with one cached request and a negative target: a zero-weight stand-in batch."""
    s, low = config.img_size, config.low_res_size
    return {
        "image": torch.zeros(1, 3, s, s),
        "mask_low": torch.zeros(1, 1, low, low),
        "presence": torch.zeros(1),
        "prompt": [next(iter(cache.features))],
        "image_index": torch.zeros(1, dtype=torch.long),
    }
