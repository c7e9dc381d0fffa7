"""Every ROS parameter and launch argument of converseg_ros, defined once (no ROS import).

Each node's parameters are the fields of one frozen dataclass: the field's name, its type, its default,
and, in ``parameter(...)``, its description and the values it accepts. From these tables
- the segment node and the demo camera declare their parameters (descriptor text = ``ParamSpec.help``) and
  read them into their settings (``from_values`` validates, naming every bad or unknown parameter);
- ``LAUNCH_ARGUMENTS`` is derived: launch/segment.launch.py declares one DeclareLaunchArgument per entry
  and ``converseg-ros-launch --help`` lists them, both with ``ParamSpec.help`` as the description;
- SegmentationPipeline takes its defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from converseg_core.backends import BACKENDS

IMAGE_TRANSPORTS = ("raw", "compressed")
LOG_LEVELS = ("debug", "info", "warn", "error")
Value = bool | int | float | str


@dataclass(frozen=True)
class ParamSpec:
    """One row of a table: ``type(default)`` (bool, int, float or str) is the parameter's type; ``low`` /
    ``high`` bound a number (inclusive); ``choices`` lists the accepted strings."""

    name: str
    default: Value
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def help(self) -> str:
        """The description with its constraints: the node's parameter descriptor, the launch file's
        argument and ``converseg-ros-launch --help`` all show exactly this text."""
        if self.choices:
            return f"{self.description} (one of: {', '.join(self.choices)})"
        if self.low is not None:
            return f"{self.description} (from {self.low:g} to {self.high:g})"
        return self.description

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable (``name=value must ...``), or None."""
        violation = self._violation(value)
        return f"{self.name}={value!r} {violation}" if violation else None

    def _violation(self, value: Any) -> str | None:
        if type(value) is not self.type:
            return f"must be {self.type.__name__}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if self.low is not None and not (self.low <= value <= self.high):
            return f"must be in [{self.low:g}, {self.high:g}]"
        return None

    def parse(self, text: str) -> Value:
        """A ``name:=value`` string as the parameter's type; ValueError names the argument."""
        try:
            if self.type is bool:
                if text.strip().lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                value: Value = text.strip().lower() == "true"
            else:
                value = self.type(text)
        except ValueError as exc:
            raise ValueError(f"{self.name}:={text!r}: {exc}") from exc
        violation = self._violation(value)
        if violation:
            raise ValueError(f"{self.name}:={text!r}: {violation}")
        return value

    def text(self, value: Value | None = None) -> str:
        """``value`` (default: the default) as a launch argument string: ``true``/``false`` for booleans."""
        value = self.default if value is None else value
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


