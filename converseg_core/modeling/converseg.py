"""The ConverSeg composite: wires the blocks it is given, adds no logic of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..artifacts import FrameContext, ImageFeatures
from ..config import ConverSegConfig
from .concepts import concept_prior
from .fusion import FusionImageContext, TextImageFusion
from .mask_decoder import MaskDecoder
from .presence import MaskPresenceHead
from .prompt_encoder import PromptEncoder
from .refine import prototype_refinement


@dataclass
class DecoderOutput:
    """low_res_logits: Q x 1 x 4h x 4w mask logits on the padded network input (h = img_size / 16);
    iou_scores: Q x 1 predicted mask quality; presence_logits: Q, > 0 means "the target is in the picture"."""

    low_res_logits: Tensor
    iou_scores: Tensor
    presence_logits: Tensor


def without_detail(embedding: Tensor, concept_dim: int) -> ImageFeatures:
    """The ImageFeatures of an encoder without a detail path or concepts: its embedding, all-zero detail
    features and one all-zero concept place."""
    b, c, h, w = embedding.shape
    return ImageFeatures(
        embedding, embedding.new_zeros(b, c // 8, 4 * h, 4 * w), embedding.new_zeros(b, concept_dim, 1, 1)
    )


def hires_tokens(hires: Tensor) -> Tensor:
    """B x c x 4h x 4w image-order features -> B x 16hw x c in the decoder's upscaled-token order: pixel
    (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2) at token ((((i w + j) 2 + dy1) 2 + dx1) 2 + dy2) 2 + dx2."""
    b, c, hh, ww = hires.shape
    h, w = hh // 4, ww // 4
    x = hires.reshape(b, c, h, 2, 2, w, 2, 2)  # b, c, i, dy1, dy2, j, dx1, dx2
    return x.permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(b, 16 * h * w, c)


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
        mask_presence: MaskPresenceHead | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # Attribute names match the official SAM checkpoints (image_encoder.*, prompt_encoder.*, mask_decoder.*).
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Optional (config.mask_presence): refines the fusion's presence logit with the mask's evidence.
        self.mask_presence = mask_presence

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def encode_image(self, images: Tensor) -> ImageFeatures:
        """images: B x 3 x S x S, normalized and padded -> ImageFeatures (B x 256 x S/16 x S/16 embedding,
        B x 32 x S/4 x S/4 detail features, B x 384 x g x g concepts)."""
        out = self.image_encoder(images)
        return ImageFeatures(*out) if isinstance(out, tuple) else without_detail(out, self.config.text_hidden_dim)

    @property
    def concepts(self) -> nn.Module | None:
        """The image encoder's ImageNet concept map (modeling/concepts.py), None for encoders without one."""
        return getattr(self.image_encoder, "concepts", None)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: Q x T int64 -> Q x T x 384 token features."""
        return self.text_encoder(input_ids, attention_mask)

    def pe_tokens(self) -> Tensor:
        """SAM's dense positional encoding as 1 x hw x C tokens (a constant of the model)."""
        return self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)

    def image_context(self, features: ImageFeatures | Tensor) -> FrameContext:
        """The per-frame part of decoding (features from encode_image, B frames; a bare B x C x h x w
        embedding is taken as an encoder's without a detail path)."""
        if isinstance(features, Tensor):
            features = without_detail(features, self.config.text_hidden_dim)
        embedding, hires, concepts = features
        tokens = embedding.flatten(2).transpose(1, 2)
        fusion = self.fusion.image_context(tokens, self.pe_tokens())
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1)
        return FrameContext(
            tokens + no_mask, *fusion, hires_tokens(hires), concepts.flatten(2).transpose(1, 2)
        )

    def decode(
        self,
        features: ImageFeatures | Tensor,
        text_features: Tensor,
        attention_mask: Tensor,
        multimask_output: bool = False,
        image_index: Tensor | None = None,
    ) -> DecoderOutput:
        """features: batch 1 (shared by every query), batch Q (one frame per query), or batch B with
        image_index (Q: which frame each query asks about), as in batched training; see image_context. The
        per-frame part runs once per frame, not once per query."""
        context = self.image_context(features)
        if image_index is not None:
            context = context.select(image_index)
        return self.decode_context(context, text_features, attention_mask, multimask_output)

    def decode_context(
        self,
        context: FrameContext,
        text_features: Tensor,
        attention_mask: Tensor,
        multimask_output: bool = False,
    ) -> DecoderOutput:
        """The per-request part: context from image_context(); text_features: Q x T x 384; attention_mask:
        Q x T (1 = token, 0 = padding)."""
        fused = self.fusion.forward_context(
            FusionImageContext(context.fusion_keys, context.fusion_values, context.dense_queries),
            text_features,
            attention_mask,
        )
        # SAM's dense prompt is no_mask_embed + the request's bias; no_mask_embed is in image_tokens already.
        masks, iou, tokens = self.mask_decoder.decode_tokens(
            context.image_tokens + fused.dense_bias,
            self.pe_tokens(),
            fused.sparse,
            self.prompt_encoder.image_embedding_size,
            multimask_output=multimask_output,
            hires_tokens=context.hires_tokens,
        )
        presence_logits = fused.presence_logits
        if self.mask_presence is not None:
            # With several masks the first one's evidence is read (the single-mask output of inference).
            presence_logits = self.mask_presence(presence_logits, masks[:, :1], iou[:, :1], *tokens)
        # After presence: the presence head reads the decoder's own mask; the prior moves where it lies. It
        # is computed for every model (all zeros from the one zero place of a model without concepts), so
        # every exported decoder has the same inputs.
        prior = concept_prior(context.concept_tokens, text_features, attention_mask, masks.shape[-1])
        scale = self.concepts.prior_scale if self.concepts is not None else prior.new_zeros(())
        masks = masks + scale * prior
        if self.config.mask_refinement:
            # A setting of the model file, so an exported decoder holds this branch or not.
            masks = masks + self.config.mask_refinement * prototype_refinement(
                context.image_tokens, masks, self.config.embed_size, self.config.low_res_size
            )
        return DecoderOutput(low_res_logits=masks, iou_scores=iou, presence_logits=presence_logits)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> DecoderOutput:
        """Training path: one query per image (B images, B queries)."""
        embeddings = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        return self.decode(embeddings, text, attention_mask)
