"""What both nodes share (needs rclpy): parameters declared from their table in converseg_ros.params and
read once, and a main that runs a node until shutdown."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from .params import ParameterTable, ParamSpec
from .shutdown import install_shutdown_signals

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


def run_node(make_node: Callable[[], Node], name: str, args: list[str] | None = None) -> int:
    """Create the node and spin it until Ctrl-C or SIGTERM (see converseg_ros.shutdown). Returns the exit
    status: 0, or 2 with a message naming the parameter when the node's parameters are invalid."""
    signals = install_shutdown_signals()
    rclpy.init(args=args)
    node = None
    try:
        if signals.received:  # a signal between installing the handler and rclpy.init
            return 0
        node = make_node()
        rclpy.spin(node)
    except ExternalShutdownException:
        pass
    except ValueError as exc:  # declare_settings names every bad or unknown parameter
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except ParameterException as exc:  # rclpy's own range and type checks
        print(f"{name}: invalid parameters: {exc}", file=sys.stderr)
        return 2
    except Exception:
        if signals.received:  # stopped while starting (loading a model, rendering scenes), as asked
            return 0
        raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
