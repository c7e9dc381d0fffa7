"""The segment node: a thin ROS adapter over SegmentationPipeline.

Subscribes:  /camera/image_raw (sensor_msgs/Image, sensor-data QoS; or <topic>/compressed with
             image_transport:=compressed), /converseg/query (std_msgs/String, reliable, transient-local, depth 1)
Publishes:   /converseg/mask (mono8 labels, camera resolution, the frame's header), /converseg/overlay (rgb8),
             /converseg/result (std_msgs/String, JSON), /diagnostics (diagnostic_msgs/DiagnosticArray)
Formats and conventions: docs/ROS.md.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from .image_conversion import mono8_fields, rgb8_fields
from .model_loading import describe_load_failure, load_segmenter
from .params import SEGMENT_PARAMETERS, ParamSpec, SegmentSettings
from .pipeline import Frame, FrameResult, SegmentationPipeline, overlay_image
from .results import result_document
from .shutdown import install_shutdown_signals

IMAGE_TOPIC = "/camera/image_raw"
QUERY_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
# Sensor-data QoS (best effort, volatile) with depth 1: a frame that cannot be taken at once is stale anyway.
CAMERA_QOS = QoSProfile(
    depth=1, reliability=qos_profile_sensor_data.reliability, durability=qos_profile_sensor_data.durability
)
# Reliable outputs match both reliable and best-effort subscribers (RViz defaults to reliable).
OUTPUT_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    extra = f" (one of: {', '.join(spec.choices)})" if spec.choices else ""
    descriptor = ParameterDescriptor(description=spec.description + extra, read_only=True)
    if spec.low is not None and isinstance(spec.default, float):
        descriptor.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
    elif spec.low is not None:
        descriptor.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    return descriptor


class SegmentNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("converseg_segment", **kwargs)
        # Parameters are read once, here; they are read-only, so changing them means restarting the node.
        values = {
            p.name: self.declare_parameter(p.name, p.default, _descriptor(p)).value
            for p in SEGMENT_PARAMETERS
        }
        self.settings = settings = SegmentSettings.from_values(values)
        segmenter, load_error = None, None
        try:
            segmenter = load_segmenter(settings)
        except Exception as exc:  # the node stays up and reports ERROR on /diagnostics
            load_error = describe_load_failure(exc, settings)
            self.get_logger().error(load_error)
        self.pipeline = SegmentationPipeline(
            segmenter=segmenter,
            load_error=load_error,
            max_input_side=settings.max_input_side,
            max_queries=settings.max_queries,
            max_query_chars=settings.max_query_chars,
            min_interval_s=1.0 / settings.max_rate_hz if settings.max_rate_hz > 0 else 0.0,
            on_problem=self._log_problem_once,
        )
        self._mask_pub = self.create_publisher(Image, "/converseg/mask", OUTPUT_QOS)
        self._overlay_pub = (
            self.create_publisher(Image, "/converseg/overlay", OUTPUT_QOS)
            if settings.publish_overlay
            else None
        )
        self._result_pub = self.create_publisher(String, "/converseg/result", OUTPUT_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        compressed = settings.image_transport == "compressed"
        self.create_subscription(
            CompressedImage if compressed else Image,
            IMAGE_TOPIC + "/compressed" if compressed else IMAGE_TOPIC,
            lambda msg: self.pipeline.submit(Frame(msg, time.monotonic(), compressed)),
            CAMERA_QOS,
        )
        self.create_subscription(String, "/converseg/query", self._on_query, QUERY_QOS)
        self.create_timer(settings.diagnostics_period, self._publish_diagnostics)
        self._last_rejected = 0
        self.pipeline.start(self._publish_result)
        self.get_logger().info(
            f"ready: backend={settings.backend} model={settings.random_model or settings.model_path or 'default'}"
            f" transport={settings.image_transport}"
            + (f" presence_threshold={segmenter.presence_threshold:g}" if segmenter is not None else "")
            + "; waiting for frames and a query on /converseg/query"
        )

    def _log_problem_once(self, reason: str, message: str) -> None:
        self.get_logger().warning(
            f"{reason}: {message} (logged once; every occurrence counted in /diagnostics)"
        )

    def _on_query(self, msg: String) -> None:
        active = self.pipeline.handle_query(msg.data)
        if active is not None:
            self.get_logger().info(f"active queries: {list(active)}")

    def _publish_result(self, result: FrameResult) -> None:
        """Runs on the worker thread: mask first (the latency that matters), then result, then overlay."""
        self._mask_pub.publish(Image(header=result.header, **mono8_fields(result.labels)))
        stamp = result.header.stamp
        stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        age_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6 if stamp_ns else None
        document = result_document(result, camera_to_mask_ms=age_ms)
        self._result_pub.publish(String(data=json.dumps(document)))
        if self._overlay_pub is not None and self._overlay_pub.get_subscription_count() > 0:
            rgb = overlay_image(result.rgb, result.labels, self.settings.overlay_alpha)
            self._overlay_pub.publish(Image(header=result.header, **rgb8_fields(rgb)))

    def _publish_diagnostics(self) -> None:
        snap = self.pipeline.snapshot()
        status = DiagnosticStatus(name="converseg_ros: segment", hardware_id=self.settings.backend)
        if self.pipeline.load_error:
            status.level, status.message = DiagnosticStatus.ERROR, self.pipeline.load_error
        elif snap["rejected_total"] > self._last_rejected:
            status.level, status.message = DiagnosticStatus.WARN, "rejected inputs since the last report"
        else:
            status.level, status.message = DiagnosticStatus.OK, "ok"
        self._last_rejected = snap["rejected_total"]
        rejected = snap.pop("rejected")
        values = {k: f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in snap.items()}
        values.update({f"rejected.{reason}": str(n) for reason, n in sorted(rejected.items())})
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self) -> None:
        self.pipeline.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    signals = install_shutdown_signals()
    rclpy.init(args=args)
    node = None
    try:
        if signals.received:  # a signal between installing the handler and rclpy.init
            return 0
        node = SegmentNode()
        rclpy.spin(node)
    except ExternalShutdownException:
        pass
    except ValueError as exc:  # SegmentSettings names every bad parameter
        print(f"converseg_segment: {exc}", file=sys.stderr)
        return 2
    except ParameterException as exc:  # rclpy's own range and type checks
        print(f"converseg_segment: invalid parameters: {exc}", file=sys.stderr)
        return 2
    except Exception:
        if signals.received:  # stopped while the model loaded: the node's context is gone, as asked
            return 0
        raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
