"""`colcon build` of the converseg_ros package, then the node run from the install space.

colcon-core, colcon-ros and colcon-package-selection come from PyPI (the ros extra). The build goes to a temporary workspace; the
checks are the places `ros2 launch` and `ros2 run` look (the ament index, share/<pkg>/launch,
lib/<pkg>/<executable>), and a request answered by the installed executable with the install space, not
the source tree, on its Python path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ros_helpers

REPO = Path(__file__).resolve().parents[1]
COLCON = shutil.which("colcon") or str(Path(sys.executable).with_name("colcon"))

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(COLCON), reason="colcon not installed (pip install colcon-core colcon-ros)"
    ),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("colcon_ws")
    done = subprocess.run(
        [COLCON, "--log-base", str(ws / "log"), "build", "--base-paths", str(REPO / "converseg_ros"),
         "--build-base", str(ws / "build"), "--install-base", str(ws / "install")],
        cwd=ws, capture_output=True, text=True, timeout=240,
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return ws / "install"


def sourced_environment(install: Path) -> dict[str, str]:
    """The environment after `. install/setup.sh`, as a user's shell would have it."""
    done = subprocess.run(
        ["sh", "-c", f'. "{install}/setup.sh" && env -0'], capture_output=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def test_colcon_installs_the_executables_launch_file_and_resources(install):
    prefix = install / "converseg_ros"
    for executable in ("segment_node", "demo_camera", "converseg-ros-launch"):
        path = prefix / "lib" / "converseg_ros" / executable
        assert path.is_file() and os.access(path, os.X_OK), path
    share = prefix / "share" / "converseg_ros"
    assert (share / "launch" / "segment.launch.py").read_text() == (
        REPO / "launch" / "segment.launch.py"
    ).read_text()
    assert (share / "config" / "fastdds_shm.xml").is_file() and (share / "package.xml").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "converseg_ros").is_file()


def test_ament_index_finds_the_package_where_ros2_launch_looks(install):
    pytest.importorskip("ament_index_python", reason="ament_index_python (ROS 2 wheels) not installed")
    env = sourced_environment(install)
    code = (
        "from ament_index_python.packages import get_package_share_directory as s, get_package_prefix as p; "
        "print(s('converseg_ros')); print(p('converseg_ros'))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    share, prefix = done.stdout.split()
    assert Path(share, "launch", "segment.launch.py").is_file()
    assert Path(prefix) == install / "converseg_ros"


INSPECT_INSTALLED_LAUNCH_FILE = """
import sys
sys.path.insert(0, sys.argv[2])  # tests/, for ros_helpers' stand-ins of launch and launch_ros
import ros_helpers
sys.modules.update(ros_helpers.launch_stand_ins())
launch = ros_helpers.import_launch_file(sys.argv[1])
declared = [a for a in launch.generate_launch_description().args[0] if type(a).__name__ == "DeclareLaunchArgument"]
import converseg_ros.params
print(converseg_ros.params.__file__)
print(launch.FASTDDS_PROFILE)
print(" ".join(a.name for a in declared))
"""


def test_the_installed_launch_file_finds_its_package_in_the_install_space(install):
    """What `ros2 launch converseg_ros segment.launch.py` imports, with only `launch` and `launch_ros` stood
    in for: the parameter table from the install space, the Fast DDS profile through the ament index."""
    pytest.importorskip("ament_index_python", reason="ament_index_python (ROS 2 wheels) not installed")
    from converseg_ros.params import LAUNCH_ARGUMENTS

    launch_file = install / "converseg_ros" / "share" / "converseg_ros" / "launch" / "segment.launch.py"
    done = subprocess.run(
        [sys.executable, "-c", INSPECT_INSTALLED_LAUNCH_FILE, str(launch_file), str(REPO / "tests")],
        env=sourced_environment(install), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    params, profile, names = done.stdout.splitlines()
    assert Path(params).is_relative_to(install / "converseg_ros"), params
    assert Path(profile).is_file() and Path(profile).is_relative_to(install / "converseg_ros"), profile
    assert names.split() == [spec.name for spec in LAUNCH_ARGUMENTS]


@pytest.mark.ros
@pytest.mark.skipif(importlib.util.find_spec("rclpy") is None, reason="rclpy (ROS 2 wheels) not installed")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the random-weight model needs PyTorch")
def test_the_installed_node_answers_a_request(install, tmp_path):
    env = sourced_environment(install)
    site = (
        install
        / "converseg_ros"
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    where = subprocess.run(
        [sys.executable, "-c", "import converseg_ros.segment_node as m; print(m.__file__)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    out = ros_helpers.run_scenario(
        "installed", domain_id=71, tmp_dir=tmp_path, base_env=env,
        executable=str(install / "converseg_ros" / "lib" / "converseg_ros" / "segment_node"),
    )  # fmt: skip
    assert out["module"].startswith(str(site)), out
    assert out["queries"] == ["the red mug"] and out["size"] == [160, 120]
    assert out["stop"]["rc"] == 0, out["log"]
