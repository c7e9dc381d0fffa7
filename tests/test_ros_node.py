"""The segment node over real rclpy (PyPI wheels), loopback only.

Each test runs one scenario of tests/ros_helpers.py in a child process with
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, its own ROS_DOMAIN_ID and, where the kernel allows, inside
`unshare -rn` (a network namespace with only `lo`). The model is converseg_edge with random weights at
128 px (512 px for the stream test, which needs a model slower than the camera), so the tests check
plumbing, formats and robustness, not segmentation quality.
"""

from __future__ import annotations

import importlib.util

import pytest
import ros_helpers

pytestmark = [
    pytest.mark.ros,
    pytest.mark.skipif(
        importlib.util.find_spec("rclpy") is None, reason="rclpy (ROS 2 wheels) not installed"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None, reason="the random-weight model needs PyTorch"
    ),
    pytest.mark.timeout(300),
]

# Distinct domains per test, away from 0 (the default on real robots).
DOMAINS = {
    "basic": 61, "stream": 62, "compressed": 63, "load_failure": 64, "launch": 65, "fence": 66, "bad_parameters": 67,
    "signals": 68, "qos": 69, "lifecycle": 70, "declared_parameters": 72,
}  # fmt: skip


def run(name: str, tmp_path, **kwargs) -> dict:
    return ros_helpers.run_scenario(name, domain_id=DOMAINS[name], tmp_dir=tmp_path, **kwargs)


def test_masks_results_queries_bad_input_and_shutdown(tmp_path):
    out = run("basic", tmp_path)
    a = out["a"]
    assert a["size"] == [640, 480] and a["encoding"] == "mono8" and a["step"] == 640
    assert a["data_len"] == 640 * 480 and a["frame_id"] == "cam_a"
    assert a["doc"]["stamp"] == {"sec": 100, "nanosec": 5} and a["doc"]["frame_id"] == "cam_a"
    assert [q["query"] for q in a["doc"]["queries"]] == ["the red mug"]
    assert out["overlay"] == {"size": [640, 480], "encoding": "rgb8", "step": 1920, "data_len": 640 * 480 * 3}
    assert out["b"]["size"] == [320, 240] and out["b"]["frame_id"] == "cam_b"
    for case in (a, out["b"]):
        (entry,) = case["doc"]["queries"]
        assert entry["area"] == case["pixels"][1]  # the mask's label-1 pixels are the query's area
        if not entry["present"]:
            assert entry["area"] == 0 and entry["box"] is None
    assert [q["query"] for q in out["switched"]] == ["the blue bowl"]
    added = out["added"]
    assert [q["query"] for q in added["queries"]] == ["the blue bowl", "the knife"]
    # area is each query's own mask; in the label image an overlap goes to one query, so labels <= areas.
    assert all(label <= q["area"] for q, label in zip(added["queries"], added["pixels"][1:3], strict=True))
    assert sum(added["pixels"][1:3]) >= max(q["area"] for q in added["queries"])
    assert sum(added["pixels"][3:]) == 0
    # Removing the bowl leaves the knife's label (2) as it was: robot code can keep using mask == 2.
    removed = out["removed"]
    assert [(q["query"], q["label"]) for q in removed["queries"]] == [("the knife", 2)]
    assert removed["pixels"][1] == 0 and removed["pixels"][2] == removed["queries"][0]["area"]

    # Bad input: none answered, all counted, the node still answers and logged each reason once.
    assert [q["query"] for q in out["after_bad"]] == ["the blue bowl", "the knife"]
    assert out["answered_bad_frames"] == []
    diag = out["diagnostics"]
    for reason in ("unsupported_encoding", "bad_data_length", "empty_image", "image_too_large"):
        assert int(diag[f"rejected.{reason}"]) >= 1, reason
    assert int(diag["rejected.empty_query"]) == 2
    assert int(diag["rejected.query_too_long"]) == 1 and int(diag["rejected.query_not_utf8"]) == 1
    assert int(diag["rejected.query_control_character"]) == 1 and int(diag["rejected.bad_query_json"]) == 1
    for key in ("fps", "latency_ms_median", "frames_dropped", "rejected_total", "frames_processed"):
        assert key in diag
    assert out["log"].count("empty_query:") == 1, "a reason is logged once"
    assert out["after_clear"] == []

    assert out["stop"]["rc"] == 0 and out["stop"]["seconds"] < 10
    assert "Traceback" not in out["log"]


