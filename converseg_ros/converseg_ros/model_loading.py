"""Turn the node's settings into a Segmenter, and a load failure into a message a user can act on."""

from __future__ import annotations

import math

from converseg_core import Segmenter, default_checkpoint
from converseg_core.backends.tensorrt_backend import EngineMismatchError
from converseg_core.errors import BackendUnavailableError, CheckpointError

from .params import SegmentSettings

# What model_path must name for each backend, and where such a thing comes from.
MODEL_PATH_HINTS = {
    "torch": "a checkpoint (.pt); empty = the default model (train it: docs/TRAINING.md)",
    "onnxruntime": "a folder written by `python export/export_onnx.py`",
    "tensorrt": "a folder of engines built on this device by `python export/build_trt.py` (the Docker "
    "entrypoint builds them on first start)",
}


def load_segmenter(settings: SegmentSettings) -> Segmenter:
    """Build the Segmenter the settings describe; raises whatever the core raises."""
    p = settings.mask_probability
    kwargs = dict(
        # negative: the checkpoint's own mask logit threshold; else the logit of the probability
        mask_threshold=math.log(p / (1.0 - p)) if p >= 0 else None,
        # negative: keep the threshold training.calibrate stored in the checkpoint
        presence_threshold=settings.presence_threshold if settings.presence_threshold >= 0 else None,
        max_input_side=settings.max_input_side,
    )
    if settings.random_model:
        from converseg_core import build_model

        overrides = {"img_size": settings.random_model_img_size} if settings.random_model_img_size else {}
        return Segmenter(build_model(settings.random_model, **overrides).eval(), **kwargs)
    path = settings.model_path or default_checkpoint()
    return Segmenter.from_checkpoint(path, backend=settings.backend, **kwargs)


def load_failure_hint(exc: BaseException, settings: SegmentSettings) -> str:
    """What to do about ``exc``, chosen by its type (the core's errors name the problem itself)."""
    if isinstance(exc, EngineMismatchError):  # a CheckpointError: checked first
        return (
            "TensorRT engines only run on the GPU and TensorRT version they were built with: rebuild them on "
            "this device with `python export/build_trt.py` (the Docker entrypoint does it on first start)"
        )
    if isinstance(exc, BackendUnavailableError):
        return f"install the runtime for backend:={settings.backend}, or pick another backend"
    if isinstance(exc, CheckpointError):
        return f"set model_path:= to {MODEL_PATH_HINTS[settings.backend]}"
    if isinstance(exc, KeyError) and settings.random_model:  # converseg_core.registry: unknown variant
        return "set random_model:= to a registered variant (`converseg models` lists them)"
    if isinstance(exc, OSError):
        return "check model_path and that this user can read it"
    return "check model_path and backend (docs/ROS.md)"


def describe_load_failure(exc: BaseException, settings: SegmentSettings) -> str:
    """One line: what failed and what to do about it."""
    return f"model failed to load ({type(exc).__name__}: {exc}); {load_failure_hint(exc, settings)}"
