"""converseg_core: conversational image segmentation (ConverSeg) for robots.

The public surface is re-exported here. Names that need PyTorch are imported lazily, so a torch-free
runtime (ONNX Runtime / TensorRT backends) can `import converseg_core` without pulling torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import ConverSegConfig
from .errors import BackendUnavailableError, CheckpointError, ConverSegError, InputError
from .registry import get_config, list_models, register_model
from .segmenter import SegmentationResult, Segmenter
from .weights import default_checkpoint

_LAZY = {
    "build_model": ".build",
    "build_image_encoder": ".build",
    "save_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "load_official_weights": ".checkpoint",
    "ConverSeg": ".modeling.converseg",
    "DecoderOutput": ".modeling.converseg",
}

if TYPE_CHECKING:
    from .build import build_image_encoder, build_model
    from .checkpoint import load_checkpoint, load_official_weights, save_checkpoint
    from .modeling.converseg import ConverSeg, DecoderOutput


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'converseg_core' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConverSeg",
    "ConverSegConfig",
    "ConverSegError",
    "DecoderOutput",
    "InputError",
    "SegmentationResult",
    "Segmenter",
    "build_image_encoder",
    "build_model",
    "default_checkpoint",
    "get_config",
    "list_models",
    "load_checkpoint",
    "load_official_weights",
    "register_model",
    "save_checkpoint",
]
