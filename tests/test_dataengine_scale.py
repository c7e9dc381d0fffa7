"""Data engine beyond one run: disjoint parts for array jobs plus --merge, the Ray executor, failed shards,
Ctrl-C with a process pool.

The promise under test is byte identity: a dataset rendered in parts (any split, any executor) and merged
is the dataset one run writes, file for file, except the timings. Scenes are 160 x 120 without shadows, so
a scene renders in a fraction of a second; the tests that start worker processes or Ray take longer and
are marked slow. Ray runs on this machine only: 127.0.0.1, no dashboard, usage statistics off
(executors.py), inside scripts/test.sh's network namespace.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.dataengine.assets import furniture_available

needs_furniture = pytest.mark.skipif(
    not furniture_available(),
    reason="sweethome3d-furniture is not installed (apt-get install sweethome3d-furniture, see scripts/setup.sh)",
)
REPO = Path(__file__).resolve().parents[1]
W, H, SEED = 160, 120, 11
# index.json fields that measure time, the only bytes a merged dataset may not share with one run
TIMINGS = ("wall_seconds_this_run", "shard_seconds")


def argv(out: Path, scenes: int, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--scenes", str(scenes), "--seed", str(SEED), "--shard-size", "2",
        "--width", str(W), "--height", str(H), "--no-shadows", "--quiet", *extra,
    ]  # fmt: skip


def parse(out: Path, scenes: int, *extra: str):
    from training.dataengine.__main__ import build_parser

    return build_parser().parse_args(argv(out, scenes, *extra))


@pytest.fixture(scope="module")
def engine():
    from training.dataengine.__main__ import engine_config
    from training.dataengine.pipeline import Engine

    return Engine(engine_config(parse(Path("unused"), 1)))


def assert_same_dataset(a: Path, b: Path) -> None:
    """Every file byte for byte, except the timings of index.json and DONE."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.suffix == ".png" for p in files_a) and Path("index.json") in files_a
    for rel in files_a:
        x, y = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.name == "index.json":
            x, y = ({k: v for k, v in json.loads(t).items() if k not in TIMINGS} for t in (x, y))
        elif rel.name == "DONE":
            x, y = (
                {k: v for k, v in json.loads(t).items() if k not in ("seconds", "median_scene_s")}
                for t in (x, y)
            )
        assert x == y, f"{rel} differs"


# --------------------------------------------------------------------------------------- choosing a part
@pytest.mark.parametrize("n_shards", [1, 2, 5, 13])
@pytest.mark.parametrize("count", [1, 3, 4, 16])
def test_array_parts_cover_every_shard_exactly_once(n_shards, count):
    from training.dataengine.__main__ import select_part

    seen = []
    for i in range(count):
        lo, hi = select_part(
            parse(Path("x"), 1, "--shard-index", str(i), "--shard-count", str(count)), n_shards
        )
        seen += range(lo, hi)
    assert seen == list(range(n_shards))  # contiguous, in order, no gaps, no overlaps


