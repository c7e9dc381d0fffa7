"""The machine a benchmark runs on: the CPU, read from /proc/cpuinfo, for every report in bench/ (no other
import), and a process's resident memory with its trend, for the soak benchmarks.

Reports quote this line instead of a description written by hand: the machines this project runs on
change (an Intel Xeon with AMX one week, an AMD EPYC with AVX-512 and no AMX the next), and the vector
extensions decide which ONNX Runtime kernels run.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

# Extensions that change CPU inference kernels (INT8 dot products, bf16/int8 tiles).
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """E.g. "AMD EPYC, 2 logical CPUs; avx2 avx512f avx512_vnni; no AMX"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    present = [f for f in _FLAGS if f in flags]
    amx = "AMX" if any(f.startswith("amx") for f in present) else "no AMX"
    return f"{model}, {os.cpu_count()} logical CPUs; {' '.join(present) or 'no AVX2'}; {amx}"


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (VmRSS), NaN when /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute (0 with fewer than two points)."""
    if len(points) < 2:
        return 0.0
    ts, ys = zip(*points, strict=True)
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0
