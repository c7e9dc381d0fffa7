"""The CPU a benchmark ran on, read from /proc/cpuinfo, for every report in bench/ (no other import).

Reports quote this line instead of a description written by hand: the machines this project runs on
change (an Intel Xeon with AMX one week, an AMD EPYC with AVX-512 and no AMX the next), and the vector
extensions decide which ONNX Runtime kernels run.
"""

from __future__ import annotations

import os
import platform
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
