"""`python -m training.dataengine --out DIR --scenes N --seed S --workers W`: render a sharded dataset.

Deterministic from the seed (scene i depends only on (seed, i)), parallel over a process pool, resumable
(finished shards carry a DONE marker and are skipped), and crash-safe (shards are written to a temporary
folder and renamed). index.json, dataset.jsonl and items.json are written last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from converseg_core.files import atomic_write, atomic_write_text

from .errors import DataEngineError
from .pipeline import Engine, EngineConfig, init_worker, run_shard, shard_name, write_shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.dataengine",
        description="Render tabletop scenes with exact masks, scene graphs and conversational prompts.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (created; an existing one is resumed)"
    )
    p.add_argument("--scenes", type=int, required=True, help="number of scenes to render")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; scene i depends only on (seed, i)")
    p.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="processes (0 = in this process)"
    )
    p.add_argument("--shard-size", type=int, default=50, help="scenes per shard (the unit of resume)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels")
    p.add_argument("--height", type=int, default=384, help="image height in pixels")
    p.add_argument("--min-objects", type=int, default=3, help="fewest objects per scene")
    p.add_argument("--max-objects", type=int, default=12, help="most objects per scene")
    p.add_argument(
        "--samples-per-family", type=int, default=1, help="requests drawn per concept family and scene"
    )
    p.add_argument(
        "--negative-rate", type=float, default=0.2, help="share of requests whose answer is absent"
    )
    p.add_argument(
        "--prompt-noise",
        type=float,
        default=EngineConfig.prompt_noise,
        help="share of requests given one human error: a typo, a dropped small word, a wrong plural "
        "(never another object's name; 0 disables)",
    )
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
    return p


def run(args: argparse.Namespace, *, engine: Engine | None = None) -> dict:
    """Render what is missing under args.out and finalize; `engine` lets an in-process caller reuse one."""
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
    cfg = EngineConfig(
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
    # fail fast: GL, knowledge base, catalog, libraries and meshes are checked (and converted) before any
    # worker starts; the GL choice goes into the environment the workers inherit
    configure_gl()
    kb = load_knowledge_base()
    cache = build_asset_cache(args.asset_cache, known_categories=set(kb.categories))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    record_shard_size = check_run_config(out, cfg, args.shard_size)
    shards = [
        (k, list(range(s, min(s + args.shard_size, args.scenes))))
        for k, s in enumerate(range(0, args.scenes, args.shard_size))
    ]
    for stale in out.glob(".shard-*.tmp-*"):  # left by a crashed run; no worker is running yet
        shutil.rmtree(stale, ignore_errors=True)
    check_done_shards(out, shards)
    if record_shard_size:
        atomic_write_text(
            out / "config.json", json.dumps({**asdict(cfg), "shard_size": args.shard_size}, indent=1)
        )
    todo = [(k, idx) for k, idx in shards if not (out / shard_name(k) / "DONE").is_file()]
    done_scenes = args.scenes - sum(len(i) for _, i in todo)
    t0 = time.perf_counter()
    bar = tqdm(total=args.scenes, initial=done_scenes, unit="scene", disable=args.quiet, desc="dataengine")
    if todo and (args.workers == 0 or engine is not None):
        if engine is None:
            engine = Engine(cfg, asset_cache=args.asset_cache)
        elif engine.config != cfg:
            raise DataEngineError("the engine passed in was built with another configuration")
        for k, idx in todo:
            write_shard(engine, out, k, idx, progress=bar.update)
    elif todo:
        ctx = mp.get_context("spawn")  # a fresh GL context per worker; never fork one
        q = ctx.Queue()
        with ctx.Pool(
            min(args.workers, len(todo)), initializer=init_worker, initargs=(cfg, args.asset_cache, q)
        ) as pool:
            pending = [pool.apply_async(run_shard, (str(out), k, idx)) for k, idx in todo]
            while pending:
                try:
                    bar.update(q.get(timeout=0.5))
                except queue.Empty:
                    pass
                for r in [r for r in pending if r.ready()]:
                    r.get()  # re-raises a worker's exception here
                    pending.remove(r)
            while True:
                try:
                    bar.update(q.get_nowait())
                except queue.Empty:
                    break
    bar.close()
    wall = time.perf_counter() - t0
    return finalize(out, cfg, args.scenes, shards, cache, wall, manifest_markdown)


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
    if {k: v for k, v in old.items() if k != "shard_size"} != asdict(cfg):
        raise DataEngineError(f"{out} was started with another configuration ({cfg_path}); use a new --out")
    return "shard_size" not in old


def check_done_shards(out: Path, shards: list[tuple[int, list[int]]]) -> None:
    """Refuse a finished shard whose scenes are not the ones this run puts there (the last shard of a run with
    other --scenes, or a folder written before config.json recorded the shard size): skipping it would lose
    or repeat scenes. Nothing is deleted; the message names the shard to remove to have it rendered again."""
    for k, indices in shards:
        done = out / shard_name(k) / "DONE"
        if not done.is_file():
            continue
        held = json.loads(done.read_text()).get("indices")
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
                    for key in ("image", "mask_merged", "instances", "scene_graph", "depth"):
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
