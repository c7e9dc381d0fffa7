"""Render with the data engine as it was at a recorded commit, so the sets that numbers were measured on can be
rendered again after the engine has moved on.

    python -m training.dataengine.pinned --engine v3 --out runs/v2/data/test --scenes 1000 --seed 1 \
        --width 512 --height 384 --samples-per-family 2 --no-depth --workers 2

Every flag but --engine goes to that engine's own `python -m training.dataengine` (its --help lists them:
`python -m training.dataengine.pinned --engine v3 --help`). The engine's code comes out of this repository's
git history once (`git archive`, into .cache/dataengine/), runs with this interpreter and converts its own
object models there. When the rendered set is one whose bytes were recorded (Pin.recorded: the engine's
config.json, seed and scene count), its dataset.jsonl is checked against them: a set that differs is kept, and the
command says so and exits 3, as numbers measured on it are not the recorded ones.

Today's engine is `python -m training.dataengine` itself; v4 is today's engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataEngineError

ROOT = Path(__file__).resolve().parents[2]
CHECKOUTS = ROOT / ".cache" / "dataengine"
# What the old engine needs from its commit: its own package and the core's file helpers it imports.
PATHS = ("training", "converseg_core", ":(exclude)converseg_core/assets")
MISMATCH_EXIT = 3


@dataclass(frozen=True)
class Pin:
    commit: str
    what: str
    # config.json of the sets whose bytes were recorded (the seed aside), and for each (seed, scenes) the
    # sha256 of the set's dataset.jsonl.
    config: dict
    recorded: dict


PINS = {
    "v3": Pin(
        commit="7527f2494903d7b6de869fb29a925f8c4c6faa91",
        what="73 object models, template phrasings; renders the v3 sets the model card's v3 numbers are measured on",
        config={
            "width": 512,
            "height": 384,
            "min_objects": 3,
            "max_objects": 12,
            "copies": 2,
            "settle_steps": 60,
            "shadows": True,
            "shadow_size": 1024,
            "negative_rate": 0.2,
            "samples_per_family": 2,
            "save_depth": False,
            "shard_size": 50,
        },
        recorded={
            # the test set: 13,258 requests
            (1, 1000): "0848bd74e1ecd061f2dcbb44719ae65e9bf4152ea46b07301c3d716de5a91f8e",
            # the training set: 52,960 requests
            (0, 4000): "eabb9e89f8d372a17109a705bb7c2639b8a9367c3afcdb1cc542a0d227425c41",
            # the test set's first two scenes (its first 28 lines), which the tests render
            (1, 2): "cd162a3984a7b0582c44acdcf2f6a80e53a5807a04e35f8fa4cf5a858a34dee9",
        },
    ),
}


# The flags after --engine v3 that render the v3 test set, the set the model card's numbers are measured on.
V3_TEST_ARGS = (
    "--scenes", "1000", "--seed", "1", "--width", "512", "--height", "384", "--samples-per-family", "2", "--no-depth",
)  # fmt: skip


def recorded_digest(engine: str, out: Path) -> str | None:
    """The recorded sha256 of `out`'s dataset.jsonl, or None when `out` is not a recorded set."""
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    scenes = json.loads((out / "index.json").read_text(encoding="utf-8")).get("scenes")
    seed = config.pop("seed", None)
    pin = PINS[engine]
    return pin.recorded.get((seed, scenes)) if config == pin.config else None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkout(name: str, *, root: Path = ROOT, cache: Path = CHECKOUTS) -> Path:
    """The engine's code at its commit, extracted once into `cache` (atomically: a half-extracted folder is
    never used)."""
    pin = PINS[name]
    dest = cache / f"{name}-{pin.commit[:12]}"
    if (dest / "training" / "dataengine" / "__main__.py").is_file():
        return dest
    git = shutil.which("git")
    if git is None:
        raise DataEngineError(f"the {name} data engine comes out of git history, and git is not installed")
    ok = subprocess.run(
        [git, "-C", str(root), "cat-file", "-e", f"{pin.commit}^{{commit}}"], capture_output=True
    )
    if ok.returncode != 0:
        raise DataEngineError(
            f"the {name} data engine is commit {pin.commit[:12]}, which {root} does not hold: work in a clone "
            "with its history (`git fetch --unshallow` in a shallow clone)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    proc = subprocess.Popen(
        [git, "-C", str(root), "archive", "--format=tar", pin.commit, "--", *PATHS], stdout=subprocess.PIPE
    )
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            tar.extractall(tmp, filter="data")
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataEngineError(f"git archive of {pin.commit[:12]} failed (exit {code})")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.dataengine.pinned",
        description="Render with the data engine of a recorded commit (its flags after --engine; "
        "--engine NAME --help lists them). A set whose bytes were recorded is checked against them.",
        add_help=False,
    )
    p.add_argument("--engine", choices=sorted(PINS), help="which recorded engine renders (required)")
    p.add_argument("--out", type=Path, help="output folder (required; an existing one is resumed)")
    p.add_argument("--asset-cache", type=Path, help="the engine's converted-model cache (default: its own)")
    p.add_argument("-h", "--help", action="store_true", help="this help, then the engine's own")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        for name in [args.engine] if args.engine else sorted(PINS):
            print(f"\n--engine {name}: {PINS[name].what}. Its own flags:\n", flush=True)
            try:
                code_dir = checkout(name)
            except DataEngineError as exc:
                print(f"(not available here: {exc})")
                continue
            engine_help = [sys.executable, "-m", "training.dataengine", "--help"]
            subprocess.run(engine_help, cwd=code_dir, env=_env(code_dir), check=False)
        return 0
    if args.engine is None or args.out is None:
        parser.error(f"--engine (one of {', '.join(sorted(PINS))}) and --out are required")
    try:
        code_dir = checkout(args.engine)
    except DataEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    cmd = [sys.executable, "-m", "training.dataengine", *rest, "--out", str(out)]
    if args.asset_cache is not None:
        cmd += ["--asset-cache", str(args.asset_cache.resolve())]
    code = subprocess.run(cmd, cwd=code_dir, env=_env(code_dir), check=False).returncode
    if code != 0:
        return code
    expected = recorded_digest(args.engine, out)
    if expected is None:
        return 0
    got = file_digest(out / "dataset.jsonl")
    if got != expected:
        print(
            f"error: {out}/dataset.jsonl differs from the recorded {args.engine} set of this config and scene "
            f"count (sha256 {got[:16]}, recorded {expected[:16]}): the set is kept, but numbers measured on it "
            "are not the recorded ones (another GL renderer or MuJoCo version can move pixels)",
            file=sys.stderr,
        )
        return MISMATCH_EXIT
    print(f"[pinned] {out}: identical to the recorded {args.engine} set (sha256 {got[:16]})")
    return 0


def _env(code_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code_dir), *filter(None, [env.get("PYTHONPATH")])])
    return env


if __name__ == "__main__":
    sys.exit(main())
