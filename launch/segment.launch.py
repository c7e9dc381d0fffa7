"""ros2 launch converseg_ros segment.launch.py [ARG:=VALUE ...]

Starts the ConverSeg segment node and, with demo:=true (the default when no camera is named), a demo camera
with a sample query. Without `ros2 launch` (PyPI wheels), `converseg-ros-launch` takes the same arguments.
Every argument below is also listed by `converseg-ros-launch --help`; tests/test_ros_launch.py checks that
this file declares exactly the node's parameters plus the launch-only arguments, with the same defaults.
"""

import os

from ament_index_python.packages import get_package_share_directory
from converseg_ros.launch_plan import make_plan
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

FASTDDS_PROFILE = os.path.join(get_package_share_directory("converseg_ros"), "config", "fastdds_shm.xml")

ARGUMENTS = [
    # segment node parameters
    DeclareLaunchArgument(
        "model_path",
        default_value="",
        description="checkpoint (.pt), ONNX model folder or TensorRT engine folder; empty = the default model",
    ),
    DeclareLaunchArgument(
        "backend", default_value="torch", description="inference backend: torch, onnxruntime or tensorrt"
    ),
    DeclareLaunchArgument(
        "random_model",
        default_value="",
        description="build this registered variant with RANDOM weights instead of loading (tests, demos)",
    ),
    DeclareLaunchArgument(
        "random_model_img_size",
        default_value="0",
        description="input side for random_model (0 = the variant's)",
    ),
    DeclareLaunchArgument(
        "mask_probability",
        default_value="-1.0",
        description="pixel probability above which a pixel is in the mask (0 < p < 1); negative: the model's own",
    ),
    DeclareLaunchArgument(
        "presence_threshold",
        default_value="-1.0",
        description="presence probability below which the target is absent; negative: the model's own "
        "(calibrated) threshold",
    ),
    DeclareLaunchArgument(
        "max_input_side", default_value="4096", description="reject frames with a longer side"
    ),
    DeclareLaunchArgument(
        "max_rate_hz",
        default_value="0.0",
        description="most frames segmented per second; 0 = as fast as possible",
    ),
    DeclareLaunchArgument(
        "image_transport",
        default_value="raw",
        description="raw (Image) or compressed (CompressedImage on <camera>/compressed)",
    ),
    DeclareLaunchArgument("max_queries", default_value="8", description="most active queries at once"),
    DeclareLaunchArgument(
        "max_query_chars", default_value="256", description="longest accepted query (characters)"
    ),
    DeclareLaunchArgument(
        "publish_overlay", default_value="true", description="publish /converseg/overlay (rgb8)"
    ),
    DeclareLaunchArgument("overlay_alpha", default_value="0.5", description="opacity of the overlay colours"),
    DeclareLaunchArgument(
        "diagnostics_period", default_value="1.0", description="seconds between /diagnostics"
    ),
    DeclareLaunchArgument(
        "autostart",
        default_value="true",
        description="configure and activate the (lifecycle) segment node at start; false: a lifecycle manager does",
    ),
    # launch-only arguments
    DeclareLaunchArgument(
        "camera",
        default_value="",
        description="image topic of a real camera; empty = demo camera on /camera/image_raw",
    ),
    DeclareLaunchArgument(
        "demo",
        default_value="auto",
        description="run the demo camera: true, false, or auto (true when no camera)",
    ),
    DeclareLaunchArgument(
        "demo_query", default_value="the red mug", description="query the demo publishes on /converseg/query"
    ),
    DeclareLaunchArgument("demo_rate_hz", default_value="30.0", description="demo camera frame rate"),
    DeclareLaunchArgument(
        "demo_width", default_value="640", description="demo frame width (synthetic scene)"
    ),
    DeclareLaunchArgument(
        "demo_height", default_value="480", description="demo frame height (synthetic scene)"
    ),
    DeclareLaunchArgument(
        "demo_dataset", default_value="", description="data engine output folder; empty = synthetic scene"
    ),
    DeclareLaunchArgument(
        "log_level", default_value="info", description="log level: debug, info, warn, error"
    ),
]


def _typed(parameters):
    # ParameterValue with an explicit type: launch_ros would otherwise YAML-parse strings ("" -> null, "123" -> int).
    return {name: ParameterValue(value, value_type=type(value)) for name, value in parameters.items()}


def _nodes(context, *_args, **_kwargs):
    # Same resolution as converseg-ros-launch: types, validation, demo:=auto, camera remapping.
    plan = make_plan({arg.name: context.launch_configurations[arg.name] for arg in ARGUMENTS})
    ros_arguments = ["--log-level", plan.log_level]
    nodes = [
        Node(
            package="converseg_ros",
            executable="segment_node",
            name="converseg_segment",
            parameters=[_typed(plan.segment_parameters)],
            remappings=plan.remappings,
            ros_arguments=ros_arguments,
            output="screen",
            emulate_tty=True,
        )
    ]
    if plan.demo:
        nodes.append(
            Node(
                package="converseg_ros",
                executable="demo_camera",
                name="converseg_demo_camera",
                parameters=[_typed(plan.demo_parameters)],
                ros_arguments=ros_arguments,
                output="screen",
            )
        )
    return nodes


def generate_launch_description():
    return LaunchDescription(
        ARGUMENTS
        + [
            # The bundled 16 MiB shared-memory profile, unless the user chose a Fast DDS profile already.
            SetEnvironmentVariable(
                "FASTDDS_DEFAULT_PROFILES_FILE",
                EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", default_value=FASTDDS_PROFILE),
            ),
            OpaqueFunction(function=_nodes),
        ]
    )
