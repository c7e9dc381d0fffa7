"""`python -m training.dataengine --out DIR --scenes N --seed S --workers W`: render a sharded dataset.

Deterministic from the seed (scene i depends only on (seed, i)), parallel over a process pool or a Ray
pool (executors.py), resumable (finished shards carry a DONE marker and are skipped), and crash-safe
(shards are written to a temporary folder and renamed). index.json, dataset.jsonl and items.json are
written last. For array jobs, `--shards A:B` or `--shard-index I --shard-count N` renders one disjoint
part and writes no index; the same command with `--merge` then checks every shard and writes the index,
byte for byte what a single run writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from converseg_core.files import atomic_write, atomic_write_text

from .errors import DataEngineError
from .executors import EXECUTORS, Shard, ShardFailure, remove_partial_shards, render_shards
from .pipeline import PATH_KEYS, Engine, EngineConfig, add_request_options, config_digest, shard_name

PROG = "python -m training.dataengine"
# Environment variables that hold the task's index in an array job, read by --shard-index env.
INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")  # Slurm array job, Kubernetes Indexed Job


class ShardsFailed(DataEngineError):
    """Some shards raised while the others were rendered; the message names them and how to redo them."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render tabletop scenes with exact masks, scene graphs and conversational prompts.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (created; an existing one is resumed)"
    )
    p.add_argument("--scenes", type=int, required=True, help="number of scenes to render")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; scene i depends only on (seed, i)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, each with its own engine (0 = in this process; default: every core of "
        "this machine, or with --executor ray every CPU of the Ray cluster)",
    )
    p.add_argument("--shard-size", type=int, default=50, help="scenes per shard (the unit of resume)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels")
    p.add_argument("--height", type=int, default=384, help="image height in pixels")
    p.add_argument("--min-objects", type=int, default=3, help="fewest objects per scene")
    p.add_argument("--max-objects", type=int, default=12, help="most objects per scene")
    add_request_options(p, samples_per_family=EngineConfig.samples_per_family)
    p.add_argument(
        "--no-shadows",
        action="store_true",
        help="render without shadows (the render pass costs about a third less CPU)",
    )
    p.add_argument(
        "--shadow-size", type=int, default=1024, help="shadow map side in texels (smaller is faster)"
    )
    p.add_argument("--no-depth", action="store_true", help="do not write depth PNGs")
    p.add_argument(
        "--asset-cache", type=Path, default=None, help="converted-asset cache (default .cache/assets)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("beyond one machine (docs/DATAENGINE.md)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="process",
        help="who runs the workers: a process pool on this machine, or a Ray pool (one actor per worker; "
        "a local Ray on 127.0.0.1 unless --ray-address is given)",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="with --executor ray: join this Ray cluster ('auto' for one started here by 'ray start', or "
        "ray://HOST:10001); its nodes need this repository and OUT at the same path",
    )
    part = g.add_mutually_exclusive_group()
    part.add_argument(
        "--shards",
        default=None,
        metavar="A:B",
        help="render only shards A to B-1 (as a Python slice: 3:6 renders shards 3, 4 and 5; a single "
        "number renders one shard) and write no index; for array jobs, followed by --merge",
    )
    part.add_argument(
        "--shard-index",
        default=None,
        metavar="I|env",
        help="render part I (0-based) of --shard-count contiguous parts of the shards and write no index; "
        f"'env' reads the index from {' or '.join(INDEX_VARIABLES)} (Slurm array job, Kubernetes Indexed Job)",
    )
    part.add_argument(
        "--merge",
        action="store_true",
        help="render nothing: check that every shard is DONE with this configuration, then write "
        "index.json, dataset.jsonl and items.json exactly as a single run does",
    )
    g.add_argument(
        "--shard-count", type=int, default=None, help="with --shard-index: the number of parts (array size)"
    )
    return p


