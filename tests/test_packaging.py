"""What `pip install` puts into site-packages, and what the robot images hold.

The wheel installs two top-level packages named after the project (converseg_core, and converseg_export from
the export/ folder; colcon installs converseg_ros), never a generic `training` or `export`; training/ runs from
a source checkout (`python -m training.<tool>` from the repository root). The robot images hold the runtime: core, backends,
the engine builder, the ROS node and its launch file, not the training tree.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGES = SETUPTOOLS["packages"]
DOCKERFILES = sorted(p for p in (REPO / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore")


def package_folder(package: str) -> Path:
    """The folder setuptools installs `package` from (package-dir mapping, else the dotted path)."""
    mapping = SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return REPO / mapping[prefix] / Path(*parts[cut:])
    return REPO / Path(*parts)


def test_site_packages_gets_only_names_of_this_project():
    tops = {p.split(".")[0] for p in PACKAGES}
    assert tops == {"converseg_core", "converseg_export"}
    assert package_folder("converseg_export") == REPO / "export"


def test_every_sub_package_of_an_installed_folder_is_listed():
    """packages is a hand-written list: a new sub-package missing from it would be absent from the wheel."""
    for package in PACKAGES:
        folder = package_folder(package)
        assert (folder / "__init__.py").is_file(), f"{package}: no {folder / '__init__.py'}"
        for child in folder.iterdir():
            if (child / "__init__.py").is_file():
                assert f"{package}.{child.name}" in PACKAGES, f"{child} is not in [tool.setuptools] packages"


def test_console_scripts_point_at_installed_functions():
    tops = {p.split(".")[0] for p in PACKAGES}
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, _, function = target.partition(":")
        assert module.split(".")[0] in tops, f"{name}: {module} is not installed"
        parent, _, leaf = module.rpartition(".")
        source = package_folder(parent) / f"{leaf}.py"
        tree = ast.parse(source.read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{name}: {target}"


def test_installed_code_does_not_edit_sys_path():
    """Scripts run by path (python export/build_trt.py) find their imports because the project is installed."""
    for folder in ("converseg_core", "export"):
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_robot_images_hold_the_runtime_only(dockerfile):
    copied = set(re.findall(r"^COPY (?:--\S+ )*(\S+)", dockerfile.read_text(), re.M))
    assert "training" not in copied
    assert {"converseg_core", "export", "converseg_ros", "launch"} <= copied
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    assert "!training/**" not in ignore


def test_the_entrypoint_builds_engines_with_the_installed_tool():
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert "converseg-build-trt --onnx-dir" in entrypoint
    assert "export/build_trt.py --" not in entrypoint  # the source tree is not what runs on the robot
    assert "converseg-build-trt" in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("script", ["build_trt.py", "export_onnx.py", "verify.py"])
def test_export_scripts_run_by_path_from_any_folder(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(REPO / "export" / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