def test_stale_frames_are_dropped_under_a_30_hz_stream(tmp_path):
    out = run("stream", tmp_path, seconds=4.0, rate_hz=30.0)
    assert out["sent"] >= 60
    assert 0 < out["masks"] < out["sent"], "the model is slower than 30 Hz here: frames must be dropped"
    assert int(out["diagnostics"]["frames_dropped"]) > 0
    assert out["order"] == sorted(out["order"]), "masks come out in camera order"
    # No backlog: a frame waits in the mailbox at most about one model interval (plus scheduling slack on a
    # shared 2-core machine), so a published mask is never older than about two model intervals.
    model = sorted(out["model_ms"])[len(out["model_ms"]) // 2]
    assert max(out["queue_ms"]) < 2 * max(out["model_ms"]) + 100
    assert max(out["ages_s"]) * 1e3 < 3 * max(out["model_ms"]) + 250, (model, out["ages_s"])
    assert out["stop"]["rc"] == 0


def test_compressed_transport_and_corrupted_payloads(tmp_path):
    out = run("compressed", tmp_path)
    assert out["first"] == [200, 100] and out["second"] == [200, 100]
    assert int(out["diagnostics"]["rejected.corrupt_compressed"]) == 2
    assert out["stop"]["rc"] == 0


def test_models_that_fail_to_load_leave_the_node_up_and_reporting(tmp_path):
    out = run("load_failure", tmp_path)
    for name, case in out.items():
        assert case["alive"], name
        assert case["diagnostics"]["level"] == 2, name  # ERROR
        assert "model failed to load" in case["diagnostics"]["message"], name
        assert int(case["diagnostics"]["rejected.model_unavailable"]) >= 1, name
        assert case["masks"] == 0
        assert case["log"].count("model failed to load") == 1, name
        assert "ready" not in case["log"] and "active:" not in case["log"], name  # never claims to be up
        assert case["stop"]["rc"] == 0, name
    assert "model_path" in out["missing_checkpoint"]["diagnostics"]["message"]
    assert "TensorRT" in out["tensorrt_engine"]["diagnostics"]["message"]


def test_requests_from_every_publisher_qos_are_answered(tmp_path):
    """Volatile (default QoS, `ros2 topic pub` on Jazzy/Kilted) and transient-local publishers all match, and
    a request latched before the node started is answered. The old transient-local-only subscription matched
    no volatile publisher ("offering incompatible QoS")."""
    out = run("qos", tmp_path)
    expected = {"latched_before_start": ["the red mug"], "default_volatile": ["the blue bowl"],
                "system_default": ["the knife"], "topic_pub_volatile": ["the green apple"],
                "topic_pub_transient_local": ["the red mug"]}  # fmt: skip
    assert out["answered"] == expected, out["log"]
    assert all(n >= 1 for n in out["matched"].values()), out["matched"]
    assert "incompatible" not in out["log"].lower()
    # Transient-local publishers reach both subscriptions: the copy is skipped, not applied twice.
    assert int(out["diagnostics"]["duplicate_requests"]) >= 1
    assert out["stop"]["rc"] == 0


def test_lifecycle_transitions_driven_by_a_manager(tmp_path):
    out = run("lifecycle", tmp_path)
    assert out["start"]["state"] == "unconfigured"
    diag = out["unconfigured_diagnostics"]
    assert diag["lifecycle_state"] == "unconfigured" and int(diag["rejected.node_inactive"]) >= 2
    assert int(diag["frames_processed"]) == 0
    for step, state in (("configure", "inactive"), ("activate", "active"), ("deactivate", "inactive"),
                        ("cleanup", "unconfigured"), ("configure_again", "inactive"), ("activate_again", "active")):  # fmt: skip
        assert out[step] == {"success": True, "state": state}, (step, out["log"])
    assert out["active_queries"] == ["the red mug"]  # the latched request, delivered at activation
    assert out["answered_while_inactive"] == 0
    assert out["inactive_diagnostics"]["lifecycle_state"] == "inactive"
    assert int(out["inactive_diagnostics"]["rejected.node_inactive"]) > int(diag["rejected.node_inactive"])
    assert out["queries_after_reactivation"] == ["the red mug"]
    assert out["stop"]["rc"] == 0 and "Traceback" not in out["log"]
    # A transition that fails leaves the node unconfigured, saying why.
    assert out["failed_configure"] == {"success": False, "state": "unconfigured"}
    failed = out["failed_diagnostics"]
    assert (
        failed["level"] == 2
        and "model failed to load" in failed["message"]
        and "model_path" in failed["message"]
    )
    assert out["failed_stop"]["rc"] == 0 and "Traceback" not in out["failed_log"]


def test_invalid_parameters_exit_2_naming_the_parameter(tmp_path):
    out = run("bad_parameters", tmp_path)
    for name, parameter in (("choice", "backend"), ("range", "presence_threshold"), ("type", "max_queries"),
                            ("unknown", "unknown parameters ['max_rate']")):  # fmt: skip
        assert out[name]["rc"] == 2, out[name]["log"]
        assert parameter in out[name]["log"] and "Traceback" not in out[name]["log"], out[name]["log"]


def test_each_node_declares_its_table_with_defaults_and_the_launch_descriptions(tmp_path):
    """What a ROS client sees (`ros2 param describe`) is the table: every entry declared, read-only, with
    its default and ParamSpec.help, the text the launch file and converseg-ros-launch --help give too."""
    from converseg_ros.params import DemoCameraSettings, SegmentSettings

    out = run("declared_parameters", tmp_path)
    for table in (SegmentSettings, DemoCameraSettings):
        declared = out[table.node_name]
        ours = {name: d for name, d in declared.items() if name not in ROS_OWN_PARAMETERS}
        assert set(ours) == {spec.name for spec in table.specs()}, out[f"{table.node_name}_log"]
        for spec in table.specs():
            assert ours[spec.name] == {"value": spec.default, "description": spec.help, "read_only": True}
            assert type(ours[spec.name]["value"]) is spec.type, spec.name
    assert out["stop"] == [0, 0]


# Parameters rclpy declares on every node by itself.
ROS_OWN_PARAMETERS = {"use_sim_time", "start_type_description_service"}


def test_launch_entry_point_runs_demo_camera_and_segment_node(tmp_path):
    out = run("launch", tmp_path)
    assert out["size"] == [160, 120] and out["frame_id"] == "demo_camera"
    assert out["queries"] == ["the blue bowl"]
    assert out["stop"]["rc"] == 0, out["log"]


def test_ctrl_c_never_interrupts_a_callback_and_sigterm_after_it_exits_at_once(tmp_path):
    """Python's own SIGINT handler raised KeyboardInterrupt wherever the node happened to be (inside a callback,
    or holding a lock its shutdown then waits for). install_shutdown_signals leaves the stop to rclpy."""
    out = run("signals", tmp_path)
    child = out["child"]
    assert child is not None, out["log"]
    assert child["outcome"] in ("ExternalShutdownException", "spin returned"), out["log"]  # a clean stop
    steps = child["steps"]
    assert steps[:2] == ["start", "end"] and steps.count("start") == steps.count("end"), steps
    assert child["received"] == [2, 2]  # the repeated SIGINT was recorded, not acted on
    assert out["rc"] == 128 + 15 and out["seconds"] < 25, out  # SIGTERM after SIGINT: no 30 s sleep


@pytest.mark.skipif(not ros_helpers.UNSHARE, reason="needs unprivileged user and network namespaces")
def test_no_dds_packet_leaves_loopback(tmp_path):
    """With LOCALHOST and the bundled Fast DDS profile, a node sends nothing on a non-loopback interface
    (a veth inside a throwaway namespace stands in for the robot's network)."""
    out = ros_helpers.run_fence_check(domain_id=DOMAINS["fence"], tmp_dir=tmp_path)
    assert out["control_udp_packets"] > 0, "the sniffer must see the DDS traffic on loopback"
    assert out["localhost_udp_packets"] == 0
