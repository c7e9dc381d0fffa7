"""Keep ROS 2 traffic on this machine: for tests, benchmarks and demos on shared machines (no ROS import).

SAFETY: by default DDS discovery multicasts out of every network interface. Every process that calls
rclpy.init in a test, benchmark or demo must run with LOOPBACK_VARIABLES (checked:
no packet leaves loopback, tests/test_ros_node.py::test_no_dds_packet_leaves_loopback) and its own
ROS_DOMAIN_ID; where unprivileged user namespaces work, it also runs inside `unshare -rn` with only `lo`
up, a network namespace with no route out. The node and converseg-ros-launch do NOT set this themselves: on
a robot, nodes on other hosts must discover each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

# What each distro reads to keep discovery on this host: Iron and later (Jazzy, Kilted) read
# ROS_AUTOMATIC_DISCOVERY_RANGE; Humble reads only ROS_LOCALHOST_ONLY (Jazzy still honours it, with a
# deprecation warning; Kilted ignores it). Setting both covers every distro.
LOOPBACK_VARIABLES = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_LOCALHOST_ONLY": "1"}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the ament package folder, holds converseg_ros/
PROFILE = Path(__file__).resolve().parent / "resources" / "fastdds_shm.xml"


def _ip() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


@cache
def unshare_works() -> bool:
    """Whether `unshare -rn` (user + network namespace, no root) is allowed here."""
    if not shutil.which("unshare") or not os.path.exists(_ip()):
        return False
    try:
        done = subprocess.run(
            ["unshare", "-rn", _ip(), "link", "set", "lo", "up"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def fenced(cmd: list[str]) -> list[str]:
    """``cmd`` inside a fresh network namespace with only loopback up, when the kernel allows it."""
    if not unshare_works():
        return cmd
    return ["unshare", "-rn", "sh", "-c", f'{_ip()} link set lo up && exec "$@"', "sh", *cmd]


def loopback_env(domain_id: int, log_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with discovery forced to LOCALHOST, the given domain, a log folder,
    the bundled Fast DDS profile and converseg_ros importable."""
    env = dict(os.environ if base is None else base)
    env.update(LOOPBACK_VARIABLES)  # forced, never setdefault
    env.pop("ROS_STATIC_PEERS", None)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_LOG_DIR"] = str(log_dir)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)
    paths = [str(PACKAGE_ROOT), str(PACKAGE_ROOT.parent), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env
