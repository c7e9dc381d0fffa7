"""Every training loss: mask BCE + Dice on positives, presence BCE on every sample, SAM's IoU-head MSE, the dense
language-grounding loss, and the Huber loss of encoder distillation. `training_loss` is what training.train
minimizes: their weighted sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Per-sample soft Dice loss. logits, target: N x 1 x H x W -> N."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


@dataclass
class LossOutput:
    total: Tensor
    mask_bce: Tensor
    mask_dice: Tensor
    presence_bce: Tensor
    num_positive: int


def converseg_loss(
    mask_logits: Tensor,
    mask_target: Tensor,
    presence_logits: Tensor,
    presence_target: Tensor,
    *,
    dice_weight: float = 0.25,
    presence_weight: float = 1.0,
) -> LossOutput:
    """mask_logits, mask_target: N x 1 x L x L (soft targets in 0..1 allowed); presence_*: N.

    Mask terms use positives only: a negative's "correct mask" is decided by the presence head, and an
    all-zero mask target would teach the decoder to shrink every mask. Terms are means over positives (0 if
    a batch has none, keeping the graph so DDP sees every parameter used).
    """
    mask_logits = mask_logits.float()
    presence_logits = presence_logits.float()
    pos = presence_target > 0.5
    n_pos = int(pos.sum())
    if n_pos:
        bce = F.binary_cross_entropy_with_logits(mask_logits[pos], mask_target[pos], reduction="none")
        bce = bce.flatten(1).mean(1).mean()
        dice = dice_loss(mask_logits[pos], mask_target[pos]).mean()
    else:
        bce = dice = mask_logits.sum() * 0.0
    pres = F.binary_cross_entropy_with_logits(presence_logits, presence_target.float())
    total = bce + dice_weight * dice + presence_weight * pres
    return LossOutput(total, bce.detach(), dice.detach(), pres.detach(), n_pos)


def iou_head_loss(iou_pred: Tensor, mask_logits: Tensor, mask_target: Tensor, positive: Tensor) -> Tensor:
    """SAM's IoU-head loss: MSE between the head's predicted IoU (N x 1) and the IoU the mask logits (N x 1 x L
    x L, thresholded at 0) reach against the target (> 0.5), on the positive requests only (`positive`: N
    bool). It makes the Segmenter's score meaningful. 0, graph kept, when no request is positive."""
    if not bool(positive.any()):
        return iou_pred.float().sum() * 0.0
    with torch.no_grad():
        pm = mask_logits[positive].float() > 0
        tm = mask_target[positive] > 0.5
        inter = (pm & tm).flatten(1).sum(1).float()
        union = (pm | tm).flatten(1).sum(1).float().clamp(min=1)
    return F.mse_loss(iou_pred[positive][:, 0].float(), inter / union)


@dataclass
class TrainingLoss:
    """The loss to backpropagate and its detached terms (dense is None without a dense grounding head)."""

    total: Tensor
    mask_bce: Tensor
    mask_dice: Tensor
    presence_bce: Tensor
    iou: Tensor
    dense: Tensor | None


def training_loss(
    mask_logits: Tensor,
    iou_pred: Tensor,
    presence_logits: Tensor,
    dense: Tensor | None,
    mask_target: Tensor,
    presence_target: Tensor,
    *,
    dice_weight: float,
    presence_weight: float,
    iou_weight: float,
    dense_weight: float,
) -> TrainingLoss:
    """converseg_loss + iou_weight * iou_head_loss + dense_weight * dense (an already computed
    dense_grounding_loss, or None). The IoU term is skipped (0) when its weight is 0."""
    out = converseg_loss(
        mask_logits,
        mask_target,
        presence_logits,
        presence_target,
        dice_weight=dice_weight,
        presence_weight=presence_weight,
    )
    if iou_weight > 0 and out.num_positive:
        iou = iou_head_loss(iou_pred, mask_logits, mask_target, presence_target > 0.5)
    else:
        iou = iou_pred.float().sum() * 0.0
    total = out.total + iou_weight * iou
    if dense is not None:
        total = total + dense_weight * dense
    return TrainingLoss(
        total,
        out.mask_bce,
        out.mask_dice,
        out.presence_bce,
        iou.detach(),
        None if dense is None else dense.detach(),
    )


def distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber loss between embeddings (NanoSAM's choice: robust to the teacher's few large activations)."""
    return F.huber_loss(student.float(), teacher.float())


class DenseGroundingHead(nn.Module):
    """Training-only probe for dense_grounding_loss: a 1x1 projection of the image embedding (B x C x h x w)
    into MiniLM's space (B x D x h x w). It is not part of the model: the loss shapes the embedding that the
    decoder reads, and the probe is kept only in training checkpoints (to resume)."""

    def __init__(self, embed_dim: int = 256, text_dim: int = 384) -> None:
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, text_dim, kernel_size=1)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.proj(embedding)


def dense_grounding_loss(
    pixel_embed: Tensor,
    text_embed: Tensor,
    target: Tensor,
    image_index: Tensor,
    *,
    scale: float = 10.0,
    bias: float = -5.0,
) -> Tensor:
    """Dense language grounding (after LSeg, with SigLIP's pairwise sigmoid in place of a softmax over
    classes, since one pixel can answer several requests: "the red mug" and "something to drink from").

    pixel_embed: B x D x h x w, per-pixel embeddings of the B images in the text's space; text_embed: Q x D,
    each request's sentence embedding; target: Q x 1 x h x w in [0, 1], the share of each cell the request's
    answer covers (all zero for a request whose target is absent); image_index: Q, the image each request is
    about. Every (pixel, request) pair is a binary decision: cosine similarity times `scale` plus `bias` is
    the logit that the pixel answers the request. The mean BCE over pairs pulls the pixels of an answer
    towards its request's embedding and every other pixel away from it, absent targets included."""
    pixels = F.normalize(pixel_embed, dim=1)[image_index]  # Q x D x h x w
    text = F.normalize(text_embed, dim=1)
    logits = (pixels * text[:, :, None, None]).sum(1) * scale + bias  # Q x h x w
    return F.binary_cross_entropy_with_logits(logits, target[:, 0].to(logits.dtype))
