"""The segment node's parameters and the launch arguments, as plain data (no ROS import).

One table feeds the node's ``declare_parameter`` calls, the ``converseg-ros-launch`` entry point and the
test that checks ``launch/segment.launch.py`` declares the same names with the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BACKENDS = ("torch", "onnxruntime", "tensorrt")
IMAGE_TRANSPORTS = ("raw", "compressed")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any  # its Python type (bool, int, float, str) is the parameter's type
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


SEGMENT_PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "model_path",
        "",
        "checkpoint (.pt), ONNX model folder or TensorRT engine; empty = converseg_core.default_checkpoint()",
    ),
    ParamSpec("backend", "torch", "inference backend", choices=BACKENDS),
    ParamSpec(
        "random_model",
        "",
        "build this registered variant with RANDOM weights instead of loading model_path (tests, demos)",
    ),
    ParamSpec(
        "random_model_img_size",
        0,
        "network input side for random_model (0 = the variant's own; 128 keeps CPU tests fast)",
        0,
        4096,
    ),
    ParamSpec(
        "mask_probability",
        -1.0,
        "pixel probability above which a pixel is in the mask, strictly between 0 and 1; negative: the "
        "model's own (the checkpoint's mask logit threshold, 0.0 = probability 0.5 in every shipped model)",
        -1.0,
        1.0,
    ),
    ParamSpec(
        "presence_threshold",
        -1.0,
        "presence probability below which the target is absent; negative: the model's own, calibrated one",
        -1.0,
        1.0,
    ),
    ParamSpec("max_input_side", 4096, "frames with a side longer than this are rejected (pixels)", 16, 16384),
    ParamSpec(
        "max_rate_hz", 0.0, "most frames segmented per second; 0 = as fast as the model runs", 0.0, 1000.0
    ),
    ParamSpec(
        "image_transport",
        "raw",
        "raw: sensor_msgs/Image on the image topic; compressed: CompressedImage on <topic>/compressed",
        choices=IMAGE_TRANSPORTS,
    ),
    ParamSpec("max_queries", 8, "most active queries at once", 1, 64),
    ParamSpec("max_query_chars", 256, "longest accepted query, in characters", 1, 4096),
    ParamSpec("publish_overlay", True, "publish /converseg/overlay (rgb8) when someone subscribes"),
    ParamSpec("overlay_alpha", 0.5, "opacity of the mask colours in the overlay", 0.0, 1.0),
    ParamSpec("diagnostics_period", 1.0, "seconds between /diagnostics messages", 0.1, 60.0),
    ParamSpec(
        "autostart",
        True,
        "configure and activate at start (a plain node); false: wait for a lifecycle manager's transitions",
    ),
)

# Arguments of launch/segment.launch.py and converseg-ros-launch that are not segment-node parameters.
LAUNCH_ONLY_ARGUMENTS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "camera", "", "image topic of a real camera; empty = /camera/image_raw, fed by the demo camera"
    ),
    ParamSpec("demo", "auto", "run the demo camera: true, false, or auto (= true when no camera is named)"),
    ParamSpec("demo_query", "the red mug", "query the demo publishes once on /converseg/query"),
    ParamSpec("demo_rate_hz", 30.0, "demo camera frame rate", 0.1, 240.0),
    ParamSpec("demo_width", 640, "demo frame width (synthetic scene)", 16, 4096),
    ParamSpec("demo_height", 480, "demo frame height (synthetic scene)", 16, 4096),
    ParamSpec(
        "demo_dataset",
        "",
        "data engine output folder (python -m training.dataengine); empty or missing = synthetic scene",
    ),
    ParamSpec("log_level", "info", "ROS log level of both nodes", choices=("debug", "info", "warn", "error")),
)

LAUNCH_ARGUMENTS: tuple[ParamSpec, ...] = SEGMENT_PARAMETERS + LAUNCH_ONLY_ARGUMENTS


@dataclass(frozen=True)
class SegmentSettings:
    """The segment node's parameters, read once at start. Field names are the parameter names."""

    model_path: str = ""
    backend: str = "torch"
    random_model: str = ""
    random_model_img_size: int = 0
    mask_probability: float = -1.0
    presence_threshold: float = -1.0
    max_input_side: int = 4096
    max_rate_hz: float = 0.0
    image_transport: str = "raw"
    max_queries: int = 8
    max_query_chars: int = 256
    publish_overlay: bool = True
    overlay_alpha: float = 0.5
    diagnostics_period: float = 1.0
    autostart: bool = True

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SegmentSettings:
        """Build and validate; raises ValueError naming every bad parameter."""
        settings = cls(**values)
        problems = settings.problems()
        if problems:
            raise ValueError("invalid parameters: " + "; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        out = []
        for spec in SEGMENT_PARAMETERS:
            value = getattr(self, spec.name)
            if type(value) is not type(spec.default):
                out.append(f"{spec.name}={value!r} must be {type(spec.default).__name__}")
            elif spec.choices and value not in spec.choices:
                out.append(f"{spec.name}={value!r} must be one of {', '.join(spec.choices)}")
            elif spec.low is not None and not (spec.low <= value <= spec.high):
                out.append(f"{spec.name}={value!r} must be in [{spec.low}, {spec.high}]")
            elif spec.name == "mask_probability" and value in (0.0, 1.0):
                out.append(f"mask_probability={value!r} would mark every pixel or none: use 0 < p < 1, or -1")
        return out