def test_shard_index_env_reads_slurm_or_kubernetes_and_names_what_is_wrong(monkeypatch):
    from training.dataengine.__main__ import select_part
    from training.dataengine.errors import DataEngineError

    def part(*flags):
        return select_part(parse(Path("x"), 1, *flags), 10)

    for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
        monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
        monkeypatch.setenv(var, "3")
        assert part("--shard-index", "env", "--shard-count", "5") == (6, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    with pytest.raises(DataEngineError, match="disagree"):
        part("--shard-index", "env", "--shard-count", "5")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(DataEngineError, match="neither is set"):
        part("--shard-index", "env", "--shard-count", "5")
    with pytest.raises(DataEngineError, match="outside 0 to 4"):
        part("--shard-index", "5", "--shard-count", "5")  # Slurm --array=1-5 numbers from 1
    with pytest.raises(DataEngineError, match="needs --shard-count"):
        part("--shard-index", "1")
    with pytest.raises(DataEngineError, match="shards 0 to 9"):
        part("--shards", "8:11")
    with pytest.raises(DataEngineError, match="A:B"):
        part("--shards", "3-6")
    assert part("--shards", "4") == (4, 5) and part("--shards", "0:10") == (0, 10)
    assert part() is None


# ---------------------------------------------------------------------------------------- parts + merge
@needs_furniture
def test_parts_rendered_apart_and_merged_are_byte_identical_to_one_run(engine, tmp_path, monkeypatch):
    from training.dataengine.__main__ import run
    from training.dataengine.errors import DataEngineError

    one = tmp_path / "one" / "de"
    run(parse(one, 7, "--workers", "0"), engine=engine)  # shards 0-3, the last one holds scene 6 only

    parts = tmp_path / "parts" / "de"  # same folder name: items.json records it
    summary = run(
        parse(parts, 7, "--workers", "0", "--shard-index", "0", "--shard-count", "2"), engine=engine
    )
    assert (
        summary["shards"] == "0:2" and summary["scenes"] == "0-3" and summary["dataset_shards_done"] == "2/4"
    )
    assert not (parts / "index.json").exists() and not (parts / "dataset.jsonl").exists()
    # the merge refuses while a part is missing, naming its shards, scenes and the command that renders them
    with pytest.raises(
        DataEngineError, match=r"2 of 4 shards are not DONE \(shard-00002..shard-00003 \(scenes 4-6\)\)"
    ) as e:
        run(parse(parts, 7, "--merge"))
    command = str(e.value).splitlines()[-1].strip()
    assert command.endswith("--shards 2:4") and "--seed 11" in command and "--no-shadows" in command
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    summary = run(
        parse(parts, 7, "--workers", "0", "--shard-index", "env", "--shard-count", "2"), engine=engine
    )
    assert summary["dataset_shards_done"] == "4/4" and summary["next"].endswith("--merge")
    assert not (parts / "index.json").exists()
    index = run(parse(parts, 7, "--merge"))
    assert index["scenes"] == 7 and index["shards"] == [f"shard-0000{k}" for k in range(4)]
    assert_same_dataset(one, parts)
    assert (parts / "dataset.jsonl").read_bytes() == (one / "dataset.jsonl").read_bytes()


@needs_furniture
def test_merge_refuses_a_shard_rendered_with_another_configuration(engine, tmp_path):
    from training.dataengine.__main__ import run
    from training.dataengine.errors import DataEngineError

    out = tmp_path / "de"
    run(parse(out, 4, "--workers", "0", "--shards", "0:2"), engine=engine)
    # an array task started with other flags is refused by config.json, naming what differs...
    with pytest.raises(DataEngineError, match="seed 11 there, 12 here"):
        run(_with(parse(out, 4, "--merge"), seed=12))
    # ...and a shard whose DONE carries another configuration (two tasks that raced to write config.json)
    done = out / "shard-00001" / "DONE"
    stats = json.loads(done.read_text())
    assert len(stats["config_sha256"]) == 16
    done.write_text(json.dumps({**stats, "config_sha256": "0123456789abcdef"}))
    with pytest.raises(DataEngineError, match="shard-00001 was rendered with another configuration"):
        run(parse(out, 4, "--merge"))
    assert not (out / "index.json").exists()


def _with(args, **changes):
    for k, v in changes.items():
        setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------ failed shards
@needs_furniture
def test_a_failed_shard_is_named_with_its_scenes_and_the_command_that_redoes_it(
    engine, tmp_path, monkeypatch, capsys
):
    import training.dataengine.__main__ as cli
    import training.dataengine.pipeline as pipeline

    real = pipeline.write_scene

    def scene_3_fails(res, shard_dir, save_depth):
        if res.scene_id.endswith("0000003"):
            raise RuntimeError("the GL context went away")
        return real(res, shard_dir, save_depth)

    monkeypatch.setattr(cli, "render_shards", _with_engine(cli.render_shards, engine))
    monkeypatch.setattr(pipeline, "write_scene", scene_3_fails)
    out = tmp_path / "de"
    assert cli.main(argv(out, 6, "--workers", "0")) == 1
    err = capsys.readouterr().err
    assert "1 of 3 shards failed" in err and "Traceback" not in err
    assert "shard-00001 (scenes 2-3): RuntimeError: the GL context went away" in err
    assert "RuntimeError" in (out / "shard-00001.error.txt").read_text()
    # the other shards went on and are DONE; the failed one left nothing behind; no index yet
    assert (out / "shard-00000" / "DONE").is_file() and (out / "shard-00002" / "DONE").is_file()
    assert not (out / "shard-00001").exists() and not list(out.glob(".shard-*"))
    assert not (out / "index.json").exists()
    redo = next(line.strip() for line in err.splitlines() if line.strip().startswith("python -m"))
    assert redo.endswith("--shards 1:2")
    monkeypatch.setattr(pipeline, "write_scene", real)
    assert cli.main(shlex.split(redo)[3:]) == 0  # the printed command, as a user pastes it
    assert (out / "shard-00001" / "DONE").is_file() and not (out / "shard-00001.error.txt").exists()
    assert cli.main(argv(out, 6, "--workers", "0")) == 0 and (out / "index.json").is_file()


def _with_engine(render_shards, engine):
    def wrapped(todo, **kw):
        return render_shards(todo, **{**kw, "engine": engine})  # the module's engine, already built

    return wrapped


# -------------------------------------------------------------------------------------------- executors
def _cli(out: Path, scenes: int, *extra: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "training.dataengine", *argv(out, scenes, *extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@needs_furniture
@pytest.mark.slow
def test_ctrl_c_stops_the_process_pool_and_leaves_no_half_shard(tmp_path):
    out = tmp_path / "de"
    # 48 scenes: far more than are rendered before the first half-written shard appears, so the interrupt
    # lands mid-run even when a loaded machine lets this process look late.
    # As from a terminal: SIGINT at its default in the child, whatever an earlier in-process test (a local Ray)
    # left in this pytest process, whose ignored SIGINT the child would otherwise inherit.
    proc = _cli(
        out,
        48,
        "--workers",
        "2",
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not any(p.is_file() for p in out.glob(".shard-*.tmp-*/images/*.png")):  # a shard half written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; finished shards are kept" in err and "Traceback" not in err
    assert not list(out.glob(".shard-*")), "a half-written shard was left behind"
    assert all((d / "DONE").is_file() for d in out.glob("shard-*")) and not (out / "index.json").exists()


@needs_furniture
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install -c constraints.txt 'converseg-edge[ray]')",
)
def test_ray_executor_writes_what_the_process_pool_writes(tmp_path):
    pool, ray = tmp_path / "process" / "de", tmp_path / "ray" / "de"
    for out, executor in ((pool, "process"), (ray, "ray")):
        proc = _cli(out, 4, "--workers", "2", "--executor", executor)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert json.loads((ray / "index.json").read_text())["scenes"] == 4
    assert_same_dataset(pool, ray)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_local_ray_connects_to_nothing_but_loopback(tmp_path):
    """Ray's API server asks cloud metadata addresses which cloud it is on, even with usage statistics off
    and no dashboard; the local Ray of executors.py must send that nowhere but loopback."""
    log = tmp_path / "strace.txt"
    code = (
        "from training.dataengine.executors import import_ray, start_local_ray\n"
        "ray = import_ray(); start_local_ray(ray, 1)\n"
        "import time; time.sleep(5); ray.shutdown()\n"
    )
    strace = [
        "strace",
        "-f",
        "-e",
        "trace=connect,sendto,sendmsg",
        "-o",
        str(log),
        sys.executable,
        "-c",
        code,
    ]
    subprocess.run(strace, cwd=REPO, check=True, timeout=180, capture_output=True)
    calls = [line for line in log.read_text().splitlines() if "sin_addr" in line or "sin6_addr" in line]
    assert calls, "strace saw no network call at all: the test would prove nothing"
    off = [line for line in calls if '"127.0.0.1"' not in line and '"::ffff:127.0.0.1"' not in line]
    assert not off, off[:3]
