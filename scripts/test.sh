#!/usr/bin/env bash
# The whole test suite: lint, then pytest. Extra arguments go to pytest (e.g. -k segmenter, -m "not slow").
#
# SAFETY: tests start ROS 2 nodes. DDS discovery is pinned to loopback, and where the kernel allows it the
# suite runs inside a fresh network namespace (unshare -rn) whose only interface is loopback, so no packet
# can leave this machine whatever a test does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 2; }

export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1   # Jazzy/Kilted read the first, Humble the second
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MUJOCO_GL=${MUJOCO_GL:-egl}
export ROS_LOG_DIR=${ROS_LOG_DIR:-$(mktemp -d)}

echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] pytest"
cmd=(.venv/bin/pytest -q --timeout=600 "$@")
if [ -z "${CONVERSEG_NO_NETNS:-}" ] && unshare -rn true 2>/dev/null; then
  exec unshare -rn bash -c 'ip link set lo up && exec "$@"' bash "${cmd[@]}"
fi
echo "[test] unshare -rn is not permitted here: running with ROS discovery pinned to LOCALHOST only" >&2
exec "${cmd[@]}"