def run(args: argparse.Namespace, *, engine: Engine | None = None) -> dict:
    """Render what is missing under args.out and finalize; `engine` lets an in-process caller reuse one.

    Returns index.json's content, or for a part (--shards, --shard-index) a summary of that part. A part
    writes no index; --merge renders nothing and writes it."""
    from tqdm import tqdm

    from .assets import build_asset_cache, manifest_markdown
    from .knowledge import load_knowledge_base
    from .render import configure_gl

    if args.scenes <= 0 or args.shard_size <= 0:
        raise DataEngineError("--scenes and --shard-size must be positive")
    if not 0.0 <= args.prompt_noise <= 1.0:
        raise DataEngineError(f"--prompt-noise must be in [0, 1], got {args.prompt_noise}")
    if not 1 <= args.min_objects <= args.max_objects:
        raise DataEngineError("need 1 <= --min-objects <= --max-objects")
    if args.executor == "ray" and args.workers == 0:
        raise DataEngineError("--workers 0 renders in this process; give --executor ray a number of workers")
    if args.ray_address and args.executor != "ray":
        raise DataEngineError("--ray-address needs --executor ray")
    cfg = engine_config(args)
    shards = plan_shards(args.scenes, args.shard_size)
    part = select_part(args, len(shards))
    # fail fast: GL, knowledge base, catalog, libraries and meshes are checked (and converted) before any
    # worker starts; the GL choice goes into the environment the workers inherit. A merge renders nothing.
    if not args.merge:
        configure_gl()
    kb = load_knowledge_base()
    cache = build_asset_cache(args.asset_cache, known_categories=set(kb.categories))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record_shard_size = check_run_config(out, cfg, args.shard_size)
    mine = shards if part is None else shards[part[0] : part[1]]
    if not args.merge:  # left by a crashed run of these shards; no worker of this run is running yet
        remove_partial_shards(out, [k for k, _ in mine])
    check_done_shards(out, shards, cfg)
    if record_shard_size:
        atomic_write_text(
            out / "config.json", json.dumps({**asdict(cfg), "shard_size": args.shard_size}, indent=1)
        )
    t0 = time.perf_counter()
    if args.merge:
        missing = [s for s in shards if not is_done(out, s[0])]
        if missing:
            raise DataEngineError(
                f"cannot merge {out}: {len(missing)} of {len(shards)} shards are not DONE "
                f"({', '.join(describe_runs(missing))}); render them with:\n"
                + "\n".join(f"  {command_line(args, shards=r)}" for r in runs(missing))
            )
        return finalize(out, cfg, args.scenes, shards, cache, time.perf_counter() - t0, manifest_markdown)
    todo = [s for s in mine if not is_done(out, s[0])]
    for k, _ in todo:  # the error file of an earlier failure of a shard that is tried again
        (out / error_file(k)).unlink(missing_ok=True)
    total = sum(len(i) for _, i in mine)
    bar = tqdm(
        total=total,
        initial=total - sum(len(i) for _, i in todo),
        unit="scene",
        disable=args.quiet,
        desc="dataengine" if part is None else f"dataengine shards {part[0]}:{part[1]}",
    )
    try:
        failures = render_shards(
            todo,
            out=out,
            cfg=cfg,
            executor=args.executor,
            workers=args.workers,
            asset_cache=args.asset_cache,
            ray_address=args.ray_address,
            engine=engine,
            progress=bar.update,
        )
    finally:
        bar.close()
    if failures:
        raise ShardsFailed(report_failures(out, args, failures, n_shards=len(todo)))
    if part is None:
        return finalize(out, cfg, args.scenes, shards, cache, time.perf_counter() - t0, manifest_markdown)
    done = sum(is_done(out, k) for k, _ in shards)
    return {
        "shards": f"{part[0]}:{part[1]}",
        "scenes": f"{mine[0][1][0]}-{mine[-1][1][-1]}" if mine else "none",
        "rendered_scenes": sum(len(i) for _, i in todo),
        "dataset_shards_done": f"{done}/{len(shards)}",
        "next": command_line(args, merge=True)
        if done == len(shards)
        else "when every part has finished, the same command with --merge instead of the part",
    }


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        seed=args.seed,
        width=args.width,
        height=args.height,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        shadows=not args.no_shadows,
        shadow_size=args.shadow_size,
        negative_rate=args.negative_rate,
        samples_per_family=args.samples_per_family,
        prompt_noise=args.prompt_noise,
        save_depth=not args.no_depth,
    )


