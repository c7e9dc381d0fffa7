"""Every command in README.md and docs/*.md names a script that exists and flags that script has.

The commands are read from fenced code blocks and inline code that start with a program this repository
provides (python scripts and modules, converseg, converseg-ros-launch, bash scripts/, pytest, colcon build).
Each script's own ``--help`` is the reference for its flags, so a renamed flag fails here instead of in a
user's first minute. Commands that write benchmark or report files must not write into docs/ (the tracked
copies): they write to an output folder, and the docs say how to update their copy. The README's main-job
command and Python example are run for real by tests/test_readme.py.

Not checked here (not installable on this machine): ros2, docker, apt, trtexec, nvidia tools.
docs/TRAINING_RUNS.md is a log of runs as they were made and is left as written.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "TRAINING_RUNS.md")]
SEPARATORS = {"&&", "||", "|", ";", "&"}
OUTPUT_FLAGS = {"--out", "--markdown", "--json", "--report", "--out-dir"}


def command_lines(text: str) -> list[str]:
    """Shell lines of fenced code blocks (bash, sh or no language) and inline code spans."""
    lines, block, language = [], None, ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            if block is None:
                block, language = [], stripped[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell", "console"):
                    lines += join_continuations(block)
                block = None
            continue
        if block is not None:
            block.append(raw)
        else:
            lines += re.findall(r"`([^`\n]+)`", raw)
    return lines


def join_continuations(block: list[str]) -> list[str]:
    out, current = [], ""
    for line in block:
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def split_commands(line: str) -> list[list[str]]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for token in tokens:
        if token in SEPARATORS or token.startswith((">", "2>", "<")):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for command in commands:
        while command and (
            re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]) or command[0] in ("nohup", "time", "exec")
        ):
            command = command[1:]
        if command:
            out.append(command)
    return out


def target(command: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(argv prefix that prints the program's --help, the arguments given to it), or None if not ours."""
    program = Path(command[0]).name
    if program in ("python", "python3"):
        if len(command) > 2 and command[1] == "-m":
            return (sys.executable, "-m", command[2]), command[3:]
        if len(command) > 1 and command[1].endswith(".py"):
            return (sys.executable, command[1]), command[2:]
        return None
    if program == "converseg" and len(command) > 1 and not command[1].startswith("-"):
        return (sys.executable, "-m", "converseg_core.cli", command[1]), command[2:]
    if program == "colcon" and "build" in command:
        colcon = shutil.which("colcon") or str(Path(sys.executable).with_name("colcon"))
        index = command.index("build")
        return (colcon, *command[1 : index + 1]), command[index + 1 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in command_lines(path.read_text()):
            for command in split_commands(line):
                found.append((f"{path.relative_to(REPO)}: {line.strip()}", command))
    return found


COMMANDS = documented_commands()
OURS = [(where, command) for where, command in COMMANDS if target(command) is not None]


@functools.cache
def help_flags(prefix: tuple[str, ...]) -> frozenset[str] | str:
    """The flags the program's --help lists, or the error it gave."""
    if (
        prefix[1:2] != ("-m",)
        and len(prefix) > 1
        and prefix[1].endswith(".py")
        and not (REPO / prefix[1]).is_file()
    ):
        return f"{prefix[1]} does not exist"
    if not Path(prefix[0]).exists():
        return "skip"
    done = subprocess.run([*prefix, "--help"], cwd=REPO, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        return f"--help exited {done.returncode}: {done.stderr[-500:]}"
    if "(not available here:" in done.stdout:  # e.g. the pinned data engine in a clone without its history
        return "skip"
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z0-9][-A-Za-z0-9_]*", done.stdout))


def test_the_docs_have_commands_to_check():
    assert len(OURS) >= 40, len(OURS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("where", "command"), OURS, ids=[f"{i:03d}" for i in range(len(OURS))])
def test_documented_command_uses_existing_flags(where, command):
    prefix, arguments = target(command)
    if arguments and re.fullmatch(r"[a-z][a-z_-]*", arguments[0]):  # a sub-command: its own --help
        sub = help_flags((*prefix, arguments[0]))
        if not isinstance(sub, str):
            prefix, arguments = (*prefix, arguments[0]), arguments[1:]
    flags = help_flags(prefix)
    if flags == "skip":
        pytest.skip(f"{prefix[-1]}: not installed, or its --help says part of it is unavailable here")
    assert not isinstance(flags, str), f"{where}\n{flags}"
    used = [a.split("=", 1)[0] for a in arguments if a.startswith("--") and a != "--"]
    unknown = [flag for flag in used if flag not in flags]
    assert not unknown, f"{where}\nflags not in `{' '.join(prefix[1:])} --help`: {unknown}"
    for flag, value in zip(arguments, arguments[1:], strict=False):
        if flag in OUTPUT_FLAGS:
            assert not value.startswith("docs/"), f"{where}\nwrites into the tracked docs/: {value}"


@pytest.mark.parametrize(
    ("where", "command"), [c for c in COMMANDS if Path(c[1][0]).name in ("bash", "sh", "pytest")]
)
def test_documented_scripts_and_test_files_exist(where, command):
    for argument in command[1:]:
        if argument.endswith((".sh", ".py")) or argument.startswith("tests/"):
            assert list(REPO.glob(argument.split("::")[0])), f"{where}: {argument}"


def test_converseg_ros_launch_arguments_in_the_docs_exist():
    from converseg_ros.params import LAUNCH_ARGUMENTS

    names = {spec.name for spec in LAUNCH_ARGUMENTS}
    for where, command in COMMANDS:
        if Path(command[0]).name == "converseg-ros-launch" or command[1:3] == [
            "-m",
            "converseg_ros.launch_main",
        ]:
            for argument in command[1:]:
                if ":=" in argument:
                    assert argument.split(":=", 1)[0] in names, f"{where}: {argument}"
