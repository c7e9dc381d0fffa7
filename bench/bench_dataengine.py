"""Benchmark the data engine end to end: `python bench/bench_dataengine.py --scenes 1000 --workers 2`.

Runs the real CLI in a subprocess (worker start-up, rendering, PNG writing and the final index included),
and reports wall time, scenes per second, the median time of one scene inside a worker, and how loaded
the machine was (load average before and after: this machine's cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a source checkout
from bench.machine import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_once(scenes: int, workers: int, seed: int, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "training.dataengine",
        "--out",
        str(out),
        "--scenes",
        str(scenes),
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--quiet",
        *extra,
    ]
    load0 = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1 = os.getloadavg()
    # CPU seconds of the CLI and its pool workers: independent of how busy the shared machine was
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"data engine failed with exit code {proc.returncode}: {' '.join(cmd)}")
    index = json.loads((out / "index.json").read_text())
    medians = []
    for shard in index["shards"]:
        done = json.loads((out / shard / "DONE").read_text())
        if done.get("median_scene_s") is not None:
            medians.append(done["median_scene_s"])
    medians.sort()
    return {
        "command": " ".join(["python", *cmd[1:]]).replace(str(out), "OUT"),
        "scenes": scenes,
        "workers": workers,
        "wall_s": round(wall, 1),
        "scenes_per_s": round(scenes / wall, 2),
        "cpu_s_total": round(cpu, 1),
        "cpu_s_per_scene": round(cpu / scenes, 3),
        # what the same work takes when `workers` cores are free for it (start-up included)
        "wall_s_if_cores_idle_estimate": round(cpu / max(1, workers), 1),
        "median_scene_s_in_worker": medians[len(medians) // 2] if medians else None,
        "samples": index["samples"],
        "rejected_per_reason": index["rejected_per_reason"],
        "loadavg_1m_before": round(load0[0], 2),
        "loadavg_1m_after": round(load1[0], 2),
        "loadavg_5m_after": round(load1[1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenes", type=int, nargs="+", default=[100, 1000], help="scene counts to time, one run each"
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument(
        "--keep", type=Path, default=None, help="keep the output under this folder (default: deleted)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the data engine")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    results = []
    for n in args.scenes:
        base = args.keep or Path(tempfile.mkdtemp(prefix="bench_dataengine_"))
        out = base / f"de{n}"
        if out.exists():
            shutil.rmtree(out)
        results.append(run_once(n, args.workers, args.seed, out, extra))
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(results[-1]), flush=True)
    import mujoco

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_description()}, {platform.platform()}",
        "python": platform.python_version(),
        "mujoco": mujoco.__version__,
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "(auto: egl, else osmesa)"),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    print(
        "| scenes | workers | wall (s) | scenes/s | median scene in worker (s) | CPU s/scene "
        "| wall if cores idle (est., s) | load 1m before/after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenes']} | {r['workers']} | {r['wall_s']} | {r['scenes_per_s']} | "
            f"{r['median_scene_s_in_worker']} | {r['cpu_s_per_scene']} | {r['wall_s_if_cores_idle_estimate']} | "
            f"{r['loadavg_1m_before']} / {r['loadavg_1m_after']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