def plan_shards(n_scenes: int, shard_size: int) -> list[Shard]:
    """Shard k holds scenes k * shard_size onwards: fixed by the two numbers, whoever renders it."""
    return [
        (k, list(range(s, min(s + shard_size, n_scenes))))
        for k, s in enumerate(range(0, n_scenes, shard_size))
    ]


def select_part(args: argparse.Namespace, n_shards: int) -> tuple[int, int] | None:
    """The shards [a, b) this run renders, from --shards or --shard-index/--shard-count; None for all
    (a plain run or --merge). Parts of an array are contiguous and cover every shard once."""
    if args.shard_count is not None and args.shard_index is None:
        raise DataEngineError("--shard-count goes with --shard-index")
    if args.shards is not None:
        a, sep, b = args.shards.partition(":")
        try:
            lo, hi = int(a), int(b) if sep else int(a) + 1
        except ValueError:
            raise DataEngineError(
                f"--shards {args.shards!r}: give A:B (shards A to B-1) or one number"
            ) from None
        if not 0 <= lo < hi <= n_shards:
            raise DataEngineError(
                f"--shards {args.shards}: this dataset has shards 0 to {n_shards - 1} "
                f"(--scenes / --shard-size); give 0 <= A < B <= {n_shards}"
            )
        return lo, hi
    if args.shard_index is None:
        return None
    if args.shard_count is None or args.shard_count <= 0:
        raise DataEngineError("--shard-index needs --shard-count N (N >= 1: the number of array tasks)")
    index = shard_index_from_env() if args.shard_index == "env" else args.shard_index
    try:
        i = int(index)
    except ValueError:
        raise DataEngineError(f"--shard-index {index!r}: give a number or 'env'") from None
    if not 0 <= i < args.shard_count:
        raise DataEngineError(
            f"--shard-index {i} is outside 0 to {args.shard_count - 1} (--shard-count {args.shard_count}); "
            "number array tasks from 0 (Slurm --array=0-N-1, Kubernetes Indexed Jobs do)"
        )
    return i * n_shards // args.shard_count, (i + 1) * n_shards // args.shard_count


def shard_index_from_env() -> str:
    found = {v: os.environ[v] for v in INDEX_VARIABLES if os.environ.get(v, "").strip()}
    if len(set(found.values())) != 1:
        raise DataEngineError(
            f"--shard-index env reads {' or '.join(INDEX_VARIABLES)}: "
            + ("neither is set; give the index as a number" if not found else f"they disagree: {found}")
        )
    return next(iter(found.values()))


def is_done(out: Path, k: int) -> bool:
    return (out / shard_name(k) / "DONE").is_file()


def error_file(k: int) -> str:
    return f"{shard_name(k)}.error.txt"


