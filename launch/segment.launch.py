"""ros2 launch converseg_ros segment.launch.py [ARG:=VALUE ...]

Starts the ConverSeg segment node and, with demo:=true (the default when no camera is named), a demo camera
with a sample query. Without `ros2 launch` (PyPI wheels), `converseg-ros-launch` takes the same arguments.
The arguments are generated from the parameter table in converseg_ros/params.py, which
`converseg-ros-launch --help` and `ros2 launch --show-args converseg_ros segment.launch.py` list.
"""

import os

from ament_index_python.packages import get_package_share_directory
from converseg_ros.launch_plan import make_plan
from converseg_ros.params import LAUNCH_ARGUMENTS, DemoCameraSettings, SegmentSettings
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

FASTDDS_PROFILE = os.path.join(get_package_share_directory("converseg_ros"), "config", "fastdds_shm.xml")

# One DeclareLaunchArgument per entry of the parameter table (converseg_ros/params.py), generated so that
# names, defaults and descriptions cannot drift from the node's; `ros2 launch ... --show-args` lists them.
ARGUMENTS = [
    DeclareLaunchArgument(spec.name, default_value=spec.text(), description=spec.help)
    for spec in LAUNCH_ARGUMENTS
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
            name=SegmentSettings.node_name,
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
                name=DemoCameraSettings.node_name,
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
