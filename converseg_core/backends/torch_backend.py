"""PyTorch backend: runs a ConverSeg module in inference mode on whatever device its weights are on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..modeling.converseg import ConverSeg
from ..modeling.converseg import FrameContext as TorchFrameContext
from ..modeling.converseg import ImageFeatures as TorchImageFeatures
from .base import FrameContext, ImageFeatures, check_features, check_frame, check_text


class TorchBackend:
    name = "torch"
    tokenizer_path: Path | None = None

    def __init__(self, model: ConverSeg) -> None:
        self.model = model.eval()
        self.config = model.config

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu") -> TorchBackend:
        from ..build import build_model

        return cls(build_model(checkpoint=path, map_location=device).to(device))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.model.device)

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        return ImageFeatures(*(t.float().cpu().numpy() for t in self.model.encode_image(self._tensor(image))))

    @torch.inference_mode()
    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.model.encode_text(self._tensor(input_ids), self._tensor(attention_mask))
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def image_context(self, features: ImageFeatures) -> FrameContext:
        features = check_features(features, self.config)
        context = self.model.image_context(TorchImageFeatures(*(self._tensor(a) for a in features)))
        return FrameContext(*(t.float().cpu().numpy() for t in context))

    def prepare_frame(self, image: np.ndarray) -> FrameContext:
        return self.image_context(self.encode_image(image))

    @torch.inference_mode()
    def decode(
        self, frame: FrameContext, text_features: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frame = check_frame(frame)
        check_text(text_features, attention_mask)
        out = self.model.decode_context(
            TorchFrameContext(*(self._tensor(a) for a in frame)),
            self._tensor(text_features),
            self._tensor(attention_mask),
        )
        return (
            out.low_res_logits.float().cpu().numpy(),
            out.iou_scores.float().cpu().numpy(),
            out.presence_logits.float().cpu().numpy(),
        )
