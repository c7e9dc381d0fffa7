"""The topics converseg_ros reads and writes (no ROS import); docs/ROS.md gives their formats.

The camera topic is remappable (the launch argument ``camera`` remaps it); the others are the node's
interface.
"""

IMAGE_TOPIC = "/camera/image_raw"  # sensor_msgs/Image; CompressedImage on IMAGE_TOPIC + "/compressed"
QUERY_TOPIC = "/converseg/query"  # std_msgs/String
MASK_TOPIC = "/converseg/mask"  # sensor_msgs/Image, mono8 labels
OVERLAY_TOPIC = "/converseg/overlay"  # sensor_msgs/Image, rgb8
RESULT_TOPIC = "/converseg/result"  # std_msgs/String, JSON
