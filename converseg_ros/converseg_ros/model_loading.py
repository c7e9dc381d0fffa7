"""Turn the node's settings into a Segmenter, and a load failure into a message a user can act on."""

from __future__ import annotations

import math
from typing import Any

from .params import SegmentSettings


def load_segmenter(settings: SegmentSettings) -> Any:
    """Build the converseg_core.Segmenter the settings describe; raises whatever the core raises."""
    from converseg_core import Segmenter, default_checkpoint

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


def describe_load_failure(exc: BaseException, settings: SegmentSettings) -> str:
    """One line: what failed and what to do about it."""
    name = type(exc).__name__
    text = f"{name}: {exc}"
    lowered = text.lower()
    if name == "EngineMismatchError" or (
        settings.backend == "tensorrt" and any(w in lowered for w in ("engine", "deserializ", "gpu"))
    ):
        hint = (
            "TensorRT engines only run on the GPU and TensorRT version they were built with: rebuild them on "
            "this device with `python export/build_trt.py` (the Docker entrypoint does it on first start)"
        )
    elif name == "CheckpointError":
        hint = (
            "set model_path:=<checkpoint or exported folder>, or train the default model (docs/TRAINING.md)"
        )
    elif name == "BackendUnavailableError":
        hint = f"install the runtime for backend:={settings.backend}, or pick another backend"
    elif isinstance(exc, FileNotFoundError):
        hint = "check model_path"
    else:
        hint = "check model_path and backend (docs/ROS.md)"
    return f"model failed to load ({text}); {hint}"
