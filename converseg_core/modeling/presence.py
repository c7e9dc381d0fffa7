"""Mask-evidence presence head: checks the fusion's "is it in the picture?" against the mask the decoder drew.

The fusion's presence token decides from the request and the raw image embedding alone, before any mask
exists. Many of its errors are visible afterwards: for an absent target the decoder tends to draw a weak,
scattered or low-confidence mask. This head reads that evidence and adds a correction to the fusion's logit:

- what the mask covers: the decoder's image tokens (after its two-way transformer) averaged under the mask's
  probabilities, pooled to the embedding grid;
- how the decoder rates its mask: its IoU token, and three numbers (predicted IoU, the mask's soft area as a
  share of the input, its peak probability).

It does not read the request's words directly (the fusion's logit already does), nor the fusion's presence
token: a head that reads it separates present from absent as well on validation requests but learns to trust
the phrasings seen in training, and loses gIoU on held-out phrasings.

The last layer starts at zero, so a model that gains this head answers exactly as it did without it until
the head is trained (`python -m training.train --train-parts mask_presence`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SCALAR_FEATURES = 3  # predicted IoU, soft area, peak probability


class MaskPresenceHead(nn.Module):
    def __init__(self, *, dim: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        self.norm_region = nn.LayerNorm(dim)
        self.norm_iou = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim + SCALAR_FEATURES, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def region_features(mask_logits: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mask_logits: Q x 1 x 4h x 4w (the decoder's low-res logits); image_tokens: Q x hw x C (row-major
        h x w) -> (the tokens' mean under the mask's probabilities Q x C, soft area Q, peak probability Q)."""
        prob = mask_logits.sigmoid()
        # The low-res mask is 4x the token grid on a side: a 4 x 4 mean gives each token its share.
        weights = F.avg_pool2d(prob, kernel_size=4).flatten(1)  # Q x hw
        region = (weights.unsqueeze(1) @ image_tokens).squeeze(1) / (weights.sum(1, keepdim=True) + 1e-6)
        return region, weights.mean(1), prob.flatten(1).amax(1)

    def forward(
        self,
        presence_logits: Tensor,
        mask_logits: Tensor,
        iou_scores: Tensor,
        iou_token: Tensor,
        image_tokens: Tensor,
    ) -> Tensor:
        """presence_logits: Q (the fusion's); mask_logits: Q x 1 x 4h x 4w; iou_scores: Q x 1; iou_token: Q x C;
        image_tokens: Q x hw x C (the decoder's, after its transformer) -> refined presence logits Q (> 0: the
        target is there)."""
        region, area, peak = self.region_features(mask_logits, image_tokens)
        scalars = torch.stack([iou_scores[:, 0], area, peak], dim=1)
        x = torch.cat([self.norm_region(region), self.norm_iou(iou_token), scalars], dim=1)
        return presence_logits + self.mlp(x).squeeze(-1)
