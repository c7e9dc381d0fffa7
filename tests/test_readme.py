"""The README's first-minute commands, run as written: the main-job command and the Python example.

`bash scripts/setup.sh` and `bash scripts/test.sh` are what CI runs (.ci/run), so they are run as written
by every CI job. tests/test_docs_commands.py checks the flags of every other documented command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (REPO / "converseg_core" / "assets" / "converseg_edge.pt").is_file(), reason="no bundled model"
    ),
]


def venv_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # what `source .venv/bin/activate` puts first
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}


def test_the_main_job_command_runs_as_written(tmp_path):
    (line,) = [ln for ln in README.splitlines() if ln.startswith("converseg segment ")]
    image = re.search(r"--image (\S+)", line).group(1)
    assert (REPO / image).is_file(), f"the README's example image {image} is not in the repository"
    assert (REPO / image).stat().st_size < 200_000, "keep the example image small"
    # A fresh working folder that sees the repository's docs/, so the outputs land in tmp_path.
    (tmp_path / "docs").symlink_to(REPO / "docs")
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=venv_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    for name in ("mask.png", "overlay.png"):
        with Image.open(tmp_path / name) as written:
            assert written.size == Image.open(REPO / image).size, name
    assert '"query": "hand me something to drink from"' in done.stdout


def test_the_python_example_runs_from_any_folder(tmp_path):
    block = re.search(r"In Python:\n```python\n(.*?)```", README, re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=venv_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["the", "something"], done.stdout  # one line per query
