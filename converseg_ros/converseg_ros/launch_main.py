"""converseg-ros-launch: what `ros2 launch converseg_ros segment.launch.py ARG:=VALUE...` does, without
the `launch` packages (which are not on PyPI). colcon installs it as lib/converseg_ros/converseg-ros-launch;
after `. install/setup.sh` it also runs as `python -m converseg_ros.launch_main`.

    python -m converseg_ros.launch_main               # demo camera + segment node
    python -m converseg_ros.launch_main camera:=/realsense/color/image_raw model_path:=/engines backend:=tensorrt
    python -m converseg_ros.launch_main --help        # every argument with default and description

Each node runs in its own process (as under `ros2 launch`); Ctrl-C or SIGTERM stops them all, and when
one exits the others are stopped. A node still running 10 s after SIGINT gets SIGTERM, 5 s later SIGKILL
(ros2 launch escalates the same way), and is named on stdout. The exit status is the first non-zero status
of a node, or 1 when a node had to be escalated.
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
    lines = [__doc__.strip(), "", "arguments (name:=default), as launch/segment.launch.py declares them:"]
    for spec in LAUNCH_ARGUMENTS:
        lines.append(f"  {spec.name}:={spec.text()}\n      {spec.help}")
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


# As ros2 launch does: SIGINT, then SIGTERM to a node still running after SIGTERM_AFTER_S, then SIGKILL.
SIGTERM_AFTER_S = 10.0
SIGKILL_AFTER_S = 5.0


def supervise(
    commands: list[tuple[str, list[str]]],
    env: dict[str, str],
    *,
    sigterm_after: float = SIGTERM_AFTER_S,
    sigkill_after: float = SIGKILL_AFTER_S,
) -> int:
    """Run each (name, argv) as a child until one exits or this process gets SIGINT/SIGTERM, then stop them all.

    Returns the first non-zero exit status of a node, or 1 when a node had to be sent SIGTERM or SIGKILL
    (a node that does not stop on SIGINT is a bug worth a failing status). Never waits without bound.
    """
    children = [(name, subprocess.Popen(argv, env=env)) for name, argv in commands]
    stop_since: float | None = None
    status = 0

    def request_stop(_signum: int = signal.SIGINT, _frame: object = None) -> None:
        nonlocal stop_since
        if stop_since is None:
            stop_since = time.monotonic()
            for _, child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)

    def escalate(sig: signal.Signals, after: float) -> None:
        nonlocal status
        for name, child in children:
            if child.poll() is None:
                print(f"[converseg-ros-launch] {name} still running {after:.0f} s after SIGINT: sending {sig.name}",
                      flush=True)  # fmt: skip
                child.send_signal(sig)
                status = status or 1

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sent = set()
        while any(child.poll() is None for _, child in children):
            if stop_since is None:
                for name, child in children:
                    if child.poll() is not None:
                        print(f"[converseg-ros-launch] {name} exited with {child.returncode}; stopping the others",
                              flush=True)  # fmt: skip
                        code = child.returncode
                        status = status or (code if code > 0 else 1 if code < 0 else 0)  # <0: killed
                        request_stop()
                        break
            else:
                waited = time.monotonic() - stop_since
                if waited > sigterm_after and signal.SIGTERM not in sent:
                    sent.add(signal.SIGTERM)
                    escalate(signal.SIGTERM, sigterm_after)
                if waited > sigterm_after + sigkill_after and signal.SIGKILL not in sent:
                    sent.add(signal.SIGKILL)
                    escalate(signal.SIGKILL, sigterm_after + sigkill_after)
            time.sleep(0.05)
        for _, child in children:  # a node that failed while the others were stopping
            status = status or (child.returncode if child.returncode > 0 else 0)
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, child in children:  # only after an exception here: never leave a node behind
            if child.poll() is None:
                child.kill()
                child.wait()


def run(plan: LaunchPlan) -> int:
    env = environment_with_profile()
    with tempfile.TemporaryDirectory(prefix="converseg-launch-") as tmp:
        return supervise(commands(plan, Path(tmp)), env)


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