def runs(shards: list[Shard]) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of shard numbers, for --shards commands."""
    out: list[list[int]] = []
    for k, _ in shards:
        if out and out[-1][1] == k:
            out[-1][1] = k + 1
        else:
            out.append([k, k + 1])
    return [(a, b) for a, b in out]


def describe_runs(shards: list[Shard]) -> list[str]:
    scenes = {k: idx for k, idx in shards}
    return [
        f"{shard_name(a)}{'' if b == a + 1 else '..' + shard_name(b - 1)} (scenes {scenes[a][0]}-{scenes[b - 1][-1]})"
        for a, b in runs(shards)
    ]


def command_line(
    args: argparse.Namespace, *, shards: tuple[int, int] | None = None, merge: bool = False
) -> str:
    """This run's command with its part replaced: --shards A:B, or --merge. Only flags that differ from
    their defaults are written."""
    words = [PROG]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in (
            "help",
            "shards",
            "shard_index",
            "shard_count",
            "merge",
        ):
            continue
        value = getattr(args, action.dest)
        if value == action.default or value is None:
            continue
        flag = (
            action.option_strings[-1]
            if action.option_strings[-1].startswith("--")
            else action.option_strings[0]
        )
        words += [flag] if value is True else [flag, str(value)]
    if shards is not None:
        words += ["--shards", f"{shards[0]}:{shards[1]}"]
    if merge:
        words.append("--merge")
    return shlex.join(words).replace(shlex.quote(PROG), PROG)


def report_failures(
    out: Path, args: argparse.Namespace, failures: list[ShardFailure], *, n_shards: int
) -> str:
    """Write each failed shard's traceback next to the shards; return a message that names every failed
    shard with its scenes and the commands that render them again."""
    failures = sorted(failures, key=lambda f: f.shard)
    for f in failures:
        atomic_write_text(out / error_file(f.shard), f.details)
    failed = [(f.shard, f.indices) for f in failures]
    lines = [f"{len(failures)} of {n_shards} shards failed; the others are DONE and kept:"]
    lines += [
        f"  {shard_name(f.shard)} (scenes {f.indices[0]}-{f.indices[-1]}): {f.error}" for f in failures[:10]
    ]
    if len(failures) > 10:
        lines.append(f"  ... and {len(failures) - 10} more")
    lines.append(f"tracebacks: {out}/shard-NNNNN.error.txt")
    lines.append("run the same command again to resume, or render only the failed shards with:")
    lines += [f"  {command_line(args, shards=r)}" for r in runs(failed)]
    return "\n".join(lines)


def check_run_config(out: Path, cfg: EngineConfig, shard_size: int) -> bool:
    """config.json holds what makes the dataset and the shard size (which scenes each shard holds): resuming
    with either changed would mix two datasets, or lose or repeat scenes, so it is refused. Returns whether
    the shard size is still to be recorded (a new folder, or one written before it was)."""
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        return True
    old = json.loads(cfg_path.read_text())
    if old.get("shard_size", shard_size) != shard_size:
        raise DataEngineError(
            f"{out} was started with --shard-size {old['shard_size']} ({cfg_path}); resume it with "
            f"--shard-size {old['shard_size']}, or use a new --out"
        )
    new = asdict(cfg)
    old = {k: v for k, v in old.items() if k != "shard_size"}
    if old != new:
        differ = ", ".join(
            f"{k} {old.get(k)!r} there, {new.get(k)!r} here"
            for k in sorted({*old, *new})
            if old.get(k) != new.get(k)
        )
        raise DataEngineError(
            f"{out} was started with another configuration ({cfg_path}: {differ}); give the flags it was "
            "started with, or use a new --out"
        )
    return "shard_size" not in old


def check_done_shards(out: Path, shards: list[Shard], cfg: EngineConfig) -> None:
    """Refuse a finished shard whose scenes are not the ones this run puts there (the last shard of a run with
    other --scenes, or a folder written before config.json recorded the shard size), or that was rendered
    with another configuration (an array job started with other flags): skipping or merging it would lose,
    repeat or mix scenes. Nothing is deleted; the message names the shard to remove to have it rendered
    again. DONE markers written before they carried the configuration's digest pass on config.json alone."""
    digest = config_digest(cfg)
    for k, indices in shards:
        done = out / shard_name(k) / "DONE"
        if not done.is_file():
            continue
        stats = json.loads(done.read_text())
        if stats.get("config_sha256", digest) != digest:
            raise DataEngineError(
                f"{out / shard_name(k)} was rendered with another configuration (config_sha256 "
                f"{stats['config_sha256']}, this command's is {digest}); remove that folder to have it "
                "rendered again, or give the flags it was rendered with"
            )
        held = stats.get("indices")
        if held != [indices[0], indices[-1]]:
            raise DataEngineError(
                f"{out / shard_name(k)} holds scenes {held[0] if held else '?'}-{held[-1] if held else '?'} of a "
                f"run with other --scenes or --shard-size; this run puts scenes {indices[0]}-{indices[-1]} "
                f"there. Remove that folder to have it rendered again (scene i depends only on the seed and i), "
                "or use a new --out"
            )


