"""The pinned data engine renders the recorded v3 sets again from git history, and says when it cannot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.dataengine import pinned
from training.dataengine.assets import furniture_available
from training.dataengine.errors import DataEngineError


def has_history() -> bool:
    done = subprocess.run(
        ["git", "-C", str(pinned.ROOT), "cat-file", "-e", f"{pinned.PINS['v3'].commit}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


needs_v3 = pytest.mark.skipif(
    not (furniture_available() and has_history()),
    reason="needs sweethome3d-furniture (scripts/setup.sh) and the repository's git history (a full clone)",
)

# the v3 test set's flags, its first two scenes only
V3_TEST_FLAGS = list(pinned.V3_TEST_ARGS)
V3_TEST_FLAGS[V3_TEST_FLAGS.index("--scenes") + 1] = "2"


@needs_v3
def test_the_v3_engine_renders_the_recorded_v3_test_scenes_and_flags_a_set_that_differs(tmp_path, capsys):
    out = tmp_path / "v3"
    args = ["--engine", "v3", "--out", str(out), *V3_TEST_FLAGS, "--workers", "0", "--quiet"]
    assert pinned.main(args) == 0
    assert "identical to the recorded v3 set" in capsys.readouterr().out
    lines = (out / "dataset.jsonl").read_text().splitlines()
    assert len(lines) == 28
    assert json.loads(lines[0])["prompt"] == "Robot, segment the kitchen scale on the table."

    # The same folder again is a resume (nothing to render) that checks the bytes again: a set that differs
    # from the recorded one (here a finished shard edited) is reported with exit 3 and kept as it is.
    shard = out / "shard-00000" / "samples.jsonl"
    text = shard.read_text()
    edited = text.replace('"family": "entities"', '"family": "spatial"', 1)
    assert edited != text
    shard.write_text(edited)
    assert pinned.main(args) == pinned.MISMATCH_EXIT
    assert "differs from the recorded v3 set" in capsys.readouterr().err
    assert shard.read_text() == edited
    assert json.loads((out / "dataset.jsonl").read_text().splitlines()[0])["family"] == "spatial"

    # Another scene count is not a recorded set: rendered, not checked.
    other = tmp_path / "one"
    one = [str(other) if a == str(out) else a for a in args]
    one[one.index("--scenes") + 1] = "1"
    assert pinned.main(one) == 0
    assert "identical" not in capsys.readouterr().out
    assert pinned.recorded_digest("v3", other) is None


def test_an_engine_missing_from_history_is_named_with_the_fix(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.raises(DataEngineError, match="git fetch --unshallow"):
        pinned.checkout("v3", root=repo, cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / f"v3-{pinned.PINS['v3'].commit[:12]}").exists()


def test_the_command_line_refuses_what_it_cannot_do(tmp_path):
    run = [sys.executable, "-m", "training.dataengine.pinned"]
    no_engine = subprocess.run([*run, "--out", str(tmp_path)], capture_output=True, text=True, check=False)
    assert no_engine.returncode == 2 and "--engine" in no_engine.stderr
    unknown = subprocess.run([*run, "--engine", "v9", "--out", str(tmp_path)], capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
