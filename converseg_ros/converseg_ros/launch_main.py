"""converseg-ros-launch: what `ros2 launch converseg_ros segment.launch.py ARG:=VALUE...` does, without
the `launch` packages (which are not on PyPI).

    converseg-ros-launch                              # demo camera + segment node
    converseg-ros-launch camera:=/realsense/color/image_raw model_path:=/engines backend:=tensorrt
    converseg-ros-launch --help                       # every argument with default and description

Each node runs in its own process (as under `ros2 launch`); Ctrl-C or SIGTERM stops them all, and when
one exits the others are stopped. The exit status is the first non-zero status of a node.
This sets FASTDDS_DEFAULT_PROFILES_FILE (if unset) but not ROS_AUTOMATIC_DISCOVERY_RANGE: a robot needs
discovery across hosts; tests, benchmarks and demos on a shared machine set LOCALHOST themselves.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .launch_plan import LaunchPlan, environment_with_profile, make_plan, params_file_text
from .params import LAUNCH_ARGUMENTS


def usage() -> str:
    lines = [__doc__.strip(), "", "arguments (name:=value):"]
    for spec in LAUNCH_ARGUMENTS:
        choices = f" [{'|'.join(spec.choices)}]" if spec.choices else ""
        lines.append(f"  {spec.name}:={spec.default!r}{choices}\n      {spec.description}")
    return "\n".join(lines)


def parse_argv(argv: list[str]) -> dict[str, str]:
    arguments = {}
    for token in argv:
        name, sep, value = token.partition(":=")
        if not sep or not name:
            raise ValueError(f"expected name:=value, got {token!r} (see --help)")
        arguments[name] = value
    return arguments


def commands(plan: LaunchPlan, workdir: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of each process to start; parameters go through --params-file to keep their types."""
    procs = []
    seg_params = workdir / "converseg_segment.yaml"
    seg_params.write_text(params_file_text("/**", plan.segment_parameters), encoding="utf-8")
    seg = [sys.executable, "-m", "converseg_ros.segment_node", "--ros-args", "--log-level", plan.log_level]
    seg += ["--params-file", str(seg_params)]
    for old, new in plan.remappings:
        seg += ["-r", f"{old}:={new}"]
    procs.append(("segment", seg))
    if plan.demo:
        demo_params = workdir / "converseg_demo_camera.yaml"
        demo_params.write_text(params_file_text("/**", plan.demo_parameters), encoding="utf-8")
        demo = [
            sys.executable,
            "-m",
            "converseg_ros.demo_camera",
            "--ros-args",
            "--log-level",
            plan.log_level,
        ]
        procs.append(("demo_camera", demo + ["--params-file", str(demo_params)]))
    return procs


def run(plan: LaunchPlan) -> int:
    env = environment_with_profile()
    with tempfile.TemporaryDirectory(prefix="converseg-launch-") as tmp:
        children = [(name, subprocess.Popen(argv, env=env)) for name, argv in commands(plan, Path(tmp))]
        stopping = False

        def stop(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for _, child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = 0
            while any(child.poll() is None for _, child in children):
                for name, child in children:
                    code = child.poll()
                    if code is not None and not stopping:
                        print(
                            f"[converseg-ros-launch] {name} exited with {code}; stopping the others",
                            flush=True,
                        )
                        status = status or code
                        stop(signal.SIGINT, None)
                time.sleep(0.1)
            deadline = time.monotonic() + 10.0
            for _, child in children:
                try:
                    child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                status = status or (child.returncode if child.returncode and child.returncode > 0 else 0)
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        plan = make_plan(parse_argv(argv))
    except ValueError as exc:
        print(f"converseg-ros-launch: {exc}", file=sys.stderr)
        return 2
    return run(plan)


if __name__ == "__main__":
    raise SystemExit(main())