def parameter(
    default: Value,
    description: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A settings field that is a ROS parameter (see ParamSpec)."""
    extra = {"description": description, "low": low, "high": high, "choices": choices}
    return dataclasses.field(default=default, metadata={"param": extra})


T = TypeVar("T", bound="ParameterTable")


class ParameterTable:
    """Base of the frozen settings dataclasses below: their fields are the table's rows."""

    node_name: ClassVar[str] = ""

    @classmethod
    def specs(cls) -> tuple[ParamSpec, ...]:
        return tuple(ParamSpec(f.name, f.default, **f.metadata["param"]) for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls: type[T], values: dict[str, Any]) -> T:
        """Build and validate; raises ValueError naming every bad or unknown parameter."""
        specs = {spec.name: spec for spec in cls.specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise ValueError(
                f"unknown parameters {unknown} for {cls.node_name}; its parameters are {', '.join(specs)}"
            )
        settings = cls(**values)
        problems = settings.problems()
        if problems:
            raise ValueError("invalid parameters: " + "; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        found = (spec.problem(getattr(self, spec.name)) for spec in self.specs())
        return [p for p in found if p]


@dataclass(frozen=True)
class SegmentSettings(ParameterTable):
    """The segment node's parameters, read once at start (read-only: changing one means a restart)."""

    node_name: ClassVar[str] = "converseg_segment"

    model_path: str = parameter(
        "",
        "checkpoint (.pt), ONNX export folder (float32, or INT8 from export/quantize_onnx.py for a CPU robot) "
        "or TensorRT engine folder; empty = the default checkpoint",
    )
    backend: str = parameter("torch", "inference backend", choices=BACKENDS)
    random_model: str = parameter(
        "", "build this registered variant with RANDOM weights instead of loading model_path (tests, demos)"
    )
    random_model_img_size: int = parameter(
        0, "network input side for random_model (0 = the variant's own; 128 keeps CPU tests fast)", low=0,
        high=4096,
    )  # fmt: skip
    mask_probability: float = parameter(
        -1.0,
        "pixel probability above which a pixel is in the mask, strictly between 0 and 1; negative: the "
        "model's own (the checkpoint's mask logit threshold, 0.0 = probability 0.5 in every shipped model)",
        low=-1.0,
        high=1.0,
    )
    presence_threshold: float = parameter(
        -1.0,
        "presence probability below which the target is absent; negative: the model's own, calibrated one",
        low=-1.0,
        high=1.0,
    )
    max_input_side: int = parameter(
        4096, "frames with a side longer than this are rejected (pixels)", low=16, high=16384
    )
    max_rate_hz: float = parameter(
        0.0, "most frames segmented per second; 0 = as fast as the model runs", low=0.0, high=1000.0
    )
    image_transport: str = parameter(
        "raw",
        "raw: sensor_msgs/Image on the image topic; compressed: CompressedImage on <topic>/compressed",
        choices=IMAGE_TRANSPORTS,
    )
    max_queries: int = parameter(8, "most active queries at once", low=1, high=64)
    max_query_chars: int = parameter(256, "longest accepted query, in characters", low=1, high=4096)
    publish_overlay: bool = parameter(True, "publish /converseg/overlay (rgb8) when someone subscribes")
    overlay_alpha: float = parameter(0.5, "opacity of the mask colours in the overlay", low=0.0, high=1.0)
    diagnostics_period: float = parameter(1.0, "seconds between /diagnostics messages", low=0.1, high=60.0)
    autostart: bool = parameter(
        True,
        "configure and activate at start (a plain node); false: wait for a lifecycle manager's transitions",
    )

    def problems(self) -> list[str]:
        out = super().problems()
        if self.mask_probability in (0.0, 1.0):
            out.append(
                f"mask_probability={self.mask_probability!r} would mark every pixel or none: use 0 < p < 1, or -1"
            )
        return out

    @property
    def min_interval_s(self) -> float:
        """Seconds between the starts of two inferences (0: no limit)."""
        return 1.0 / self.max_rate_hz if self.max_rate_hz > 0 else 0.0


@dataclass(frozen=True)
class DemoCameraSettings(ParameterTable):
    """The demo camera's parameters (converseg_ros.demo_camera)."""

    node_name: ClassVar[str] = "converseg_demo_camera"

    rate_hz: float = parameter(30.0, "demo camera frame rate (frames per second)", low=0.1, high=240.0)
    width: int = parameter(640, "synthetic frame width (pixels)", low=16, high=4096)
    height: int = parameter(480, "synthetic frame height (pixels)", low=16, high=4096)
    query: str = parameter(
        "the red mug", "query published once on /converseg/query with the synthetic scene; empty = none"
    )
    dataset: str = parameter(
        "",
        "data engine output folder (python -m training.dataengine); empty or without samples = synthetic scene",
    )
    seconds_per_scene: float = parameter(
        3.0, "how long each data engine scene is shown", low=0.1, high=3600.0
    )
    encoding: str = parameter("rgb8", "encoding of the published frames: rgb8, bgr8, rgba8, bgra8 or mono8")
    frame_id: str = parameter("demo_camera", "header.frame_id of the frames")


# Demo camera parameters the launch entry points pass on, as demo_<name>.
DEMO_LAUNCH_PARAMETERS = ("query", "rate_hz", "width", "height", "dataset")
SEGMENT_PARAMETERS: tuple[ParamSpec, ...] = SegmentSettings.specs()
DEMO_CAMERA_PARAMETERS: tuple[ParamSpec, ...] = DemoCameraSettings.specs()

# Arguments of launch/segment.launch.py and converseg-ros-launch that are no node's parameter.
LAUNCH_ONLY_ARGUMENTS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "camera", "", "image topic of a real camera; empty = /camera/image_raw, fed by the demo camera"
    ),
    ParamSpec(
        "demo",
        "auto",
        "run the demo camera; auto = run it when no camera is named",
        choices=("true", "false", "auto"),
    ),
    ParamSpec("log_level", "info", "ROS log level of both nodes", choices=LOG_LEVELS),
)

LAUNCH_ARGUMENTS: tuple[ParamSpec, ...] = (
    SEGMENT_PARAMETERS
    + LAUNCH_ONLY_ARGUMENTS
    + tuple(
        dataclasses.replace(spec, name="demo_" + spec.name)
        for spec in DEMO_CAMERA_PARAMETERS
        if spec.name in DEMO_LAUNCH_PARAMETERS
    )
)
