"""Demo camera node: publishes frames on /camera/image_raw and a query on /converseg/query.

With ``dataset`` naming a data engine output folder, it cycles through the rendered scenes and publishes
each scene's prompt with it; otherwise it loops a synthetic kitchen table and publishes ``query`` once.
"""

from __future__ import annotations

from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from .demo_scene import DemoSample, dataset_samples, synthetic_frames
from .image_conversion import rgb_to_image_fields
from .node_support import declare_settings, run_node
from .params import DemoCameraSettings
from .segment_node import QUERY_QOS
from .topics import IMAGE_TOPIC, QUERY_TOPIC


class DemoCamera(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__(DemoCameraSettings.node_name, **kwargs)
        p = declare_settings(self, DemoCameraSettings)
        samples = dataset_samples(p.dataset) if p.dataset else []
        if p.dataset and not samples:
            self.get_logger().warning(
                f"no data engine samples under {p.dataset!r}: showing the synthetic scene"
            )
        if not samples:
            query = p.query or None
            samples = [
                DemoSample(f, query if i == 0 else None)
                for i, f in enumerate(synthetic_frames(p.width, p.height))
            ]
            self._frames_per_sample = 1
        else:
            self._frames_per_sample = max(1, round(p.seconds_per_scene * p.rate_hz))
        # Encoded once: publishing then only stamps a header and hands over bytes.
        self._messages = [Image(**rgb_to_image_fields(s.rgb, p.encoding)) for s in samples]
        self._queries = [s.query for s in samples]
        for msg in self._messages:
            msg.header.frame_id = p.frame_id
        self._image_pub = self.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
        self._query_pub = self.create_publisher(String, QUERY_TOPIC, QUERY_QOS["latched"])
        self._tick = 0
        self._last_query: str | None = None
        self.create_timer(1.0 / p.rate_hz, self._publish)
        self.get_logger().info(f"publishing {len(samples)} scene(s) at {p.rate_hz} Hz on {IMAGE_TOPIC}")

    def _publish(self) -> None:
        index = (self._tick // self._frames_per_sample) % len(self._messages)
        query = self._queries[index]
        if query and query != self._last_query:  # transient-local: late subscribers still get it
            self._query_pub.publish(String(data=query))
            self._last_query = query
        msg = self._messages[index]
        msg.header.stamp = self.get_clock().now().to_msg()
        self._image_pub.publish(msg)
        self._tick += 1


def main(args: list[str] | None = None) -> int:
    return run_node(DemoCamera, DemoCameraSettings.node_name, args)


if __name__ == "__main__":
    raise SystemExit(main())
