"""Run ROS 2 scenarios safely for tests/test_ros_node.py and bench/bench_ros_latency.py.

SAFETY: no process started from here may send DDS traffic anywhere but loopback. Every scenario runs in a
child process (pytest itself never calls rclpy.init) whose environment forces
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a distinct ROS_DOMAIN_ID, and, where unprivileged user
namespaces work, inside `unshare -rn` with only `lo` up: a network namespace with no route out.

This file is also the scenario runner: `python tests/ros_helpers.py SCENARIO JSON_ARGS` (inside the fence)
prints one line `RESULT <json>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

from converseg_ros.loopback import fenced, loopback_env, unshare_works

UNSHARE = unshare_works()


def ros_env(domain_id: int, log_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every ROS process started by the tests gets (see converseg_ros.loopback). With
    ``base`` (a sourced install space), its PYTHONPATH is kept as it is: no source tree is added."""
    env = loopback_env(domain_id, log_dir, base)
    if base is not None:
        env["PYTHONPATH"] = base["PYTHONPATH"]
    env.setdefault("OMP_NUM_THREADS", "1")  # a 2-core machine shared with other jobs
    return env


def run_scenario(
    name: str,
    *,
    domain_id: int,
    tmp_dir: str | Path,
    timeout: float = 180,
    base_env: dict | None = None,
    **kwargs,
) -> dict:
    """Run scenario ``name`` fenced; return its RESULT dict, or raise AssertionError with its output."""
    tmp_dir = Path(tmp_dir)
    kwargs["tmp_dir"] = str(tmp_dir)
    cmd = fenced([sys.executable, str(Path(__file__).resolve()), name, json.dumps(kwargs)])
    env = ros_env(domain_id, tmp_dir / "ros_log", base_env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(
        f"scenario {name} failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
        f"{proc.stderr[-6000:]}"
    )


def run_fence_check(*, domain_id: int, tmp_dir: str | Path, seconds: float = 4.0) -> dict:
    """Count UDP packets on loopback and on a veth interface while the demo camera node runs, inside a
    throwaway network namespace. Needs `unshare -rn`; nothing here can reach a real network."""
    assert UNSHARE, "the fence check needs unshare -rn"
    cmd = fenced(
        [sys.executable, str(Path(__file__).resolve()), "__fence__", json.dumps({"seconds": seconds})]
    )
    proc = subprocess.run(
        cmd, env=ros_env(domain_id, Path(tmp_dir) / "ros_log"), capture_output=True, text=True, timeout=120
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(
        f"fence check failed (rc={proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _fence_main(seconds: float) -> dict:
    import socket
    import struct

    ip = shutil.which("ip") or "/usr/sbin/ip"
    for args in (["link", "add", "cs0", "type", "veth", "peer", "name", "cs1"], ["addr", "add", "10.213.0.1/24", "dev", "cs0"],
                 ["link", "set", "cs0", "up"], ["link", "set", "cs1", "up"], ["route", "add", "224.0.0.0/4", "dev", "cs0"]):  # fmt: skip
        subprocess.run([ip, *args], check=True)
    sockets = {}
    for name in ("lo", "cs0"):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        sock.bind((name, 0))
        sock.setblocking(False)
        sockets[name] = sock
    counts = {"lo": 0, "cs0": 0}
    other = 0
    node = subprocess.Popen(
        [sys.executable, "-m", "converseg_ros.demo_camera", "--ros-args", "-p", "rate_hz:=5.0", "-p", "width:=64",
         "-p", "height:=48"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, sock in sockets.items():
            while True:
                try:
                    pkt = sock.recv(65535)
                except BlockingIOError:
                    break
                ethertype = struct.unpack("!H", pkt[12:14])[0]
                udp = (ethertype == 0x0800 and pkt[23] == 17) or (ethertype == 0x86DD and pkt[20] == 17)
                counts[name] += udp
                other += not udp and name == "cs0"
        time.sleep(0.01)
    node.send_signal(signal.SIGINT)
    node.wait(10)
    return {
        "control_udp_packets": counts["lo"],
        "localhost_udp_packets": counts["cs0"],
        "veth_non_udp": other,
    }


class Recorded:
    """Stands in for a launch action, substitution or description: keeps its arguments."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    @property
    def name(self) -> str:  # DeclareLaunchArgument(name, ...)
        return self.args[0]


def launch_stand_ins() -> dict[str, types.SimpleNamespace]:
    """Modules standing in for `launch` and `launch_ros` (not on PyPI), so that a launch file can be imported
    and what it builds inspected: each action records its arguments."""
    actions = ("DeclareLaunchArgument", "OpaqueFunction", "SetEnvironmentVariable")
    return {
        "launch": types.SimpleNamespace(LaunchDescription=Recorded),
        "launch.actions": types.SimpleNamespace(**{n: type(n, (Recorded,), {}) for n in actions}),
        "launch.substitutions": types.SimpleNamespace(EnvironmentVariable=Recorded),
        "launch_ros.actions": types.SimpleNamespace(Node=type("Node", (Recorded,), {})),
        "launch_ros.parameter_descriptions": types.SimpleNamespace(ParameterValue=Recorded),
    }


def import_launch_file(path: str | Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("segment_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# Everything below runs inside the fence (child process).
TINY_MODEL = {"random_model": "converseg_edge", "random_model_img_size": 128}


class Client:
    """The test's side of the wire: publishes frames and queries, collects masks, results, diagnostics."""

    def __init__(self, tmp_dir: str) -> None:
        import rclpy
        from converseg_ros.segment_node import IMAGE_TOPIC, OUTPUT_QOS, QUERY_QOS
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        rclpy.init()
        self.rclpy = rclpy
        self.tmp = Path(tmp_dir)
        self.node = rclpy.create_node("converseg_test_client")
        self.image_pub = self.node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
        self.compressed_pub = self.node.create_publisher(
            CompressedImage, IMAGE_TOPIC + "/compressed", qos_profile_sensor_data
        )
        self.query_pub = self.node.create_publisher(String, "/converseg/query", QUERY_QOS["latched"])
        self.masks: list[tuple[float, object]] = []  # (receive time.time(), msg)
        self.results: list[tuple[float, dict]] = []
        self.diagnostics: list[object] = []
        self.node.create_subscription(
            Image, "/converseg/mask", lambda m: self.masks.append((time.time(), m)), OUTPUT_QOS
        )
        self.node.create_subscription(
            String,
            "/converseg/result",
            lambda m: self.results.append((time.time(), json.loads(m.data))),
            OUTPUT_QOS,
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.overlays: list[object] = []
        self.node.create_subscription(Image, "/converseg/overlay", self.overlays.append, OUTPUT_QOS)
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_segment_node(self, params: dict, name: str = "segment") -> subprocess.Popen:
        from converseg_ros.launch_plan import params_file_text

        path = self.tmp / f"{name}.yaml"
        path.write_text(params_file_text("/**", params))
        return self.start(
            ["-m", "converseg_ros.segment_node", "--ros-args", "--params-file", str(path)], name
        )

    def log(self, name: str = "segment") -> str:
        return (self.tmp / f"{name}.log").read_text()

    def spin_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.rclpy.spin_once(self.node, timeout_sec=0.02)
        return predicate()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def wait_for_node(self, timeout: float = 90) -> None:
        ok = self.spin_until(
            lambda: (
                self.query_pub.get_subscription_count() > 0 and self.image_pub.get_subscription_count() > 0
            ),
            timeout,
        )
        assert ok, "segment node never subscribed:\n" + self.log()[-3000:]

    def query(self, text: str) -> None:
        from std_msgs.msg import String

        self.query_pub.publish(String(data=text))

    def raw_query(self, payload: bytes) -> None:
        """Publish a std_msgs/String whose bytes are ``payload`` (e.g. not UTF-8), as a C++ node could."""
        body = payload + b"\0"
        self.query_pub.publish(b"\x00\x01\x00\x00" + len(body).to_bytes(4, "little") + body)

    def frame(self, width=640, height=480, write_as="rgb8", sec=1, nanosec=0, frame_id="cam", **change):
        """Publish the synthetic scene at width x height written as ``write_as``; ``change`` overrides
        message fields (to make bad frames)."""
        from converseg_ros.demo_scene import synthetic_frames
        from converseg_ros.image_conversion import rgb_to_image_fields
        from sensor_msgs.msg import Image

        if width * height == 0:
            fields = dict(height=height, width=width, encoding=write_as, step=0, data=b"")
        else:
            if getattr(self, "_scene_key", None) != (width, height):
                self._scene = synthetic_frames(width, height, count=1)[0]
                self._scene_key = (width, height)
            fields = rgb_to_image_fields(self._scene, write_as)
        msg = Image(**(fields | change))
        msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, nanosec, frame_id
        self.image_pub.publish(msg)
        return msg

    def result_for(self, sec: int, nanosec: int = 0) -> dict | None:
        for _, doc in self.results:
            if doc["stamp"] == {"sec": sec, "nanosec": nanosec}:
                return doc
        return None

    def mask_for(self, sec: int, nanosec: int = 0):
        for _, m in self.masks:
            if (m.header.stamp.sec, m.header.stamp.nanosec) == (sec, nanosec):
                return m
        return None

    def send_until_answered(self, timeout: float = 30, **frame) -> tuple[object, dict]:
        """Publish the frame every 50 ms until its mask and result come back (best effort may drop some)."""
        sec, nanosec = frame.setdefault("sec", 1), frame.setdefault("nanosec", 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.frame(**frame)
            if self.spin_until(lambda: self.mask_for(sec, nanosec) and self.result_for(sec, nanosec), 0.05):
                return self.mask_for(sec, nanosec), self.result_for(sec, nanosec)
        raise AssertionError(f"no answer for frame {sec}.{nanosec}:\n" + self.log()[-3000:])

    def last_diagnostics(self) -> dict:
        if not self.diagnostics:
            return {}
        status = self.diagnostics[-1].status[0]
        return {"level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level),
                "message": status.message, **{kv.key: kv.value for kv in status.values}}  # fmt: skip

    def stop(self, proc: subprocess.Popen, timeout: float = 15) -> dict:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        return {"rc": rc, "seconds": round(time.monotonic() - t0, 2)}

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def mask_pixels(mask_msg) -> list[int]:
    import numpy as np

    labels = np.frombuffer(mask_msg.data, np.uint8)
    return np.bincount(labels, minlength=9).tolist()


def scenario_basic(c: Client, **_) -> dict:
    """Frames and queries in, masks and results out; query switching; every bad input; clean shutdown."""
    out: dict = {}
    proc = c.start_segment_node(TINY_MODEL | {"max_input_side": 1024, "diagnostics_period": 0.5})
    c.wait_for_node()
    c.query("the red mug")
    mask, doc = c.send_until_answered(sec=100, nanosec=5, frame_id="cam_a", width=640, height=480)
    out["a"] = dict(size=[mask.width, mask.height], encoding=mask.encoding, step=mask.step,
                    frame_id=mask.header.frame_id, data_len=len(mask.data), doc=doc, pixels=mask_pixels(mask))  # fmt: skip
    c.spin_until(lambda: any(o.header.frame_id == "cam_a" for o in c.overlays), 5)
    overlay = next((o for o in c.overlays if o.header.frame_id == "cam_a"), None)
    out["overlay"] = None if overlay is None else dict(size=[overlay.width, overlay.height], encoding=overlay.encoding,
                                                       step=overlay.step, data_len=len(overlay.data))  # fmt: skip
    mask, doc = c.send_until_answered(sec=101, frame_id="cam_b", width=320, height=240, write_as="bgr8")
    out["b"] = dict(
        size=[mask.width, mask.height], frame_id=mask.header.frame_id, doc=doc, pixels=mask_pixels(mask)
    )
    c.query("the blue bowl")
    c.spin_for(0.3)
    out["switched"] = c.send_until_answered(sec=102, width=320, height=240)[1]["queries"]
    c.query('{"op": "add", "queries": ["the knife"]}')
    c.spin_for(0.3)
    mask, doc = c.send_until_answered(sec=103, width=320, height=240)
    out["added"] = dict(queries=doc["queries"], pixels=mask_pixels(mask))
    c.query('{"op": "remove", "queries": ["the blue bowl"]}')
    c.spin_for(0.3)
    mask, doc = c.send_until_answered(sec=105, width=320, height=240)
    out["removed"] = dict(queries=doc["queries"], pixels=mask_pixels(mask))
    c.query('["the blue bowl", "the knife"]')
    c.spin_for(0.3)

    # Bad input: each one once, then a good frame must still come back.
    bad_frames = [
        dict(sec=200, width=32, height=24, encoding="yuv422"),
        dict(sec=201, width=32, height=24, data=bytes(100)),
        dict(sec=202, width=0, height=0),
        dict(sec=203, width=1100, height=2),
    ]
    for bad in bad_frames:  # spaced: best effort with depth 1 could otherwise lose one
        c.frame(**bad)
        c.spin_for(0.1)
    for text in ["", "   \t\n", "x" * 10_000]:
        c.query(text)
        c.spin_for(0.1)
    c.raw_query(b"mug \xff\xfe")
    c.spin_for(0.1)
    c.raw_query(b"ok\x00\xff")  # rclpy's typed String would read "ok" and segment it
    c.spin_for(0.1)
    c.query("{}")  # used to clear every request
    c.spin_for(0.5)
    out["after_bad"] = c.send_until_answered(sec=104, width=320, height=240)[1]["queries"]
    c.spin_until(lambda: "rejected.query_not_utf8" in c.last_diagnostics(), 5)
    out["diagnostics"] = c.last_diagnostics()
    out["answered_bad_frames"] = [s for s in range(200, 204) if c.result_for(s)]
    c.query('{"op": "clear"}')
    c.spin_for(0.5)
    for i in range(10):
        c.frame(sec=300 + i, width=320, height=240)
        c.spin_for(0.05)
    c.spin_for(0.5)
    out["after_clear"] = [s for s in range(300, 310) if c.result_for(s)]
    out["stop"] = c.stop(proc)
    out["log"] = c.log()[-6000:]
    return out


def scenario_stream(c: Client, seconds: float = 4.0, rate_hz: float = 30.0, **_) -> dict:
    """A camera at rate_hz: stale frames must be dropped, never queued."""
    # The model must be slower than the camera for frames to go stale. The 128 px model of the other
    # scenarios keeps up with 30 Hz on a quiet 2-core machine (seen 2026-12-01: 120 masks for 120 frames);
    # at 512 px one frame takes about 100-200 ms there.
    proc = c.start_segment_node(TINY_MODEL | {"random_model_img_size": 512, "diagnostics_period": 0.5})
    c.wait_for_node()
    c.query("the red mug")
    c.send_until_answered(sec=1)
    c.masks.clear()
    c.results.clear()
    sent = {}
    period = 1.0 / rate_hz
    t_start = time.monotonic()
    n = 0
    while time.monotonic() - t_start < seconds:
        n += 1
        now = time.time_ns()
        c.frame(sec=now // 10**9, nanosec=now % 10**9, frame_id=f"f{n}")
        sent[f"f{n}"] = now / 1e9
        c.spin_until(lambda: False, max(0.0, t_start + n * period - time.monotonic()))
    c.spin_for(1.0)
    masks = [(t, m.header.frame_id) for t, m in c.masks if m.header.frame_id in sent]
    ages = [t - sent[f] for t, f in masks if f in sent]
    model_ms = [d["latency_ms"]["model"] for _, d in c.results if d["frame_id"] in sent]
    queue_ms = [d["latency_ms"]["queue"] for _, d in c.results if d["frame_id"] in sent]
    c.spin_until(lambda: int(c.last_diagnostics().get("frames_dropped", 0)) > 0, 3)
    out = dict(sent=n, masks=len(masks), order=[int(f[1:]) for _, f in masks], ages_s=ages, model_ms=model_ms,
               queue_ms=queue_ms, diagnostics=c.last_diagnostics())  # fmt: skip
    out["stop"] = c.stop(proc)
    return out


def scenario_compressed(c: Client, **_) -> dict:
    import io

    from converseg_ros.demo_scene import synthetic_frames
    from PIL import Image as PILImage
    from sensor_msgs.msg import CompressedImage

    proc = c.start_segment_node(TINY_MODEL | {"image_transport": "compressed", "diagnostics_period": 0.5})
    ok = c.spin_until(lambda: c.compressed_pub.get_subscription_count() > 0, 90)
    assert ok, c.log()[-3000:]
    c.query("the red mug")
    buf = io.BytesIO()
    PILImage.fromarray(synthetic_frames(200, 100, count=1)[0]).save(buf, format="JPEG")
    good = buf.getvalue()

    def send(data: bytes, sec: int) -> None:
        msg = CompressedImage(format="jpeg", data=data)
        msg.header.stamp.sec = sec
        c.compressed_pub.publish(msg)

    def answered(sec):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            send(good, sec)
            if c.spin_until(lambda: c.mask_for(sec, 0) is not None, 0.1):
                return c.mask_for(sec, 0)
        raise AssertionError(c.log()[-3000:])

    first = answered(1)
    # Decoding happens on the worker, so a corrupt frame replaced by a newer one before decoding is only
    # dropped: space them out.
    send(good[: len(good) // 2], 2)  # truncated JPEG
    c.spin_for(0.7)
    send(b"\x89PNG garbage", 3)
    c.spin_for(0.7)
    second = answered(4)
    c.spin_until(lambda: "rejected.corrupt_compressed" in c.last_diagnostics(), 5)
    return dict(first=[first.width, first.height], second=[second.width, second.height],
                diagnostics=c.last_diagnostics(), stop=c.stop(proc))  # fmt: skip


def scenario_qos(c: Client, **_) -> dict:
    """Requests from every kind of publisher are answered, including one latched before the node started."""
    from rclpy.qos import (
        DurabilityPolicy,
        QoSProfile,
        ReliabilityPolicy,
        qos_profile_system_default,
    )
    from std_msgs.msg import String

    profiles = {
        # latched before the node exists: only a transient-local subscription can still get it
        "latched_before_start": QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        ),
        "default_volatile": QoSProfile(depth=10),  # what most user code creates
        "system_default": qos_profile_system_default,
        # `ros2 topic pub`: volatile on Jazzy and Kilted (= default_volatile, depth 1); transient local
        # with --qos-durability transient_local or where a distro defaults to it
        "topic_pub_volatile": QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE
        ),
        "topic_pub_transient_local": QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        ),
    }
    texts = {"latched_before_start": "the red mug", "default_volatile": "the blue bowl",
             "system_default": "the knife", "topic_pub_volatile": "the green apple",
             "topic_pub_transient_local": "the red mug"}  # fmt: skip
    publishers = {}
    first = "latched_before_start"
    publishers[first] = c.node.create_publisher(String, "/converseg/query", profiles[first])
    publishers[first].publish(String(data=texts[first]))
    c.spin_for(0.2)
    proc = c.start_segment_node(TINY_MODEL | {"diagnostics_period": 0.3})
    c.wait_for_node()
    out: dict = {"answered": {}}
    for sec, name in enumerate(profiles, start=1):
        if name != first:
            publishers[name] = c.node.create_publisher(String, "/converseg/query", profiles[name])
            c.spin_until(lambda n=name: publishers[n].get_subscription_count() > 0, 10)
            publishers[name].publish(String(data=texts[name]))
        deadline = time.monotonic() + 20
        queries = None
        while time.monotonic() < deadline:
            _, doc = c.send_until_answered(
                sec=100 * sec + int(time.monotonic() * 10) % 100, width=160, height=120
            )
            queries = [q["query"] for q in doc["queries"]]
            if queries == [texts[name]]:
                break
        out["answered"][name] = queries
        out.setdefault("matched", {})[name] = publishers[name].get_subscription_count()
    c.spin_until(lambda: int(c.last_diagnostics().get("duplicate_requests", 0)) > 0, 5)
    out["diagnostics"] = c.last_diagnostics()
    out["stop"] = c.stop(proc)
    out["log"] = c.log()[-6000:]
    return out


def _lifecycle_call(c: Client, transition: str, node: str = "converseg_segment") -> dict:
    """Ask the node for a lifecycle transition, as a lifecycle manager (or `ros2 lifecycle set`) does."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    change = c.node.create_client(ChangeState, f"/{node}/change_state")
    get = c.node.create_client(GetState, f"/{node}/get_state")
    assert change.wait_for_service(timeout_sec=30) and get.wait_for_service(timeout_sec=30)
    ok = None
    if transition:
        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}  # fmt: skip
        future = change.call_async(ChangeState.Request(transition=Transition(id=ids[transition])))
        c.spin_until(future.done, 60)
        ok = bool(future.result().success)
    future = get.call_async(GetState.Request())
    c.spin_until(future.done, 30)
    state = future.result().current_state.label
    c.node.destroy_client(change)
    c.node.destroy_client(get)
    return {"success": ok, "state": state}


def scenario_lifecycle(c: Client, **_) -> dict:
    """autostart:=false: a lifecycle manager drives the node; input while inactive is dropped and counted."""
    out: dict = {}
    proc = c.start_segment_node(TINY_MODEL | {"autostart": False, "diagnostics_period": 0.3})
    c.wait_for_node()
    out["start"] = _lifecycle_call(c, "")
    c.query("the red mug")  # latched: arrives now (dropped, counted) and again at activation
    for i in range(3):
        c.frame(sec=10 + i, width=160, height=120)
        c.spin_for(0.1)
    c.spin_until(lambda: int(c.last_diagnostics().get("rejected.node_inactive", 0)) >= 2, 5)
    out["unconfigured_diagnostics"] = c.last_diagnostics()
    out["configure"] = _lifecycle_call(c, "configure")
    out["activate"] = _lifecycle_call(c, "activate")
    _, doc = c.send_until_answered(sec=20, width=160, height=120)
    out["active_queries"] = [q["query"] for q in doc["queries"]]
    out["deactivate"] = _lifecycle_call(c, "deactivate")
    c.spin_for(0.5)
    c.results.clear()
    for i in range(5):
        c.frame(sec=30 + i, width=160, height=120)
        c.spin_for(0.1)
    c.spin_for(0.5)
    out["answered_while_inactive"] = len(c.results)
    c.spin_for(0.7)
    out["inactive_diagnostics"] = c.last_diagnostics()
    out["cleanup"] = _lifecycle_call(c, "cleanup")
    out["configure_again"] = _lifecycle_call(c, "configure")
    out["activate_again"] = _lifecycle_call(c, "activate")
    _, doc = c.send_until_answered(sec=40, width=160, height=120)
    out["queries_after_reactivation"] = [q["query"] for q in doc["queries"]]  # the latched request again
    out["stop"] = c.stop(proc)
    out["log"] = c.log()[-6000:]

    # A configure that fails: the node stays unconfigured and /diagnostics says why.
    c.diagnostics.clear()
    missing = Path(c.tmp) / "missing.pt"
    proc = c.start_segment_node({"model_path": str(missing), "autostart": False, "diagnostics_period": 0.3},
                                name="failing")  # fmt: skip
    c.wait_for_node()
    out["failed_configure"] = _lifecycle_call(c, "configure")
    c.spin_until(lambda: c.last_diagnostics().get("level") == 2, 5)
    out["failed_diagnostics"] = c.last_diagnostics()
    out["failed_stop"] = c.stop(proc)
    out["failed_log"] = c.log("failing")[-3000:]
    return out


def scenario_installed(c: Client, executable: str, **_) -> dict:
    """The segment_node executable of a colcon install space answers a request."""
    from converseg_ros.launch_plan import params_file_text

    import converseg_ros

    params = c.tmp / "installed.yaml"
    params.write_text(params_file_text("/**", TINY_MODEL))
    log = open(c.tmp / "segment.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [executable, "--ros-args", "--params-file", str(params)], stdout=log, stderr=subprocess.STDOUT
    )
    c.procs.append(proc)
    c.wait_for_node()
    c.query("the red mug")
    mask, doc = c.send_until_answered(sec=5, width=160, height=120)
    return dict(module=converseg_ros.__file__, queries=[q["query"] for q in doc["queries"]],
                size=[mask.width, mask.height], stop=c.stop(proc), log=c.log()[-3000:])  # fmt: skip


def scenario_load_failure(c: Client, **_) -> dict:
    """Models that cannot load: the node stays up, says why once, reports ERROR, counts frames."""
    out = {}
    engines = Path(c.tmp) / "engines_from_another_gpu"
    engines.mkdir(exist_ok=True)
    cases = {
        "missing_checkpoint": {"model_path": str(Path(c.tmp) / "missing.pt")},
        "tensorrt_engine": {"model_path": str(engines), "backend": "tensorrt"},
    }
    for name, params in cases.items():
        c.diagnostics.clear()
        proc = c.start_segment_node(params | {"diagnostics_period": 0.3}, name=name)
        c.wait_for_node(60)
        c.query("the red mug")
        for i in range(5):
            c.frame(sec=i + 1, width=64, height=48)
            c.spin_for(0.1)
        c.spin_until(lambda: int(c.last_diagnostics().get("rejected.model_unavailable", 0)) > 0, 10)
        out[name] = dict(alive=proc.poll() is None, diagnostics=c.last_diagnostics(), masks=len(c.masks))
        out[name]["stop"] = c.stop(proc)
        out[name]["log"] = c.log(name)[-3000:]
    return out


def _declared_parameters(c: Client, node: str) -> dict:
    """name -> {value, description, read_only} of every parameter ``node`` declares, asked over its
    parameter services as `ros2 param describe` does."""
    from rcl_interfaces.srv import DescribeParameters, GetParameters, ListParameters
    from rclpy.parameter import parameter_value_to_python

    def call(srv_type, service, request):
        client = c.node.create_client(srv_type, f"/{node}/{service}")
        assert client.wait_for_service(timeout_sec=60), f"/{node}/{service} never appeared"
        future = client.call_async(request)
        assert c.spin_until(future.done, 30), f"/{node}/{service} did not answer"
        c.node.destroy_client(client)
        return future.result()

    names = list(call(ListParameters, "list_parameters", ListParameters.Request()).result.names)
    values = call(GetParameters, "get_parameters", GetParameters.Request(names=names)).values
    described = call(DescribeParameters, "describe_parameters", DescribeParameters.Request(names=names))
    return {
        name: {
            "value": parameter_value_to_python(value),
            "description": d.description,
            "read_only": d.read_only,
        }
        for name, value, d in zip(names, values, described.descriptors, strict=True)
    }


def scenario_declared_parameters(c: Client, **_) -> dict:
    """Each node started with no parameters at all (one after the other, so that no frame reaches the
    model): what it declares, as a ROS client sees it."""
    out: dict = {"stop": []}
    for node, module in (("converseg_segment", "segment_node"), ("converseg_demo_camera", "demo_camera")):
        proc = c.start(["-m", f"converseg_ros.{module}"], module)
        out[node] = _declared_parameters(c, node)
        out["stop"].append(c.stop(proc)["rc"])
        out[f"{node}_log"] = c.log(module)[-3000:]
    return out


def scenario_bad_parameters(c: Client, **_) -> dict:
    """Invalid parameters stop the node at once with exit status 2 and a message naming the parameter."""
    out = {}
    for name, params in {"choice": {"backend": "caffe"}, "range": {"presence_threshold": 1.5},
                         "type": {"max_queries": "eight"}, "unknown": {"max_rate": 5.0}}.items():  # fmt: skip
        proc = c.start_segment_node(params, name=name)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        out[name] = {"rc": rc, "log": c.log(name)[-2000:]}
    return out


def scenario_launch(c: Client, **_) -> dict:
    """converseg-ros-launch with the demo camera: masks of the demo size come back; Ctrl-C stops all."""
    proc = c.start(
        ["-m", "converseg_ros.launch_main", "random_model:=converseg_edge", "random_model_img_size:=128",
         "demo_rate_hz:=10.0", "demo_width:=160", "demo_height:=120", "demo_query:=the blue bowl"],
        "launch",
    )  # fmt: skip
    ok = c.spin_until(lambda: len(c.results) > 0 and len(c.masks) > 0, 120)
    assert ok, c.log("launch")[-4000:]
    mask = c.masks[-1][1]
    doc = c.results[-1][1]
    return dict(size=[mask.width, mask.height], frame_id=mask.header.frame_id,
                queries=[q["query"] for q in doc["queries"]], stop=c.stop(proc, 20), log=c.log("launch")[-3000:])  # fmt: skip


# A node whose timer callback gets SIGINT twice (a terminal's and a launcher's) while running Python code,
# then, after spin, SIGTERM (a launcher escalating). Prints RESULT before that SIGTERM.
SIGNAL_CHILD = r"""
import json, os, signal, sys, time
import rclpy
from rclpy.executors import ExternalShutdownException
from converseg_ros.shutdown import install_shutdown_signals

signals = install_shutdown_signals()
rclpy.init()
node = rclpy.create_node("converseg_signal_test")
steps = []

def callback():
    steps.append("start")
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    t = time.monotonic()
    while time.monotonic() - t < 0.3:  # bytecode running: where a KeyboardInterrupt would land
        pass
    steps.append("end")

node.create_timer(0.05, callback)
outcome = "spin returned"
try:
    rclpy.spin(node)
except ExternalShutdownException:
    outcome = "ExternalShutdownException"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
node.destroy_node()
print("RESULT " + json.dumps({"outcome": outcome, "steps": steps, "received": signals.received}), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def scenario_signals(c: Client, **_) -> dict:
    """install_shutdown_signals: Ctrl-C never interrupts a callback; SIGTERM after it exits at once."""
    proc = c.start(["-c", SIGNAL_CHILD], "signals")
    t0 = time.monotonic()
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = round(time.monotonic() - t0, 2)
    log = c.log("signals")
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    child = json.loads(lines[-1][len("RESULT ") :]) if lines else None
    return {"rc": rc, "seconds": seconds, "child": child, "log": log[-3000:]}


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    assert os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "LOCALHOST", "refusing to run without LOCALHOST"
    if name == "__fence__":
        print("RESULT " + json.dumps(_fence_main(**kwargs)), flush=True)
        return
    client = Client(kwargs["tmp_dir"])
    try:
        result = globals()[f"scenario_{name}"](client, **kwargs)
    finally:
        client.close()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
