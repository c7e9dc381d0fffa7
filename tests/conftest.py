import os

# Offline, deterministic, and polite on a 2-core machine shared with other jobs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# SAFETY: any test that starts ROS 2 must keep DDS discovery on loopback (see docs/ROS.md).
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # Iron and later
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")  # Humble

try:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
except ImportError:  # the torch-free runtime tests still run
    pass
