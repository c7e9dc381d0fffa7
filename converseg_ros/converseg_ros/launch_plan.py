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

from .params import (
    DEMO_LAUNCH_PARAMETERS,
    LAUNCH_ARGUMENTS,
    SEGMENT_PARAMETERS,
    DemoCameraSettings,
    SegmentSettings,
)
from .topics import IMAGE_TOPIC

_SPECS = {spec.name: spec for spec in LAUNCH_ARGUMENTS}


@dataclass
class LaunchPlan:
    segment_parameters: dict[str, Any]
    remappings: list[tuple[str, str]] = field(default_factory=list)
    demo: bool = False
    demo_parameters: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


def default_arguments() -> dict[str, str]:
    return {spec.name: spec.text() for spec in LAUNCH_ARGUMENTS}


def make_plan(arguments: dict[str, str]) -> LaunchPlan:
    """Resolve launch arguments (unknown names are an error) into nodes, parameters and remappings."""
    unknown = sorted(set(arguments) - set(_SPECS))
    if unknown:
        raise ValueError(f"unknown launch arguments {unknown}; known: {', '.join(sorted(_SPECS))}")
    merged = default_arguments() | arguments
    values = {name: _SPECS[name].parse(text) for name, text in merged.items()}
    camera = values["camera"].strip()
    plan = LaunchPlan(
        segment_parameters={p.name: values[p.name] for p in SEGMENT_PARAMETERS},
        demo=values["demo"] == "true" or (values["demo"] == "auto" and not camera),
        demo_parameters={name: values["demo_" + name] for name in DEMO_LAUNCH_PARAMETERS},
        log_level=values["log_level"],
    )
    # Both nodes check their settings at start; checking here too fails before any process starts.
    SegmentSettings.from_values(plan.segment_parameters)
    DemoCameraSettings.from_values(plan.demo_parameters)
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
