"""Launch arguments -> what to start, shared by launch/segment.launch.py and converseg-ros-launch (no ROS).

Both take the arguments of params.LAUNCH_ARGUMENTS as strings (``name:=value``) and start the same nodes
with the same parameters, so a command line works the same with `ros2 launch` and without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import LAUNCH_ARGUMENTS, SEGMENT_PARAMETERS, ParamSpec

IMAGE_TOPIC = "/camera/image_raw"  # the segment node's (remappable) camera topic
_SPECS = {spec.name: spec for spec in LAUNCH_ARGUMENTS}
_DEMO_PARAMETERS = {  # launch argument -> demo camera parameter
    "demo_query": "query",
    "demo_rate_hz": "rate_hz",
    "demo_width": "width",
    "demo_height": "height",
    "demo_dataset": "dataset",
}


@dataclass
class LaunchPlan:
    segment_parameters: dict[str, Any]
    remappings: list[tuple[str, str]] = field(default_factory=list)
    demo: bool = False
    demo_parameters: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


def default_arguments() -> dict[str, str]:
    return {spec.name: format_value(spec.default) for spec in LAUNCH_ARGUMENTS}


def format_value(value: Any) -> str:
    """How a default is written in the launch file (``true``/``false`` for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_value(spec: ParamSpec, text: str) -> Any:
    """A launch argument string as the parameter's type; ValueError names the argument."""
    kind = type(spec.default)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError("expected true or false")
            value: Any = lowered == "true"
        elif kind is int:
            value = int(text)
        elif kind is float:
            value = float(text)
        else:
            value = text
    except ValueError as exc:
        raise ValueError(f"{spec.name}:={text!r}: {exc}") from exc
    if spec.choices and value not in spec.choices:
        raise ValueError(f"{spec.name}:={text!r}: choose one of {', '.join(spec.choices)}")
    if spec.low is not None and not (spec.low <= value <= spec.high):
        raise ValueError(f"{spec.name}:={text!r}: must be in [{spec.low}, {spec.high}]")
    return value


def make_plan(arguments: dict[str, str]) -> LaunchPlan:
    """Resolve launch arguments (unknown names are an error) into nodes, parameters and remappings."""
    unknown = sorted(set(arguments) - set(_SPECS))
    if unknown:
        raise ValueError(f"unknown launch arguments {unknown}; known: {', '.join(sorted(_SPECS))}")
    merged = default_arguments() | arguments
    values = {name: parse_value(_SPECS[name], text) for name, text in merged.items() if name != "demo"}
    demo_text = merged["demo"].strip().lower()
    if demo_text not in ("true", "false", "auto"):
        raise ValueError(f"demo:={merged['demo']!r}: choose true, false or auto")
    camera = values["camera"].strip()
    plan = LaunchPlan(
        segment_parameters={p.name: values[p.name] for p in SEGMENT_PARAMETERS},
        demo=demo_text == "true" or (demo_text == "auto" and not camera),
        demo_parameters={param: values[arg] for arg, param in _DEMO_PARAMETERS.items()},
        log_level=values["log_level"],
    )
    if camera and camera != IMAGE_TOPIC:
        plan.remappings = [(IMAGE_TOPIC, camera), (IMAGE_TOPIC + "/compressed", camera + "/compressed")]
    return plan


def fastdds_profile() -> Path:
    """The bundled Fast DDS profile (16 MiB shared-memory segment)."""
    return Path(__file__).resolve().parent / "resources" / "fastdds_shm.xml"


def environment_with_profile(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) with FASTDDS_DEFAULT_PROFILES_FILE set to the bundled profile, unless
    the user already chose one."""
    out = dict(os.environ if env is None else env)
    out.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(fastdds_profile()))
    return out


def params_file_text(node_name: str, parameters: dict[str, Any]) -> str:
    """A --params-file (JSON is YAML) that keeps every value's type: 30.0 stays a double, "1" a string."""
    return json.dumps({node_name: {"ros__parameters": parameters}}, indent=1)
