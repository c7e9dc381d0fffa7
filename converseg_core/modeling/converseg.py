"""The ConverSeg composite: wires the blocks it is given, adds no logic of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConverSegConfig
from .fusion import TextImageFusion
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


@dataclass
class DecoderOutput:
    """low_res_logits: Q x 1 x 4h x 4w mask logits on the padded network input (h = img_size / 16);
    iou_scores: Q x 1 predicted mask quality; presence_logits: Q, > 0 means "the target is in the picture"."""

    low_res_logits: Tensor
    iou_scores: Tensor
    presence_logits: Tensor


class ConverSeg(nn.Module):
    def __init__(
        self,
        *,
        config: ConverSegConfig,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        fusion: TextImageFusion,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        # Attribute names match the official SAM checkpoints (image_encoder.*, prompt_encoder.*, mask_decoder.*).
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def encode_image(self, images: Tensor) -> Tensor:
        """images: B x 3 x S x S, normalized and padded -> B x 256 x S/16 x S/16."""
        return self.image_encoder(images)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: Q x T int64 -> Q x T x 384 token features."""
        return self.text_encoder(input_ids, attention_mask)

    def decode(
        self,
        image_embeddings: Tensor,
        text_features: Tensor,
        attention_mask: Tensor,
        multimask_output: bool = False,
    ) -> DecoderOutput:
        """image_embeddings: 1 x C x h x w (shared by every query) or Q x C x h x w (one per query)."""
        image_pe = self.prompt_encoder.get_dense_pe()
        sparse, dense_bias, presence_logits = self.fusion(
            image_embeddings, image_pe, text_features, attention_mask
        )
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1) + dense_bias
        masks, iou = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return DecoderOutput(low_res_logits=masks, iou_scores=iou, presence_logits=presence_logits)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> DecoderOutput:
        """Training path: one query per image (B images, B queries)."""
        embeddings = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        return self.decode(embeddings, text, attention_mask)
