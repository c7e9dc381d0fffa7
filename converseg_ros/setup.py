"""ament_python build of converseg_ros (colcon build --packages-select converseg_ros).

The launch file lives in the repository's top-level launch/ folder; ./launch is a symlink to it so that
colcon (which runs this file from the package folder) installs it to share/converseg_ros/launch.
"""

from glob import glob

from setuptools import find_packages, setup

package_name = "converseg_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={package_name: ["resources/*.xml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", ["converseg_ros/resources/fastdds_shm.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ConverSeg Edge maintainers",
    maintainer_email="converseg-edge@example.com",
    description="ConverSeg Edge segment node, demo camera and launch entry point",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "segment_node = converseg_ros.segment_node:main",
            "demo_camera = converseg_ros.demo_camera:main",
            "converseg-ros-launch = converseg_ros.launch_main:main",
        ],
    },
)
