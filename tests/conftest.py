import os
import sys
from pathlib import Path

# Offline, deterministic, and polite on a 2-core machine shared with other jobs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# SAFETY: any test that starts ROS 2 must keep DDS discovery on loopback (see docs/ROS.md).
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # Iron and later
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")  # Humble
# Phrasing-memory embeddings (converseg_core.anchoring) computed once per test run's checkout, not in $HOME;
# the processes tests start inherit it.
os.environ.setdefault("CONVERSEG_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "converseg"))

# converseg_ros is a colcon (ament_python) package that pyproject.toml does not install: the tests import it
# from its package folder, and so do the processes they start (tests/test_ros_colcon.py checks the colcon
# install itself, with this path removed).
ROS_PACKAGE = str(Path(__file__).resolve().parents[1] / "converseg_ros")
sys.path.insert(0, ROS_PACKAGE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROS_PACKAGE, os.environ.get("PYTHONPATH")) if p)

try:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
except ImportError:  # the torch-free runtime tests still run
    pass
