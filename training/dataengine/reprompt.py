"""Ask new requests about scenes already rendered: today's prompt generator over an older set's scene graphs.

A rendered set keeps each scene's graph and instance map, which is all the prompt generator and the
object masks need. Re-prompting gives old pictures the phrasings the knowledge base and the generator have
gained since (more phrasings per concept, human errors), without rendering again and without a new
trunk cache (training.trunk_cache finds a picture through its symbolic links):

    python -m training.dataengine.reprompt --data runs/v2/data/train --out runs/v3p/train --seed 100

Each output shard links to its source shard's images, instances and scene graphs and holds new masks and a
new samples.jsonl. Scene ids stay, so a scene keeps its side of the train / validation split. Requests
answered by a region of free table are not drawn again (their masks need the physics world, which a scene
graph does not keep): the source's region requests are carried over as they were, so the new set asks for
free space as often as the old one. Deterministic from --seed and the scene id; resumable (finished shards
carry DONE); index.json last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from converseg_core.files import atomic_write_text

from .errors import DataEngineError
from .pipeline import (
    PATH_KEYS,
    add_request_options,
    object_mask,
    read_index,
    read_instances,
    sample_record,
    scene_files,
    write_mask,
)

LINKED = ("images", "instances", "scenes", "depth")  # what a new shard shares with its source shard


def reprompt_scene(generator, verifier, graph: dict, instance: np.ndarray, seed: int, per_family: int):
    """Yield (record, mask) for the kept object requests of one scene (sample ids not yet given); region
    answers drawn are dropped and counted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(graph["scene_id"].encode())]))
    for req in generator.generate(graph, rng, per_family=per_family):
        if req.answer_kind == "region":
            verifier.counts["region_redrawn"] += 1
            continue
        mask = object_mask(instance, req.targets)
        if verifier.check(req, mask, graph, instance) is None:
            yield sample_record(req, graph, "", mask), mask


