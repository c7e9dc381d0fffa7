"""Declare a node's parameters from its table in converseg_ros.params and read them, once (needs rclpy)."""

from __future__ import annotations

from typing import TypeVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from .params import ParameterTable, ParamSpec

T = TypeVar("T", bound=ParameterTable)


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """Read-only (parameters are read once at start), described by ``spec.help``, with rclpy's own range
    check for numbers."""
    out = ParameterDescriptor(description=spec.help, read_only=True)
    if spec.low is not None and spec.type is float:
        out.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
    elif spec.low is not None:
        out.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    return out


def declare_settings(node: Node, table: type[T]) -> T:
    """Declare every parameter of ``table`` on ``node`` and return the validated settings.

    Raises ValueError naming every bad parameter, and every override (``-p`` or a params file) that names
    no parameter of this node: rclpy ignores those silently, so a typo would go unnoticed.
    """
    values = {
        spec.name: node.declare_parameter(spec.name, spec.default, descriptor(spec)).value
        for spec in table.specs()
    }
    # rclpy keeps the command-line and params-file values in _parameter_overrides (Humble to Kilted); it
    # declares use_sim_time (and, from Jazzy, start_type_description_service) itself.
    overrides = getattr(node, "_parameter_overrides", {})
    unknown = {
        name: override.value
        for name, override in overrides.items()
        if not node.has_parameter(name) and not name.startswith("qos_overrides.")
    }
    return table.from_values(values | unknown)