def finalize(
    out: Path, cfg: EngineConfig, n_scenes: int, shards, cache: Path, wall: float, manifest_markdown
) -> dict:
    """Merge shard stats; write dataset.jsonl and items.json (paths relative to OUT), then index.json."""
    families: dict[str, int] = {}
    rejected: dict[str, int] = {}
    splits: dict[str, int] = {}
    n_samples = negatives = regions = 0
    shard_seconds = []
    items, heldout = [], []
    with atomic_write(out / "dataset.jsonl", "w", encoding="utf-8") as ds:
        for k, _ in shards:
            sd = out / shard_name(k)
            st = json.loads((sd / "DONE").read_text())
            shard_seconds.append(st["seconds"])
            for fam, v in st["rejected"].items():
                rejected[fam] = rejected.get(fam, 0) + v
            with open(sd / "samples.jsonl", encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    n_samples += 1
                    families[rec["family"]] = families.get(rec["family"], 0) + 1
                    splits[rec["template_split"]] = splits.get(rec["template_split"], 0) + 1
                    negatives += int(rec["negative"])
                    regions += int(rec["answer_kind"] == "region")
                    for key in PATH_KEYS:
                        if key in rec:
                            rec[key] = f"{shard_name(k)}/{rec[key]}"
                    ds.write(json.dumps(rec) + "\n")
                    item = {
                        "id": rec["sample_id"],
                        "image": rec["image"],
                        "mask": rec["mask_merged"],
                        "prompt": rec["prompt"],
                        "family": rec["family"],
                        "template_id": rec["template_id"],
                        "template_split": rec["template_split"],
                        "negative": rec["negative"],
                        "answer_kind": rec["answer_kind"],
                    }
                    (heldout if rec["template_split"] == "heldout" else items).append(item)
    name = out.name or "dataengine"
    for fname, its in (("items.json", items + heldout), ("items_heldout.json", heldout)):
        with atomic_write(out / fname, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "dataset": f"{name}{'' if fname == 'items.json' else '_heldout'}",
                    "count": len(its),
                    "items": its,
                },
                f,
            )
    index = {
        "format": "converseg-dataengine",
        "version": 1,
        "seed": cfg.seed,
        "scenes": n_scenes,
        "samples": n_samples,
        "shards": [shard_name(k) for k, _ in shards],
        "counts_per_family": dict(sorted(families.items())),
        "counts_per_split": splits,
        "negatives": negatives,
        "region_answers": regions,
        "rejected_per_reason": dict(sorted(rejected.items())),
        "config": asdict(cfg),
        "asset_manifest": str(cache / "manifest.json"),
        "wall_seconds_this_run": round(wall, 2),
        "shard_seconds": shard_seconds,
    }
    atomic_write_text(
        out / "ASSET_LICENCES.md",
        "# Models used in these images\n\nFrom the Debian package sweethome3d-furniture.\n\n"
        + manifest_markdown(cache)
        + "\n",
    )
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))  # last: it marks the run finished
    return index


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resume = "finished shards are kept: run the same command again to resume"
    try:
        index = run(args)
    except ShardsFailed as exc:  # the run ran: the other shards are kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DataEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; {resume}", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only or vanished output folder
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: cannot write under {args.out}: {exc.strerror or exc}{where}; {resume}", file=sys.stderr
        )
        return 1
    if "samples" not in index:  # a part of an array job: no index yet
        print(json.dumps(index, indent=1))
        return 0
    print(
        json.dumps(
            {
                k: index[k]
                for k in (
                    "scenes",
                    "samples",
                    "counts_per_family",
                    "negatives",
                    "region_answers",
                    "rejected_per_reason",
                    "wall_seconds_this_run",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