def region_samples(source: Path) -> dict[str, list[dict]]:
    """The source shard's region-answer records, by scene id."""
    out: dict[str, list[dict]] = {}
    with open(source / "samples.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["answer_kind"] == "region":
                out.setdefault(rec["scene_id"], []).append(rec)
    return out


def reprompt_shard(source: Path, final: Path, generator, seed: int, per_family: int) -> dict:
    """Write one re-prompted shard into a temporary folder and rename it when complete."""
    from .verifier import Verifier

    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    (tmp / "masks").mkdir(parents=True)
    for sub in LINKED:
        if (source / sub).is_dir():
            (tmp / sub).symlink_to((source / sub).resolve(), target_is_directory=True)
    verifier = Verifier()
    regions = region_samples(source)
    stats = {
        "scenes": 0,
        "samples": 0,
        "families": {},
        "negatives": 0,
        "regions": 0,
        "source": str(source.resolve()),
    }
    try:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for graph_file in sorted((source / "scenes").glob("*.json")):
                graph = json.loads(graph_file.read_text(encoding="utf-8"))
                scene_id = graph["scene_id"]
                instance = read_instances(source / "instances" / f"{scene_id}.png")
                kept = list(reprompt_scene(generator, verifier, graph, instance, seed, per_family))
                carried = [
                    (
                        {k: v for k, v in rec.items() if k not in PATH_KEYS},
                        np.asarray(Image.open(source / rec["mask_merged"])) > 127,
                    )
                    for rec in regions.get(scene_id, [])
                ]
                for n, (rec, mask) in enumerate(kept + carried):
                    rec = {**rec, "sample_id": f"{scene_id}_{n:02d}"}
                    files = scene_files(scene_id, save_depth=False)
                    mask_merged = write_mask(mask, tmp, rec["sample_id"])
                    f.write(
                        json.dumps({"image": files["image"], "mask_merged": mask_merged, **files, **rec})
                        + "\n"
                    )
                    stats["samples"] += 1
                    stats["families"][rec["family"]] = stats["families"].get(rec["family"], 0) + 1
                    stats["negatives"] += int(rec["negative"])
                stats["regions"] += len(carried)
                stats["scenes"] += 1
        counts = dict(verifier.counts)
        counts.pop("kept", None)
        stats["rejected"] = counts
        (tmp / "DONE").write_text(json.dumps(stats))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an incomplete leftover without DONE
        shutil.rmtree(final)
    os.replace(tmp, final)
    return stats


def reprompt(
    data: Path,
    out: Path,
    *,
    seed: int,
    per_family: int,
    negative_rate: float,
    prompt_noise: float,
    progress: bool = True,
) -> dict:
    """Re-prompt every shard of `data` into `out`; returns the new index.json's content."""
    from tqdm import tqdm

    from .knowledge import load_knowledge_base
    from .prompts import PromptGenerator

    index = read_index(data)
    config = {
        "seed": seed,
        "samples_per_family": per_family,
        "negative_rate": negative_rate,
        "prompt_noise": prompt_noise,
    }
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "reprompt.json"
    wanted = {"source": str(data.resolve()), **config}
    if config_file.is_file() and json.loads(config_file.read_text()) != wanted:
        raise DataEngineError(
            f"{out}: holds a re-prompt of another source or configuration; choose another --out"
        )
    atomic_write_text(config_file, json.dumps(wanted, indent=1))
    # Region requests are skipped, so object sizes (used only to say what fits where) are not needed.
    generator = PromptGenerator(
        kb=load_knowledge_base(), category_sizes={}, negative_rate=negative_rate, noise_rate=prompt_noise
    )
    totals: dict = {"scenes": 0, "samples": 0, "negatives": 0, "regions": 0, "families": {}, "rejected": {}}
    for name in tqdm(index["shards"], desc="re-prompt", unit="shard", disable=not progress):
        final = out / name
        if (final / "DONE").is_file():
            stats = json.loads((final / "DONE").read_text())
        else:
            stats = reprompt_shard(data / name, final, generator, seed, per_family)
        for key in ("scenes", "samples", "negatives", "regions"):
            totals[key] += stats[key]
        for key in ("families", "rejected"):
            for k, v in stats[key].items():
                totals[key][k] = totals[key].get(k, 0) + v
    if (data / "ASSET_LICENCES.md").is_file():
        shutil.copyfile(data / "ASSET_LICENCES.md", out / "ASSET_LICENCES.md")
    new_index = {
        "format": "converseg-dataengine",
        "version": 1,
        "reprompted_from": str(data.resolve()),
        "seed": seed,
        "scenes": totals["scenes"],
        "samples": totals["samples"],
        "shards": list(index["shards"]),
        "counts_per_family": dict(sorted(totals["families"].items())),
        "negatives": totals["negatives"],
        "region_answers": totals["regions"],
        "rejected_per_reason": dict(sorted(totals["rejected"].items())),
        "config": {**index.get("config", {}), **config},
    }
    atomic_write_text(out / "index.json", json.dumps(new_index, indent=1))  # last: it marks the run finished
    return new_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.dataengine.reprompt",
        description="Draw new requests (today's prompt generator and knowledge base) for the scenes of a "
        "rendered set, reusing its images; region answers are not redrawn.",
    )
    p.add_argument(
        "--data", type=Path, required=True, help="a finished data engine output folder (the source)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (created; an existing one is resumed)"
    )
    p.add_argument(
        "--seed",
        type=int,
        required=True,
        help="request seed; use one the source did not (its requests were drawn from its own seed)",
    )
    add_request_options(p, samples_per_family=2)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        index = reprompt(
            args.data,
            args.out,
            seed=args.seed,
            per_family=args.samples_per_family,
            negative_rate=args.negative_rate,
            prompt_noise=args.prompt_noise,
            progress=not args.quiet,
        )
    except DataEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {index['samples']} requests over {index['scenes']} scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
