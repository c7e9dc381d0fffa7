"""The segment node: a thin ROS adapter over SegmentationPipeline, as a managed (lifecycle) node.

Subscribes:  /camera/image_raw (sensor_msgs/Image, sensor-data QoS; or <topic>/compressed with
             image_transport:=compressed), /converseg/query (std_msgs/String, QUERY_QOS: twice, see below)
Publishes:   /converseg/mask (mono8 labels, camera resolution, the frame's header), /converseg/overlay (rgb8),
             /converseg/result (std_msgs/String, JSON), /diagnostics (diagnostic_msgs/DiagnosticArray)
Lifecycle:   configure loads the model and runs one warm-up inference; activate starts inference and the
             outputs; deactivate stops inference; cleanup frees the model. With autostart:=true (the default)
             the node configures and activates itself, as a plain node would.
Formats and conventions: docs/ROS.md.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble names the module qos_event
    from rclpy.qos_event import SubscriptionEventCallbacks

from .image_conversion import mono8_fields, rgb8_fields
from .model_loading import describe_load_failure, load_segmenter
from .node_support import declare_settings, run_node
from .params import SegmentSettings
from .pipeline import Frame, FrameResult, SegmentationPipeline, overlay_image
from .results import result_document
from .topics import IMAGE_TOPIC, MASK_TOPIC, OVERLAY_TOPIC, QUERY_TOPIC, RESULT_TOPIC

# /converseg/query is subscribed twice, because no single durability matches every publisher and also gets
# what a latched publisher sent before the node started: "volatile" matches volatile (default QoS,
# `ros2 topic pub` on Jazzy and Kilted) and transient-local publishers; "latched" (transient local) matches
# only transient-local ones, and receives their last message when it subscribes. A message that arrives
# through both is applied once (queries.RequestDeduplicator). Publish requests with either profile.
QUERY_QOS = {
    "volatile": QoSProfile(
        depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE
    ),
    "latched": QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
    ),
}
# Iron and later hand the publisher's gid and sequence number to callbacks that take two arguments.
_MESSAGE_INFO = hasattr(Subscription, "CallbackType")
# Sensor-data QoS (best effort, volatile) with depth 1: a frame that cannot be taken at once is stale anyway.
CAMERA_QOS = QoSProfile(
    depth=1, reliability=qos_profile_sensor_data.reliability, durability=qos_profile_sensor_data.durability
)
# Reliable outputs match both reliable and best-effort subscribers (RViz defaults to reliable).
OUTPUT_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)


class SegmentNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(SegmentSettings.node_name, **kwargs)
        # Parameters are read once, here; they are read-only, so changing them means restarting the node.
        self.settings = settings = declare_settings(self, SegmentSettings)
        self.pipeline = SegmentationPipeline.from_settings(settings, on_problem=self._log_problem_once)
        self._mask_pub = self.create_lifecycle_publisher(Image, MASK_TOPIC, OUTPUT_QOS)
        self._overlay_pub = (
            self.create_lifecycle_publisher(Image, OVERLAY_TOPIC, OUTPUT_QOS)
            if settings.publish_overlay
            else None
        )
        self._result_pub = self.create_lifecycle_publisher(String, RESULT_TOPIC, OUTPUT_QOS)
        # Diagnostics stay on in every state: they say why the node is not segmenting.
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        compressed = settings.image_transport == "compressed"
        # The camera and the volatile query subscriptions exist in every state, so that input arriving while
        # the node is not active is counted (node_inactive) rather than silently lost.
        self.create_subscription(
            CompressedImage if compressed else Image,
            IMAGE_TOPIC + "/compressed" if compressed else IMAGE_TOPIC,
            lambda msg: self.pipeline.submit(Frame(msg, time.monotonic(), compressed)),
            CAMERA_QOS,
        )
        self._query_subscription("volatile")
        self._latched_sub = None  # created on activate: a latched request is then delivered (again)
        self.create_timer(settings.diagnostics_period, self._publish_diagnostics)
        self._last_rejected = 0
        if settings.autostart:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    def _query_subscription(self, path: str) -> Any:
        # raw=True: the bytes are checked by queries.decode_string_message (rclpy's conversion stops at a NUL).
        if _MESSAGE_INFO:

            def callback(raw: bytes, info: dict) -> None:
                self._on_request(raw, path, info)
        else:

            def callback(raw: bytes) -> None:
                self._on_request(raw, path, None)

        # A volatile publisher cannot match the latched subscription; the volatile one serves it, so rclpy's
        # "offering incompatible QoS" warning would only mislead. The volatile subscription keeps it.
        events = (
            SubscriptionEventCallbacks(incompatible_qos=lambda _event: None) if path == "latched" else None
        )
        return self.create_subscription(
            String, QUERY_TOPIC, callback, QUERY_QOS[path], raw=True, event_callbacks=events
        )

    # -- lifecycle transitions -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        error = self.pipeline.configure(
            lambda: load_segmenter(self.settings), lambda exc: describe_load_failure(exc, self.settings)
        )
        if error is not None:  # unconfigured; /diagnostics reports ERROR with this message
            self.get_logger().error(error)
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(
            f"configured: backend={self.settings.backend} model={self._model_name()}"
            f" presence_threshold={self.pipeline.segmenter.presence_threshold:g}"
        )
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.pipeline.activate(self._publish_result)
        self._latched_sub = self._query_subscription("latched")
        self.get_logger().info(
            f"active: backend={self.settings.backend} model={self._model_name()}"
            f" transport={self.settings.image_transport}; waiting for frames and a query on {QUERY_TOPIC}"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self.pipeline.deactivate()
        if self._latched_sub is not None:
            self.destroy_subscription(self._latched_sub)
            self._latched_sub = None
        self.get_logger().info("inactive: inference stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        gc.collect()  # the model's arrays are released now, not at some later collection
        self.get_logger().info("unconfigured: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured, ready to be configured again

    def _model_name(self) -> str:
        return self.settings.random_model or self.settings.model_path or "default"

    # -- callbacks ---------------------------------------------------------------------------------------
    def _log_problem_once(self, reason: str, message: str) -> None:
        self.get_logger().warning(
            f"{reason}: {message} (logged once; every occurrence counted in /diagnostics)"
        )

    def _on_request(self, raw: bytes, path: str, info: dict | None) -> None:
        gid = (info or {}).get("publisher_gid")
        active = self.pipeline.handle_request(
            bytes(raw),
            path=path,
            publisher=repr(gid).encode() if gid else None,
            sequence=(info or {}).get("publication_sequence_number"),
        )
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
        level, message = self.pipeline.health(
            rejected_since_last=snap["rejected_total"] > self._last_rejected
        )
        self._last_rejected = snap["rejected_total"]
        status = DiagnosticStatus(
            name="converseg_ros: segment",
            hardware_id=self.settings.backend,
            message=message,
            level=getattr(DiagnosticStatus, level),
        )
        rejected = snap.pop("rejected")
        values = {k: f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in snap.items()}
        values.update({f"rejected.{reason}": str(n) for reason, n in sorted(rejected.items())})
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self) -> None:
        pipeline = getattr(self, "pipeline", None)  # absent when a bad parameter stopped __init__
        if pipeline is not None:
            pipeline.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node(SegmentNode, SegmentSettings.node_name, args)


if __name__ == "__main__":
    raise SystemExit(main())
